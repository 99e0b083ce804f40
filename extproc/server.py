"""grpc.aio Envoy external processor: a thin servicer around the pure phase functions.

One gRPC stream is one HTTP request (the router phase; every attempt is prepared by Envoy).
Per-stream state is a local variable of `Process`; the table is read once per stream. Accounting is the
access log service beside it (accesslog.py).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from signalbox.core import budget, rollouts
from signalbox.core.envoygen import modelsapi
from signalbox.core.envoygen.contract import BODY_MODEL_KEY, EMPTY_BODY, RELAY_HEADER, RELAY_KEY, SPLIT_KEY, api_of_path
from signalbox.core.errors import ANTHROPIC_API, Forbidden, InternalError, MalformedRequest, RequestError, UnknownModel

from . import accounting, decide, identity, limits, relay, rollout, strategies, upstream, wire
from .accesslog import AccessLogSink
from .capture import Capture
from .classify import Classification
from .clusterfeed import ClusterFile
from .decisions import DecisionSigner
from .identity import ConsumerRuntime
from .inflight import OpenRequests
from .ledger import SpendLedger
from .llm_tier import LlmClassifier
from .metrics import Metrics
from .mirror import Mirrors
from .reload import TableHolder
from .rolloutstats import RolloutStats
from .runtime import BackendRuntime, PolicyRuntime, RuntimeTable
from .strategies import SelectionState
from .xds import AggregatedDiscovery, Endpoints

log = logging.getLogger("signalbox.extproc")


def _ends_request_phase(response: ep.ProcessingResponse) -> bool:
    """After this answer Envoy has what it needs to go on (or has replied): an error found later
    can only be logged, since a second immediate response would not be read."""
    return response.WhichOneof("response") in ("request_body", "immediate_response")


class Processor(ep_grpc.ExternalProcessorServicer):
    def __init__(
        self,
        tables: TableHolder,
        state: SelectionState | None = None,
        max_body_bytes: int = 8 * 1024 * 1024,
        metrics: Metrics | None = None,
        ledger: SpendLedger | None = None,
        accounting: bool = True,
        signer: DecisionSigner | None = None,
        open_requests: OpenRequests | None = None,
        limit_store: limits.LimitStore | None = None,
        capture: Capture | None = None,
        rollout_stats: RolloutStats | None = None,
    ):
        self.tables = tables
        # Opt-in: routed requests recorded for `signalbox replay` (capture.py).
        self.capture = capture
        self.state = state or SelectionState()
        self.max_body_bytes = max_body_bytes
        self.llm = LlmClassifier()
        self.metrics = metrics or tables.metrics or Metrics()
        # Shared by every worker of this replica when it is a file (exact local budgets).
        self.ledger = ledger or SpendLedger()
        # Off, Envoy reports no finished requests: nothing is spent and nothing may be held.
        self.accounting = accounting
        # Signs x-signalbox-decision; feedback with a token it did not sign is refused.
        self.signer = signer or DecisionSigner()
        # Requests open per backend (least-busy), shared by the workers when it is a file.
        self.open = open_requests or OpenRequests()
        # Consumer and policy limits: SQLite shared by the workers, or Redis shared by replicas.
        self.limits: limits.LimitStore = limit_store or limits.EmbeddedLimits()
        # Rollout figures and pauses, shared by the workers (and, published, by the replicas).
        self.rollouts = rollout_stats or RolloutStats()
        # Copies of sampled requests to a policy's mirror backend (mirror.py).
        self.mirrors = Mirrors(self.metrics)
        tables.on_install.append(self.forget_old_rollouts)
        self.metrics.watch_budgets(self.budget_windows)

    def count_open(self, policy: PolicyRuntime, now: float) -> None:
        """What `least-busy` reads: the requests open per backend, across every worker."""
        if policy.strategy == "least-busy":
            self.state.in_flight = defaultdict(int, self.open.counts(now))

    def rollout(
        self, table, prepared: decide.Prepared, headers: dict[str, str], raw: bytes, count: bool = True
    ) -> tuple[decide.Prepared, decide.Prepared | None, str]:
        """A policy's rollout (rollout.py): (what to serve, what to shadow, the note for the
        response header and log). A canary's callers on the candidate's side are served by it.
        `count`: into the metrics (not for explaining)."""
        live = prepared.policy
        spec = live.rollout
        candidate = table.by_id.get(spec.candidate) if spec is not None else None
        if spec is None or candidate is None:
            return prepared, None, ""
        if self.rollouts.paused(spec.epoch):
            # Its candidate failed too often (rolloutstats.py): the live policy serves everything.
            if count:
                mode = "canary" if spec.canary else "shadow"
                labels = (live.name, candidate.name, mode, "paused", prepared.classification.class_key)
                self.metrics.rollout_decisions.labels(*labels).inc()
            return prepared, None, f"paused:{candidate.name}"
        serve, shadow, note = rollout.sides(table, prepared, headers, raw, decide.client_address(headers))
        if count and spec.canary:
            outcome = "served_candidate" if note.startswith("canary:") else "served_live"
            labels = (live.name, candidate.name, "canary", outcome, prepared.classification.class_key)
            self.metrics.rollout_decisions.labels(*labels).inc()
        return serve, shadow, note

    def shadow_decision(
        self, shadow: decide.Prepared, live: decide.RouterOutcome, state: SelectionState, now: float
    ) -> str:
        """The candidate's decision on a request the live policy serves: recorded, never served,
        and never a reason for the live request to fail."""
        policy, candidate = live.policy, shadow.policy
        ours = live.selection.choice.backend
        class_key = live.classification.class_key
        live_usd = strategies.expected_cost_usd(shadow.features, ours)
        counts = {rollouts.REQUESTS: 1.0, rollouts.CANDIDATE: 1.0, rollouts.LIVE_USD: live_usd}
        try:
            theirs = decide.choose(shadow, state)[0].choice.backend
        except Exception as exc:  # whatever the candidate does, the live request goes on
            log.info("shadow decision of %s for %s failed: %r", candidate.name, policy.name, exc)
            self.metrics.rollout_decisions.labels(policy.name, candidate.name, "shadow", "error", class_key).inc()
            self.count_rollout(policy, candidate.name, {**counts, rollouts.CANDIDATE_ERRORS: 1.0}, now)
            return f"shadow:{candidate.name}:error"
        outcome = "same" if theirs.id == ours.id else "differs"
        self.metrics.rollout_decisions.labels(policy.name, candidate.name, "shadow", outcome, class_key).inc()
        their_usd = strategies.expected_cost_usd(shadow.features, theirs)
        self.metrics.rollout_cost.labels(policy.name, candidate.name, "live", class_key).inc(live_usd)
        self.metrics.rollout_cost.labels(policy.name, candidate.name, "candidate", class_key).inc(their_usd)
        counts.update({rollouts.CANDIDATE_USD: their_usd, rollouts.DIFFERS: float(outcome == "differs")})
        self.count_rollout(policy, candidate.name, counts, now)
        return f"shadow:{candidate.name}:{theirs.id}:{outcome}"

    def forget_old_rollouts(self) -> None:
        """A new config: figures of rollouts (epochs) it no longer has are dropped."""
        epochs = {p.rollout.epoch for p in self.tables.current.policies if p.rollout is not None}
        try:
            self.rollouts.forget(epochs)
        except Exception as exc:  # a busy state file: the next config change tries again
            log.warning("could not drop old rollout figures: %r", exc)

    def count_rollout(self, live: PolicyRuntime, candidate: str, counts: dict[str, float], now: float) -> None:
        """Into the rollout's figures; pauses it when the candidate's errors pass its limit.
        Never raises: the figures must not fail the request they describe."""
        spec = live.rollout
        if spec is None:
            return
        rule = rollouts.PauseRule(spec.max_error_rate, spec.min_requests)
        try:
            paused_by = self.rollouts.record(spec.epoch, rule, counts, now)
        except Exception as exc:  # a locked or full state file: lose a count, not a request
            log.warning("rollout figures of %s not counted: %r", live.name, exc)
            return
        if paused_by is not None:
            self.metrics.rollout_pauses.labels(live.name, candidate).inc()
            log.warning("rollout of %s paused: %s", live.name, rollouts.describe_pause(candidate, paused_by, rule))

    def combined_budget(
        self, policy: PolicyRuntime, consumer: ConsumerRuntime | None, admitted: limits.Admitted, now: float
    ) -> budget.BudgetStatus | None:
        """What the decision sees of budgets: the policy's, or the consumer's when that one is
        further spent (either past its downgrade point makes the choice cheaper)."""
        own = self.budget_status(policy, now)
        if consumer is None or consumer.limits is None or consumer.limits.subject not in admitted.budgets:
            return own
        spent, held = admitted.budgets[consumer.limits.subject]
        theirs = limits.budget_status(consumer.limits, spent, held, now)
        if own is None or not theirs.windows:
            return own if not theirs.windows else theirs
        return theirs if theirs.binding.fraction > own.binding.fraction else own

    def budget_status(self, policy: PolicyRuntime, now: float) -> budget.BudgetStatus | None:
        if policy.budget is None:
            return None
        buckets, held = self.ledger.buckets(policy.id, now), self.ledger.in_flight(policy.id, now)
        return budget.assess(policy.budget, buckets, now, held)

    def hold(self, prepared: decide.Prepared, backend: BackendRuntime, now: float) -> str:
        """Admit the request against its policy's budget and hold its expected cost until the
        access log reports the real cost (accesslog.py releases the hold); returns the hold's id.

        The check and the hold are one ledger transaction, so concurrent requests on every
        worker see each other's holds: raises the 429 when the room was taken meanwhile.
        """
        policy = prepared.policy
        if policy.budget is None or not self.accounting:
            return ""
        hold_id = uuid.uuid4().hex
        usd = strategies.expected_cost_usd(prepared.features, backend)
        refused = self.ledger.admit(policy.id, policy.budget, hold_id, usd, now + policy.budget.hold_seconds, now)
        if refused is not None:
            budget.refuse_if_exhausted(policy.name, refused, now)
        return hold_id

    async def admit(
        self, prepared: decide.Prepared, consumer: ConsumerRuntime | None, request_id: str, now: float
    ) -> tuple[limits.Admitted, tuple[limits.SubjectLimits, ...]]:
        """Admit the request against its consumer's and its policy's limits (one atomic check
        and hold in the limit store); raises the 429 (or the 503 of a limit that fails closed).

        The hold is the request's token estimate and its cost on the policy's dearest eligible
        backend (decided before the backend is: a budget errs towards spent); the access log
        entry replaces it with the real usage.
        """
        policy = prepared.policy
        subjects = tuple(s for s in (consumer.limits if consumer else None, policy.limits) if s is not None)
        if not subjects or not self.accounting:
            return limits.Admitted(), ()
        usage = accounting.expected_usage(prepared.features.estimated_tokens, prepared.features.max_output_tokens)
        usd = max((strategies.expected_cost_usd(prepared.features, c.backend) for c in policy.choices), default=0.0)
        admission = limits.Admission(
            request_id,
            subjects,
            float(usage.prompt_tokens + usage.completion_tokens),
            usd,
            now,
            now + policy.open_seconds,
        )
        label = consumer.id if consumer else identity.ANONYMOUS
        try:
            result = await self.limits.admit(admission)
        except limits.StoreUnavailable as exc:
            log.warning("limit store unreachable while admitting request %s: %s", request_id, exc)
            try:
                admitted = limits.unavailable(subjects, now)
            except RequestError:
                self.metrics.limit_store_errors.labels("admit", "refused").inc()
                self.metrics.consumer_requests.labels(label, "limits_unavailable").inc()
                raise
            self.metrics.limit_store_errors.labels("admit", "allowed").inc()
            return admitted, ()
        if isinstance(result, limits.Refusal):
            self.metrics.limit_refusals.labels(result.subject.subject, result.limit).inc()
            self.metrics.consumer_requests.labels(label, "limited").inc()
            limits.refuse(result)
        assert isinstance(result, limits.Admitted)
        return result, subjects

    async def release(self, request_id: str, subjects: tuple[limits.SubjectLimits, ...]) -> None:
        """Give back what a request held when it is refused after admission (no access log
        entry will carry usage for it)."""
        if not subjects:
            return
        try:
            await self.limits.settle(request_id, tuple(limits.Charge(s.subject, 0, 0) for s in subjects), time.time())
        except limits.StoreUnavailable:
            self.metrics.limit_store_errors.labels("settle", "none").inc()

    def budget_windows(self) -> list[tuple[PolicyRuntime, budget.BudgetStatus]]:
        now = time.time()
        return [(p, s) for p in self.tables.current.policies if (s := self.budget_status(p, now)) is not None]

    async def reclassify(self, prepared: decide.Prepared) -> Classification | None:
        """Tier 3, when the policy has one and the cheaper tiers were unsure."""
        policy = prepared.policy
        if not decide.needs_llm(prepared) or policy.llm is None:
            return None
        better = await self.llm.classify(policy.llm, prepared.features.text, prepared.classification.estimated_tokens)
        if better is None:
            self.metrics.llm_tier_failures.labels(policy.name).inc()
        return better

    def relayed(self, policy: PolicyRuntime, metadata: dict[str, str], request_id: str, now: float) -> dict[str, str]:
        """A stream for the stream relay (relay.py): the decision, sealed, rides with it and is
        put in force when the relay sends it back. This request's own entry then carries only
        what the answer's headers say (who decided what, why): what it costs, holds and teaches
        is the relayed requests' (their access log entries), never counted twice."""
        sealed = relay.seal(self.signer, {**metadata, "relay_of": request_id}, policy.open_seconds, now)
        kept = ("target", "policy", "policy_id", "reason", "class", "rollout")
        shown: dict[str, str] = {k: metadata[k] for k in kept if k in metadata}
        return {**shown, RELAY_KEY: sealed}

    def models(
        self, table: RuntimeTable, request: ep.ProcessingRequest, headers: dict[str, str], path: str
    ) -> ep.ProcessingResponse:
        """A models API request, answered for its caller (envoygen.modelsapi.answer)."""
        anthropic = modelsapi.ANTHROPIC_HEADER in headers
        try:
            consumer = table.identities.identify(headers, wire.jwt_payload(request), time.time())
            visible = identity.visible_aliases(table.identities, consumer, table.by_alias, headers)
            return wire.immediate(200, modelsapi.answer(visible, path, anthropic))
        except RequestError as err:
            if err.status == 401:  # as a refused request is counted
                self.metrics.consumer_requests.labels(identity.ANONYMOUS, "unauthenticated").inc()
            return wire.immediate_error(err, api=ANTHROPIC_API if anthropic else "")

    def count(self, outcome: decide.RouterOutcome) -> None:
        c, backend = outcome.classification, outcome.selection.choice.backend
        self.metrics.requests.labels(
            outcome.policy.name, backend.provider.name, backend.model, outcome.policy.strategy, c.tier, "routed"
        ).inc()
        self.metrics.classifications.labels(outcome.policy.name, c.tier, c.task_type, c.complexity).inc()

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context
    ) -> AsyncIterator[ep.ProcessingResponse]:
        async for request in request_iterator:
            answered = False
            headers: dict[str, str] = {}
            try:
                if request.WhichOneof("request") == "response_headers":
                    # An attempt's answer whose headers wait for its first token.
                    async for response in upstream.first_token(request, request_iterator, self.metrics):
                        yield response
                    return
                if route := upstream.translation_of(request):
                    # An upstream attempt to a backend of another API family.
                    async for response in upstream.translate(request, route, request_iterator, self.metrics):
                        answered = answered or response.WhichOneof("response") == "immediate_response"
                        yield response
                    return
                if request.WhichOneof("request") == "request_body":
                    headers = wire.attribute_headers(request)
                else:
                    headers = wire.header_map(request.request_headers)
                async for response in self._router(request, headers, request_iterator):
                    answered = answered or _ends_request_phase(response)
                    yield response
            except Exception:
                # The boundary: whatever a request makes the decision code raise is this
                # request's 500 (logged once, with the id the client gets), never a dropped
                # stream, which Envoy would turn into a misleading 503 for every such request.
                request_id = headers.get("x-request-id", "")
                log.exception("internal error while routing request %s", request_id or "(no id)")
                self.metrics.internal_errors.inc()
                if not answered:
                    yield wire.immediate_error(InternalError(request_id), api=api_of_path(headers.get(":path", "")))
            return

    async def _router(
        self, request: ep.ProcessingRequest, headers: dict[str, str], rest: AsyncIterator[ep.ProcessingRequest]
    ):
        """The router phase. Envoy sends one message, the body with the headers as attributes
        (the gateway's config); a headers message first, then the body, is read as well."""
        table = self.tables.for_routes(wire.routes_key(request))
        state = self.state
        first = request.WhichOneof("request")
        if first not in ("request_headers", "request_body"):
            return
        path = headers.get(":path", "/")
        policy = None
        try:
            if modelsapi.is_models_path(path) and headers.get(":method", "GET") == "GET":
                # Only where consumers are declared (modelsapi.routes): who asks decides what is listed.
                yield self.models(table, request, headers, path)
                return
            kind = decide.check_path(headers.get(":method", "GET"), path)
            if first == "request_headers":
                if request.request_headers.end_of_stream:
                    raise MalformedRequest(EMPTY_BODY[kind])
                decide.check_length(headers, self.max_body_bytes)
                yield wire.headers_response()
                raw = None
                async for message in rest:
                    if message.WhichOneof("request") == "request_body":
                        raw = message.request_body.body
                        break
                if raw is None:
                    return
            else:
                raw = request.request_body.body
            if relayed := headers.get(RELAY_HEADER):
                # Back from the stream relay: the decision made for it, in force unchanged.
                try:
                    metadata = self.signer.unseal(relay.RELAY_PURPOSE, relayed, time.time())
                except ValueError:
                    raise Forbidden(f"{RELAY_HEADER} is the gateway's own header") from None
                yield wire.body_response(clear_route_cache=True, metadata=metadata)
                return
            if kind == "feedback":
                caller = table.identities.identify(headers, wire.jwt_payload(request), time.time())

                def may_teach(decided_by: PolicyRuntime) -> None:
                    identity.authorize_feedback(table.identities, caller, decided_by, table.by_alias, headers)

                recorded = decide.apply_feedback(table, state, raw, self.signer, may_teach)
                self.metrics.feedback.labels(recorded["policy"]).inc()
                yield wire.immediate(200, json.dumps(recorded).encode())
                return
            decided = time.perf_counter()  # parse, classify (all tiers), select
            now = time.time()
            address = decide.client_address(headers)
            try:
                prepared = decide.prepare(table, path, headers, raw, address, self.max_body_bytes)
            except UnknownModel:
                if table is self.tables.current:
                    raise
                # An alias the config of the routes it arrived under has not: the newest config
                # (whose route Envoy does not have yet: a 503 the client's SDK retries).
                table = self.tables.current
                prepared = decide.prepare(table, path, headers, raw, address, self.max_body_bytes)
            consumer = table.identities.identify(headers, wire.jwt_payload(request), now)
            consumer_label = consumer.id if consumer else identity.ANONYMOUS
            policy = prepared.policy
            try:
                identity.authorize(table.identities, consumer, policy, str(prepared.body["model"]), headers)
            except RequestError as err:
                outcome_name = "unauthenticated" if err.status == 401 else "forbidden"
                self.metrics.consumer_requests.labels(consumer_label, outcome_name).inc()
                raise
            rollout_of = policy  # the live policy, whose rollout counts this request
            prepared, shadow, rollout_note = self.rollout(table, prepared, headers, raw)
            policy = prepared.policy
            request_id = headers.get("x-request-id") or uuid.uuid4().hex
            admitted, held = await self.admit(prepared, consumer, request_id, now)
            try:
                self.count_open(policy, now)
                outcome = decide.finish(
                    prepared,
                    state,
                    await self.reclassify(prepared),
                    budget=self.combined_budget(policy, consumer, admitted, now),
                    now=now,
                )
            except BaseException:
                await self.release(request_id, held)
                raise
            token = self.signer.token(
                policy.name, outcome.classification.class_key, outcome.selection.choice.backend.id
            )
            if outcome.vector is not None:
                state.remember(token, outcome.vector)  # for the feedback on it, on any worker
            metadata = {
                "target": outcome.target,
                "policy": policy.name,
                "policy_id": policy.id,
                "reason": outcome.selection.reason,
                "decision": token,
                "class": decide.class_header(outcome.classification),
                # attempt.lua leaves the body alone on an attempt to this model's backend.
                BODY_MODEL_KEY: outcome.selection.choice.backend.upstream_model,
            }
            if policy.split:
                # Envoy routes this policy alone: the decision goes where Envoy would send it.
                metadata[SPLIT_KEY] = policy.split
            if shadow is not None:
                rollout_note = self.shadow_decision(shadow, outcome, state, now)
            if rollout_note:
                metadata["rollout"] = rollout_note
                # The access log counts a canary's sides into the live policy's figures.
                metadata["rollout_of"] = rollout_of.id
            if table.identities.enabled:
                metadata["consumer"] = consumer_label
                self.metrics.consumer_requests.labels(consumer_label, "routed").inc()
            if held:
                # The access log entry charges these subjects the real usage (accesslog.py).
                metadata["limits"] = ",".join(s.subject for s in held)
                metadata["limit_hold"] = request_id
            try:
                hold_id = self.hold(prepared, outcome.selection.choice.backend, now)
            except BaseException:
                await self.release(request_id, held)
                raise
            if hold_id:
                metadata["hold"] = hold_id
            if held or hold_id:
                # What an answer without usage is charged at (accesslog.estimated).
                features = prepared.features
                metadata["expected"] = f"{features.estimated_tokens},{features.max_output_tokens}"
            if self.capture is not None:
                backend = outcome.selection.choice.backend
                # `policy`: the one the alias chose; a canary's candidate side is `served_by` its own.
                recorded = {"policy": rollout_of.name, "backend": backend.id, "class": outcome.classification.class_key}
                if policy is not rollout_of:
                    recorded["served_by"] = policy.name
                if rollout_note:
                    recorded["rollout"] = rollout_note
                self.capture.record(request_id, path, headers, raw, recorded)
            self.metrics.phase_seconds.labels("router").observe(time.perf_counter() - decided)
            self.count(outcome)
            # The target travels as dynamic metadata, which Envoy's routes match on (header
            # mutations are not applied to a body answer when the headers were not sent).
            # A copy for the alias's policy's mirror: its task starts once this answer is on its way.
            self.mirrors.maybe_copy(rollout_of, request_id, path, raw)
            if policy.strategy == "least-busy":
                # Closed by the request's access log entry (accesslog.py), whichever worker gets it.
                chosen = outcome.selection.choice.backend.id
                self.open.begin(headers.get("x-request-id") or uuid.uuid4().hex, chosen, now + policy.open_seconds)
            # The stream ends with this one answer: what the request's end teaches (latency,
            # open requests, outcomes) comes from its access log entry, never a held stream.
            if policy.broken_stream != "close" and prepared.body.get("stream") is True:
                metadata = self.relayed(policy, metadata, request_id, now)
            yield wire.body_response(body=outcome.body, clear_route_cache=True, metadata=metadata)
        except RequestError as err:
            self.metrics.requests.labels(
                policy.name if policy else "none", "none", "none", "none", "none", err.code
            ).inc()
            yield wire.immediate_error(err, policy.name if policy else "", api=api_of_path(path))


