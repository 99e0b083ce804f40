"""Accounting: the gRPC access log service Envoy reports finished requests to.

Each entry of a routed request carries the router phase's decision (dynamic metadata; for a
compiled route, the route's policy as a custom tag), the token usage Envoy's JSON and SSE
readers took from the response as it passed (envoygen.json_filter, sse_usage_filter),
the endpoint that answered (custom tag `backend`) and Envoy's own timings. Envoy sends entries
in batches, so accounting costs the ext_proc a fraction of a gRPC message per request however
long the response stream, where reading the body itself would cost one message per chunk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import duration_pb2, struct_pb2

from signalbox.core import rollouts
from signalbox.core.envoygen.contract import ATTEMPT_LOG_NAME, COMPILED_POLICY_TAG, METADATA_NS, RESTING_LISTENER

from . import accounting, decisions, limits
from .cooldown import Cooldowns
from .inflight import OpenRequests
from .ledger import SpendLedger
from .metrics import Metrics
from .reload import TableHolder
from .runtime import PolicyRuntime
from .strategies import SelectionState

log = logging.getLogger("signalbox.extproc")


def _count(fields: Mapping[str, struct_pb2.Value], key: str) -> int:
    """A token count Envoy's JSON readers left in metadata (a number; 0 when absent)."""
    value = fields.get(key)
    if value is None:
        return 0
    return int(value.number_value if value.HasField("number_value") else float(value.string_value or 0))


def estimated(
    entry: accesslog_pb2.HTTPAccessLogEntry, fields: Mapping[str, struct_pb2.Value]
) -> accounting.Usage | None:
    """The usage an answer is charged at when it reported none (accounting.estimated_usage):
    only a 2xx answer to a request that holds a budget or limits (the router phase left what it
    expected); None otherwise, or when it reported its own."""
    if "prompt_tokens" in fields or "expected" not in fields or not 200 <= entry.response.response_code.value < 300:
        return None
    try:
        prompt, max_output = (int(part) for part in fields["expected"].string_value.split(","))
    except ValueError:
        return None
    if prompt < 0 or max_output < 0:
        return None
    streamed = "text/event-stream" in entry.response.response_headers.get("content-type", "")
    return accounting.estimated_usage(prompt, max_output, entry.response.response_body_bytes, streamed)


def _seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


# Envoy's response flags that mean the upstream's answer broke after it started, by the short
# name the request log shows: with a 2xx status they mark a stream the client saw fail.
BROKEN_FLAGS = {
    "upstream_protocol_error": "UPE",
    "upstream_remote_reset": "UR",
    "upstream_connection_termination": "UC",
    "upstream_request_timeout": "UT",
    "stream_idle_timeout": "SI",
    "upstream_max_stream_duration_reached": "UMSDR",
}


def served_backend(common: accesslog_pb2.AccessLogCommon) -> str:
    """The id of the backend whose host answered (its host's name, the `backend` tag); "" when
    none did (Envoy writes "-" for a request that reached no host), and when the resting
    listener refused for a resting backend (contract.RESTING_LISTENER): not the provider's
    answer, which would make it rest again, and nothing to learn of the backend."""
    if common.upstream_remote_address.envoy_internal_address.server_listener_name == RESTING_LISTENER:
        return ""
    name = common.custom_tags.get("backend", "")
    return "" if name == "-" else name


