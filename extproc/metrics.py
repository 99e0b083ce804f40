"""Prometheus metrics of the ext_proc, on a registry of its own (one per server instance).

Names follow the OpenTelemetry GenAI conventions where one exists (`gen_ai_*`), Signalbox's own
otherwise (`signalbox_*`). Labels are low-cardinality by design: policy, provider, model,
strategy, tier, task type, complexity, outcome codes — never prompts, users or request ids.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .memtrim import release_free_memory
from .sharedmetrics import SeriesStore, SharedCollector, SharedCounter, SharedHistogram

if TYPE_CHECKING:  # annotations only: keeps this module light for the CLI that imports it
    from signalbox.core.budget import BudgetStatus

    from .runtime import PolicyRuntime

CONTENT_TYPE = CONTENT_TYPE_LATEST
# prometheus_client's multiprocess mode: each worker writes its values under this directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The model that answered, its provider's `gen_ai.provider.name` (OpenTelemetry GenAI
# conventions: openai, azure.ai.openai, anthropic, gcp.gemini, aws.bedrock; openai_compatible for the rest),
# and the AIProvider's own name.
GENAI_LABELS = ["gen_ai_request_model", "gen_ai_provider_name", "provider"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._budgets: _BudgetCollector | None = None
        r = self.registry
        # Series the config multiplies (by policy, backend, consumer): one table for the gateway
        # (sharedmetrics: ~37 KB per policy and backend in each worker as prometheus_client's).
        self._shared = SharedCollector(SeriesStore(os.environ.get(MULTIPROC_ENV) or None))
        r.register(self._shared)
        self.requests = self._shared_counter(
            "signalbox_requests",
            'Routed requests by outcome (routed, or the error code); tier "compiled": routed by Envoy alone.',
            ["policy", "provider", "model", "strategy", "tier", "outcome"],
        )
        self.classifications = self._shared_counter(
            "signalbox_classifications",
            "Request classifications, by the tier that decided.",
            ["policy", "tier", "task_type", "complexity"],
        )
        self.failovers = self._shared_counter(
            "signalbox_failover_attempts",
            "Upstream attempts beyond the first (failover, hedging), by the backend that finally answered.",
            ["provider", "model"],
        )
        self.usage_estimated = self._shared_counter(
            "signalbox_usage_estimated",
            "Answers (2xx) that reported no token usage (a provider with streamUsage false, or a server "
            "that sends none), counted, charged to budgets and limits and priced at an estimate instead "
            "(accounting.estimated_usage), by backend.",
            ["provider", "model"],
        )
        self.broken_responses = self._shared_counter(
            "signalbox_broken_responses",
            "Answers that started but did not end normally (the provider reset, cut or went silent "
            'mid-stream; the client got an error, not an end), by backend and Envoy flag ("UPE", "UT", ...).',
            ["provider", "model", "flag"],
        )
        self.first_token_holds = Counter(
            "signalbox_first_token_holds",
            "Streamed attempts whose answer headers waited for the first body bytes (policies with "
            "failover.firstTokenTimeoutMs), by outcome: released (the first bytes came) or ended (the "
            "attempt ended first: the deadline, a reset).",
            ["outcome"],
            registry=r,
        )
        self.relayed_streams = self._shared_counter(
            "signalbox_relayed_streams",
            "Streams of policies with failover.onBrokenStream error or continue, passed by the stream relay, by "
            "policy and outcome: complete, continued (it broke and the next backend finished it), error (it "
            "broke and the client got an error event) or client_left (the client closed it first: nothing is "
            "continued).",
            ["policy", "outcome"],
        )
        self.translations = Counter(
            "signalbox_translations",
            "Upstream attempts translated between API families (client API, backend API), by outcome "
            '("ok", or the code of the refusal, e.g. "unsupported_feature").',
            ["from_api", "to_api", "outcome"],
            registry=r,
        )
        self.cooldowns = self._shared_counter(
            "signalbox_backend_cooldowns",
            "Cooldowns started: a backend left out of new requests for a while, by why (rate_limited: a 429; "
            "key_rejected: 401/403; unavailable: a 503 with Retry-After; low_remaining: its rate-limit headers; "
            "ejected: Envoy's outlier detection took it out after repeated failures).",
            ["provider", "model", "reason"],
        )
        self.feedback = self._shared_counter("signalbox_feedback", "Quality feedback received.", ["policy"])
        # Consumers: the label is a declared consumer's id ("namespace/name") or "anonymous",
        # so its values are bounded by the config, never by what callers send.
        self.consumer_requests = self._shared_counter(
            "signalbox_consumer_requests",
            "Requests by consumer and outcome: routed, unauthenticated (401), forbidden (403), "
            "limited (429, any limit) or limits_unavailable (503).",
            ["consumer", "outcome"],
        )
        self.limit_refusals = self._shared_counter(
            "signalbox_limit_refusals",
            "Requests refused by a limit, by whose limit (consumer:<id> or policy:<id>) and which "
            "(requests_per_minute, tokens_per_minute, max_concurrent, budget_hour/day/month).",
            ["subject", "limit"],
        )
        self.consumer_tokens = self._shared_counter(
            "signalbox_consumer_tokens",
            "Tokens providers reported for each consumer's requests (input, output).",
            ["consumer", "kind"],
        )
        self.consumer_cost = self._shared_counter(
            "signalbox_consumer_cost_usd", "USD spent by each consumer's requests.", ["consumer"]
        )
        self.rollout_decisions = self._shared_counter(
            "signalbox_rollout_decisions",
            "Requests of a policy with a rollout, by candidate, mode and outcome: canary (served_live, "
            "served_candidate) or shadow (same, differs: whether the candidate picked another backend; error); "
            "paused: the candidate failed too often and the live policy served. By the live policy's class.",
            ["policy", "candidate", "mode", "outcome", "class_key"],
        )
        self.rollout_cost = self._shared_counter(
            "signalbox_rollout_estimated_cost_usd",
            "Estimated cost of each side's choice in shadow mode (side live or candidate), by class.",
            ["policy", "candidate", "side", "class_key"],
        )
        self.mirror_requests = self._shared_counter(
            "signalbox_mirror_requests",
            "Copies sent to a policy's mirror backend, by outcome: 2xx/4xx/5xx, error (timeout, connection), "
            "dropped (max_in_flight reached), untranslatable, no_key.",
            ["policy", "backend", "outcome"],
        )
        self.mirror_duration = self._shared_histogram(
            "signalbox_mirror_duration_seconds",
            "Time until a mirror backend's whole answer arrived (copies ask for no stream).",
            ["policy", "backend"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.mirror_tokens = self._shared_counter(
            "signalbox_mirror_tokens",
            "Tokens a mirror backend reported for the copies, by direction (input, output).",
            ["policy", "backend", "direction"],
        )
        self.mirror_cost = self._shared_counter(
            "signalbox_mirror_cost_usd",
            "What the copies cost at the mirror backend's prices: counted apart from the policy's spend, "
            "budgets and limits.",
            ["policy", "backend"],
        )
        self.mirror_in_flight = Gauge(
            "signalbox_mirror_in_flight",
            "Copies sent and not yet answered.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rollout_pauses = self._shared_counter(
            "signalbox_rollout_pauses",
            "Rollouts this gateway paused because their candidate's error rate passed the rollout's limit.",
            ["policy", "candidate"],
        )
        self.limit_store_errors = Counter(
            "signalbox_limit_store_errors",
            "Calls to the limit store (Redis) that failed, by operation (admit, settle) and what the "
            "request got (allowed: failed open; refused: failed closed, 503; none: after the answer).",
            ["operation", "outcome"],
            registry=r,
        )
        self.config_generation = Gauge(
            "signalbox_config_generation", "Routing config generation in force.", registry=r, multiprocess_mode="max"
        )
        self.config_reload_failures = Counter(
            "signalbox_config_reload_failures",
            "Routing configs that could not be loaded (the last good one stayed).",
            registry=r,
        )
        self.providers_without_key = Gauge(
            "signalbox_providers_without_key",
            "Providers whose declared API key cannot be read: their backends are not routed to.",
            registry=r,
            multiprocess_mode="max",
        )
        self.streams_closed_by_envoy = Counter(
            "signalbox_extproc_streams_closed_by_envoy",
            "Router or upstream streams Envoy ended before their handler could send the final status (harmless).",
            registry=r,
        )
        self.internal_errors = Counter(
            "signalbox_internal_errors",
            "Requests answered 500 internal_error because deciding raised (each is logged with its request id).",
            registry=r,
        )
        self.phase_seconds = Histogram(
            "signalbox_extproc_phase_duration_seconds",
            "Time the ext_proc spends deciding, by phase.",
            ["phase"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.llm_tier_failures = self._shared_counter(
            "signalbox_llm_classifier_fallbacks",
            "LLM-tier calls that timed out or failed (earlier tiers decided).",
            ["policy"],
        )
        # GenAI semantic conventions, from Envoy's timings in the access log (accesslog.py):
        # from the request's arrival to the last response byte, and to the first byte of a stream.
        self.request_duration = self._shared_histogram(
            "gen_ai_server_request_duration_seconds",
            "Duration of a routed request, until the last response byte was sent.",
            GENAI_LABELS,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.time_to_first_token = self._shared_histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time until the first byte of a streamed response arrived from the provider.",
            GENAI_LABELS,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

        # GenAI semantic conventions: gen_ai.client.token.usage, by gen_ai.token.type.
        self.tokens = self._shared_counter(
            "gen_ai_client_token_usage",
            "Tokens used, as reported by providers.",
            ["gen_ai_token_type", *GENAI_LABELS, "policy"],
        )
        self.cost = self._shared_counter(
            "signalbox_cost_usd",
            "Spend in USD, from reported usage and the model's prices.",
            ["policy", "provider", "model"],
        )

    def _shared_counter(self, name: str, documentation: str, labelnames: list[str]) -> SharedCounter:
        counter = SharedCounter(self._shared.store, name, documentation, labelnames)
        self._shared.metrics.append(counter)
        return counter

    def _shared_histogram(
        self, name: str, documentation: str, labelnames: list[str], buckets: tuple[float, ...]
    ) -> SharedHistogram:
        histogram = SharedHistogram(self._shared.store, name, documentation, labelnames, buckets)
        self._shared.metrics.append(histogram)
        return histogram

    def watch_budgets(self, source: Callable[[], Iterable[tuple[PolicyRuntime, BudgetStatus]]]) -> None:
        """Budget gauges, read from the spend ledger at scrape time (so every worker's spend and
        the other replicas' show, not only what this process counted)."""
        if self._budgets is None:
            self._budgets = _BudgetCollector(source)
            self.registry.register(self._budgets)

    def exposition(self) -> bytes:
        """This process's metrics, or, when the gateway runs several ext_proc workers
        (PROMETHEUS_MULTIPROC_DIR set, as `signalbox up` does), the sum over all of them."""
        if not os.environ.get(MULTIPROC_ENV):
            registry = self.registry
        else:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            if self._budgets is not None:
                registry.register(self._budgets)  # already all workers' spend: read from the ledger
        out = io.BytesIO()
        try:
            with self._shared.quiet():
                out.write(generate_latest(registry))
            self._shared.write(out)  # every worker's series the config multiplies, a few at a time
            return out.getvalue()
        finally:
            release_free_memory()  # what a scrape at a large fleet freed


class _BudgetCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[tuple[PolicyRuntime, BudgetStatus]]]):
        self.source = source

    def collect(self) -> Iterator[Metric]:
        labels = ["policy", "window"]
        spent = GaugeMetricFamily(
            "signalbox_budget_spent_usd", "Spend in the current budget window, all replicas.", labels=labels
        )
        remaining = GaugeMetricFamily(
            "signalbox_budget_remaining_usd", "Budget left in the current window.", labels=labels
        )
        limit = GaugeMetricFamily("signalbox_budget_limit_usd", "Budget of the window.", labels=labels)
        held = GaugeMetricFamily(
            "signalbox_budget_in_flight_usd",
            "Estimated cost held by requests in flight, all replicas (counted against the limit).",
            labels=["policy"],
        )
        for policy, status in self.source():
            for w in status.windows:
                spent.add_metric([policy.name, w.window], w.spent_usd)
                remaining.add_metric([policy.name, w.window], w.remaining_usd)
                limit.add_metric([policy.name, w.window], w.limit_usd)
            held.add_metric([policy.name], status.windows[0].in_flight_usd)
        yield from (spent, remaining, limit, held)
