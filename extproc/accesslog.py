"""Accounting: the gRPC access log service Envoy reports finished requests to.

Each entry of a routed request carries the router phase's decision (dynamic metadata), the
token usage Envoy's Lua filter read from the response as it streamed past (core/usage.lua),
the endpoint that answered (custom tag `backend`) and Envoy's own timings. Envoy sends entries
in batches, so accounting costs the ext_proc a fraction of a gRPC message per request however
long the response stream, where reading the body itself would cost one message per chunk.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import duration_pb2, struct_pb2

from signalbox.core.envoygen.contract import COMPILED_POLICY_TAG, METADATA_NS

from . import accounting, decisions
from .ledger import SpendLedger
from .metrics import Metrics
from .reload import TableHolder
from .runtime import PolicyRuntime

log = logging.getLogger("signalbox.extproc")


def _seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


class AccessLogSink(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, tables: TableHolder, metrics: Metrics, ledger: SpendLedger):
        self.tables, self.metrics, self.ledger = tables, metrics, ledger
        # Policies by id, for the table they came from (compiled routes name their policy's id).
        self._policies: tuple[object, dict[str, PolicyRuntime]] = (None, {})

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                try:
                    self.account(entry)
                except Exception as exc:
                    log.warning("accounting: skipped an access log entry: %r", exc)
        return als_pb2.StreamAccessLogsResponse()

    def account(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        fields = entry.common_properties.metadata.filter_metadata[METADATA_NS].fields
        if "decision" not in fields:
            self.account_compiled(entry, fields)
            return
        policy, _, first = decisions.unpack(fields["decision"].string_value)
        policy_id = fields["policy_id"].string_value if "policy_id" in fields else policy
        hold = fields["hold"].string_value if "hold" in fields else ""
        cost = 0.0
        try:
            cost = self.observe(entry, fields, policy, first)
        finally:
            if cost or hold:
                # The real cost replaces what the request held in flight (nothing, if it failed).
                self.ledger.add(policy_id, cost, release=hold)

    def account_compiled(self, entry: accesslog_pb2.HTTPAccessLogEntry, fields: Mapping[str, struct_pb2.Value]) -> None:
        """A request Envoy routed alone (a compiled route: its policy is a custom tag). Compiled
        policies have no budget, so nothing is held or spent in the ledger: only metrics."""
        policy_id = entry.common_properties.custom_tags.get(COMPILED_POLICY_TAG, "")
        backend = entry.common_properties.custom_tags.get("backend", "")
        table = self.tables.current
        if self._policies[0] is not table:
            self._policies = (table, {p.id: p for p in table.policies})
        policy = self._policies[1].get(policy_id)
        served = table.backends.get(backend)
        if policy is None or served is None:
            return  # refused (the alias was read, the ext_proc said no), unanswered, or an older config
        self.metrics.requests.labels(
            policy.name, served.provider.name, served.model, policy.strategy, "compiled", "routed"
        ).inc()
        self.observe(entry, fields, policy.name, backend)

    def observe(
        self, entry: accesslog_pb2.HTTPAccessLogEntry, fields: Mapping[str, struct_pb2.Value], policy: str, first: str
    ) -> float:
        """Metrics of a finished request; returns its cost. `fields`: its signalbox metadata."""
        common = entry.common_properties
        backend = self.tables.current.backends.get(common.custom_tags.get("backend") or first)
        if backend is None:
            return 0.0  # a backend of an older config generation
        genai = (backend.model, backend.provider.name)
        if common.upstream_request_attempt_count > 1:
            # Envoy retried (failover, or a hedged attempt): counted against who answered.
            self.metrics.failovers.labels(backend.provider.name, backend.model).inc(
                common.upstream_request_attempt_count - 1
            )
        self.metrics.request_duration.labels(*genai).observe(_seconds(common.time_to_last_downstream_tx_byte))
        if "text/event-stream" in entry.response.response_headers.get("content-type", ""):
            # The first response byte of a stream: the first chunk, as providers send it.
            self.metrics.time_to_first_token.labels(*genai).observe(_seconds(common.time_to_first_upstream_rx_byte))
        if "prompt_tokens" not in fields:
            return 0.0  # no usage in the response (an error from the provider)
        usage = accounting.Usage(
            int(fields["prompt_tokens"].string_value), int(fields["completion_tokens"].string_value or 0)
        )
        cost = accounting.cost_usd(usage, backend.input_price, backend.output_price)
        labels = (*genai, policy)
        self.metrics.tokens.labels("input", *labels).inc(usage.prompt_tokens)
        self.metrics.tokens.labels("output", *labels).inc(usage.completion_tokens)
        self.metrics.cost.labels(policy, backend.provider.name, backend.model).inc(cost)
        return cost