def broken(entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
    """The flag of an answer that started (2xx) but did not end normally, or ""."""
    if not 200 <= entry.response.response_code.value < 300:
        return ""
    flags = entry.common_properties.response_flags
    return next((short for name, short in BROKEN_FLAGS.items() if getattr(flags, name)), "")


class AccessLogSink(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(
        self,
        tables: TableHolder,
        metrics: Metrics,
        ledger: SpendLedger,
        state: SelectionState | None = None,
        open_requests: OpenRequests | None = None,
        cooldowns: Cooldowns | None = None,
        limit_store: limits.LimitStore | None = None,
        count_rollout: Callable[[PolicyRuntime, str, dict[str, float], float], None] | None = None,
    ):
        self.tables, self.metrics, self.ledger = tables, metrics, ledger
        # Consumer and policy limits: each entry's real usage replaces what its request held.
        self.limit_store = limit_store
        self._settlements: list[tuple[str, tuple[limits.Charge, ...]]] = []
        # A canary's two sides, into the live policy's rollout figures (Processor.count_rollout).
        self.count_rollout = count_rollout
        # What attempts say of their backends' limits (the attempt log).
        self.cooldowns = cooldowns
        # What a finished request teaches the strategies (learning, latency, open requests).
        self.state, self.open = state, open_requests
        # Policies by id, for the table they came from (compiled routes name their policy's id).
        self._policies: tuple[object, dict[str, PolicyRuntime]] = (None, {})

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context
    ) -> als_pb2.StreamAccessLogsResponse:
        handle = self.account
        async for message in request_iterator:
            if message.HasField("identifier"):  # the first message of a stream names its log
                handle = self.attempt if message.identifier.log_name == ATTEMPT_LOG_NAME else self.account
            for entry in message.http_logs.log_entry:
                try:
                    handle(entry)
                except Exception as exc:
                    log.warning("accounting: skipped an access log entry: %r", exc)
            await self.settle()
        return als_pb2.StreamAccessLogsResponse()

    async def settle(self) -> None:
        """Charge the limit store what the entries of one message reported (awaited here: the
        store may be Redis, and `account` is synchronous)."""
        pending, self._settlements = self._settlements, []
        if self.limit_store is None:
            return
        if not pending:
            return
        try:
            await self.limit_store.settle_many(pending, time.time())
        except limits.StoreUnavailable as exc:
            # The holds lapse at their estimates when the store is back: errs towards spent.
            self.metrics.limit_store_errors.labels("settle", "none").inc(len(pending))
            log.warning("limit store unreachable while charging %d request(s): %s", len(pending), exc)

    def attempt(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        """One attempt whose answer spoke of its backend's limits (Envoy filters the rest)."""
        backend_id = served_backend(entry.common_properties)
        if self.cooldowns is None or backend_id not in self.tables.current.backends:
            return  # none named, or not a provider (the stream relay passes its headers on)
        headers = {k.lower(): v for k, v in entry.response.response_headers.items()}
        rest = self.cooldowns.observe(backend_id, entry.response.response_code.value, headers, time.time())
        backend = self.tables.current.backends.get(backend_id)
        if rest is not None and backend is not None:
            self.metrics.cooldowns.labels(backend.provider.name, backend.model, rest.reason).inc()
            log.info("backend %s cools down for %.1f s (%s)", backend_id, rest.seconds, rest.reason)

    def account(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        fields = entry.common_properties.metadata.filter_metadata[METADATA_NS].fields
        if "decision" not in fields:
            self.account_compiled(entry, fields)
            return
        policy, class_key, first = decisions.unpack(fields["decision"].string_value)
        policy_id = fields["policy_id"].string_value if "policy_id" in fields else policy
        hold = fields["hold"].string_value if "hold" in fields else ""
        cost = 0.0
        estimate = estimated(entry, fields)
        try:
            cost = self.observe(entry, fields, policy, first, estimate)
            self.learn(entry, policy_id, policy, class_key, first)
            self.rollout(entry, fields, cost)
        finally:
            if cost or hold:
                # The real cost replaces what the request held in flight (nothing, if it failed).
                self.ledger.add(policy_id, cost, release=hold)
            self.charge_consumer(fields, cost, estimate)

    def rollout(
        self, entry: accesslog_pb2.HTTPAccessLogEntry, fields: Mapping[str, struct_pb2.Value], cost: float
    ) -> None:
        """What the request adds to its live policy's rollout: a canary's side, its cost and
        whether it failed (5xx, 429, a broken stream); a shadow's live failures. The router
        phase counted the rest (shadow pairs) when it decided."""
        note = fields["rollout"].string_value if "rollout" in fields else ""
        live = self._policy(fields["rollout_of"].string_value) if "rollout_of" in fields else None
        if live is None or live.rollout is None or self.count_rollout is None:
            return
        status = entry.response.response_code.value
        failed = float(status >= 500 or status == 429 or bool(broken(entry)))
        if note.startswith("canary:"):
            counts = {
                rollouts.REQUESTS: 1.0,
                rollouts.CANDIDATE: 1.0,
                rollouts.CANDIDATE_USD: cost,
                rollouts.CANDIDATE_ERRORS: failed,
            }
        elif note == "live":
            counts = {rollouts.REQUESTS: 1.0, rollouts.LIVE_USD: cost, rollouts.LIVE_ERRORS: failed}
        elif note.startswith("shadow:"):
            counts = {rollouts.LIVE_ERRORS: failed}
        else:
            return  # paused: nothing more to learn about the candidate
        self.count_rollout(live, note.split(":")[1] if ":" in note else "", counts, time.time())

    def charge_consumer(
        self, fields: Mapping[str, struct_pb2.Value], cost: float, estimate: accounting.Usage | None = None
    ) -> None:
        """Per-consumer metrics, and the settlement of what the request held against limits:
        its real tokens (cached ones as each subject counts them) and cost, or its `estimate`
        when it reported none."""
        consumer = fields["consumer"].string_value if "consumer" in fields else ""
        prompt, completion = _count(fields, "prompt_tokens"), _count(fields, "completion_tokens")
        if estimate is not None:
            prompt, completion = estimate.prompt_tokens, estimate.completion_tokens
        if consumer:
            self.metrics.consumer_tokens.labels(consumer, "input").inc(prompt)
            self.metrics.consumer_tokens.labels(consumer, "output").inc(completion)
            self.metrics.consumer_cost.labels(consumer).inc(cost)
        if "limits" not in fields or "limit_hold" not in fields:
            return
        # OpenAI counts cached input inside prompt_tokens; Anthropic reports cache reads apart.
        cached, cache_read = _count(fields, "cached_tokens"), _count(fields, "cache_read_tokens")
        counted = self._counts_cached()
        charges = []
        for subject in fields["limits"].string_value.split(","):
            tokens = prompt + completion + (cache_read if counted.get(subject, True) else -cached)
            charges.append(limits.Charge(subject, float(max(tokens, 0)), cost))
        self._settlements.append((fields["limit_hold"].string_value, tuple(charges)))

    def _counts_cached(self) -> dict[str, bool]:
        table = self.tables.current
        subjects = [c.limits for c in table.identities.consumers.values()] + [p.limits for p in table.policies]
        return {s.subject: s.count_cached_tokens for s in subjects if s is not None}

    def learn(
        self, entry: accesslog_pb2.HTTPAccessLogEntry, policy_id: str, policy: str, class_key: str, first: str
    ) -> None:
        """What the request's end teaches its policy's strategy, shared by the workers (learning
        store, open requests): its request is no longer open (least-busy), how long it took
        (latency), and whether the first choice answered (learning: it failed over if another
        backend did; a 5xx or 429 means no backend did)."""
        runtime = self._policy(policy_id)
        if runtime is None:
            return
        common = entry.common_properties
        if runtime.strategy == "least-busy" and self.open is not None:
            self.open.end(entry.request.request_id)
        if self.state is None:
            return
        served = served_backend(common) or first
        latency_ms = _seconds(common.time_to_last_downstream_tx_byte) * 1000
        backend = self.tables.current.backends.get(served)
        if runtime.strategy == "latency" and backend is not None:
            self.state.observe_latency(served, latency_ms, runtime.ewma_alpha, backend.latency_prior_ms)
        if not runtime.learning:
            return
        status = entry.response.response_code.value
        ok = 200 <= status < 500 and status != 429 and not broken(entry)
        if served != first:
            self.state.observe_outcome(policy, class_key, first, False, latency_ms)
        self.state.observe_outcome(policy, class_key, served, ok, latency_ms)

    def _policy(self, policy_id: str) -> PolicyRuntime | None:
        table = self.tables.current
        if self._policies[0] is not table:
            self._policies = (table, {p.id: p for p in table.policies})
        return self._policies[1].get(policy_id)

    def account_compiled(self, entry: accesslog_pb2.HTTPAccessLogEntry, fields: Mapping[str, struct_pb2.Value]) -> None:
        """A request Envoy routed alone (a compiled route: its policy is a custom tag). Compiled
        policies have no budget, so nothing is held or spent in the ledger: only metrics."""
        policy = self._policy(entry.common_properties.custom_tags.get(COMPILED_POLICY_TAG, ""))
        served = self.tables.current.backends.get(served_backend(entry.common_properties))
        if policy is None or served is None:
            return  # refused (the alias was read, the ext_proc said no), unanswered, or an older config
        self.metrics.requests.labels(
            policy.name, served.provider.name, served.model, policy.strategy, "compiled", "routed"
        ).inc()
        self.observe(entry, fields, policy.name, served.id)

    def observe(
        self,
        entry: accesslog_pb2.HTTPAccessLogEntry,
        fields: Mapping[str, struct_pb2.Value],
        policy: str,
        first: str,
        estimate: accounting.Usage | None = None,
    ) -> float:
        """Metrics of a finished request; returns its cost. `fields`: its signalbox metadata;
        `estimate`: its usage when it reported none (`estimated`)."""
        common = entry.common_properties
        backend = self.tables.current.backends.get(served_backend(common) or first)
        if backend is None:
            return 0.0  # a backend of an older config generation
        genai = (backend.model, backend.provider.genai_name, backend.provider.name)
        if common.upstream_request_attempt_count > 1:
            # Envoy retried (failover, or a hedged attempt): counted against who answered.
            self.metrics.failovers.labels(backend.provider.name, backend.model).inc(
                common.upstream_request_attempt_count - 1
            )
        self.metrics.request_duration.labels(*genai).observe(_seconds(common.time_to_last_downstream_tx_byte))
        if flag := broken(entry):
            self.metrics.broken_responses.labels(backend.provider.name, backend.model, flag).inc()
        if "text/event-stream" in entry.response.response_headers.get("content-type", ""):
            # The first response byte of a stream: the first chunk, as providers send it.
            self.metrics.time_to_first_token.labels(*genai).observe(_seconds(common.time_to_first_upstream_rx_byte))
        if estimate is not None:
            usage = estimate
            self.metrics.usage_estimated.labels(backend.provider.name, backend.model).inc()
        elif "prompt_tokens" not in fields:
            return 0.0  # no usage in the response (an error from the provider)
        else:
            usage = accounting.Usage(_count(fields, "prompt_tokens"), _count(fields, "completion_tokens"))
        cost = accounting.cost_usd(usage, backend.input_price, backend.output_price)
        labels = (*genai, policy)
        self.metrics.tokens.labels("input", *labels).inc(usage.prompt_tokens)
        self.metrics.tokens.labels("output", *labels).inc(usage.completion_tokens)
        self.metrics.cost.labels(policy, backend.provider.name, backend.model).inc(cost)
        return cost