# Streams gRPC may hold for the worker before its event loop takes them. gRPC core refuses new
# calls at random past 1,000 waiting and all past 3,000 (`grpc.server.max_pending_requests`,
# its hard limit); a burst of streams opened at once (5,000 in `bench.scale streams --ramp 0`)
# outran the event loop, and Envoy answered the refused ones 503 routing_unavailable: 0 to
# 343 of 5,000 per run, none in 5 runs with this limit. Each waiting stream costs gRPC about
# a kilobyte; Envoy opens at most 100,000 (the ext_proc cluster's circuit breakers).
MAX_PENDING_STREAMS = 20_000


async def serve(
    tables: TableHolder,
    address: str,
    max_body_bytes: int,
    state: SelectionState | None = None,
    processor: Processor | None = None,
    clusters: ClusterFile | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start the servicer (and the gRPC health service) on `address` ("unix:/path" or "host:port")."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_body_bytes + 1024 * 1024),
            ("grpc.max_send_message_length", max_body_bytes + 1024 * 1024),
            ("grpc.server.max_pending_requests", MAX_PENDING_STREAMS),
            ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_STREAMS),
        ]
    )
    processor = processor or Processor(tables, state, max_body_bytes)
    ep_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(
        AccessLogSink(
            tables,
            processor.metrics,
            processor.ledger,
            processor.state,
            processor.open,
            processor.state.cooldowns,
            processor.limits,
            processor.count_rollout,
        ),
        server,
    )
    # Envoy's clusters and its backend clusters' endpoints (GatewayOptions.endpoints_over_ads),
    # from whichever worker holds Envoy's one ADS stream.
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
        AggregatedDiscovery(Endpoints(tables, processor.state, clusters=clusters)), server
    )
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, port
