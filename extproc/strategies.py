"""Selection strategies: pick the first backend for one request. Pure apart from `SelectionState`.

Every strategy sees only a policy's *choices* (healthy backends that have an Envoy target);
Envoy's aggregate cluster then carries the failover chain. `SelectionState` holds what must
outlive a config reload (round-robin positions, latency averages, in-flight counts), keyed by
policy and backend ids, so a reload does not reset learning or fairness.
"""

from __future__ import annotations

import copy
import random
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from signalbox.core.budget import EXHAUSTED, OK, BudgetStatus
from signalbox.core.errors import MalformedRequest, NoHealthyBackend, RequestError

from .accounting import cost_usd, expected_usage
from .classify import Classification, Features
from .cooldown import Cooldowns
from .learning import LATENCY_ALPHA, SharedLearning
from .neighbours import Neighbours
from .runtime import BackendRuntime, Choice, PolicyRuntime

# How many observations of its class a per-prompt estimate is weighed against: with less
# evidence than this from similar prompts, the class figure counts for more.
NEIGHBOUR_PRIOR = 2.0


class UnsatisfiableRequest(RequestError):
    """No backend of the policy has what the request needs (tools, vision, context size)."""

    status, code = 400, "no_capable_backend"


@dataclass
class SelectionState:
    rng: random.Random = field(default_factory=random.Random)
    # policy id -> smooth weighted round-robin current weights, by choice index
    wrr: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    rr: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    latency_ms: dict[str, float] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # (policy name, class key, backend id) -> [observations, sum of quality scores]
    quality: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    # (policy name, class key, backend id) -> [answered, failed over, latency EWMA in ms]
    outcomes: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    # The other workers' observations too (quality, outcomes), when the gateway has several.
    shared: SharedLearning | None = None
    # Backends resting after a 429, a rejected key or low rate-limit headers (all workers').
    cooldowns: Cooldowns | None = None
    # Per-prompt quality: scores with their prompts' vectors (policies with learning.perPrompt).
    neighbours: Neighbours = field(default_factory=Neighbours)
    # The last shared per-prompt observation taken in (its row id).
    _neighbours_seen: int = 0

    def cooling(self) -> Mapping[str, tuple[float, str]]:
        """Backend id -> (until, reason) of the backends cooling down now."""
        return self.cooldowns.active(time.time()) if self.cooldowns is not None else {}

    def refresh(self) -> None:
        """Take in what other workers learned since the last decision."""
        if self.shared is not None and self.shared.changed():
            self.quality, self.outcomes = self.shared.load()
            self.latency_ms = self.shared.load_latency()
            self._load_neighbours()

    def _load_neighbours(self) -> None:
        assert self.shared is not None
        for row_id, policy, backend, score, vector in self.shared.neighbours_since(self._neighbours_seen):
            self.neighbours.add(policy, vector, backend, score)
            self._neighbours_seen = row_id

    def remember(self, token: str, vector: np.ndarray) -> None:
        """A decision's prompt vector, for the feedback on it (any worker may get that)."""
        self.neighbours.remember(token, vector)
        if self.shared is not None:
            self.shared.remember_decision(token, vector)

    def recall(self, token: str) -> np.ndarray | None:
        found = self.neighbours.recall(token)
        if found is None and self.shared is not None:
            found = self.shared.decision_vector(token)
        return found

    def snapshot(self) -> SelectionState:
        """An independent copy (for dry runs: explaining must not move round-robin positions)."""
        self.refresh()
        shared, self.shared = self.shared, None
        cooldowns, self.cooldowns = self.cooldowns, None
        try:
            copied = copy.deepcopy(self)
            copied.cooldowns = cooldowns  # read-only here: the copy may see what rests
            return copied
        finally:
            self.shared, self.cooldowns = shared, cooldowns

    def observe_latency(self, backend_id: str, ms: float, alpha: float, prior: float) -> None:
        old = self.latency_ms.get(backend_id, prior)
        self.latency_ms[backend_id] = old + alpha * (ms - old)
        if self.shared is not None:
            self.shared.add_latency(backend_id, ms, alpha, prior)

    def observe_quality(
        self, policy: str, class_key: str, backend_id: str, score: float, vector: np.ndarray | None = None
    ) -> None:
        """One outcome (0..1: quality feedback, or 0 for a failed request) for a backend on a class,
        and on the prompt itself when its vector is known (per-prompt learning).

        Keyed by policy *name*, not by config generation, so learning survives reloads.
        """
        if vector is not None:
            if self.shared is not None:
                # Through the file, then read back with what other workers added meanwhile.
                self.shared.add_neighbour(policy, vector, backend_id, score)
                self._load_neighbours()
            else:
                self.neighbours.add(policy, vector, backend_id, score)
        entry = self.quality.setdefault((policy, class_key, backend_id), [0.0, 0.0])
        entry[0] += 1
        entry[1] += score
        if self.shared is not None:
            self.shared.add_quality((policy, class_key, backend_id), score)

    def observe_outcome(self, policy: str, class_key: str, backend_id: str, ok: bool, latency_ms: float) -> None:
        """Whether a backend answered a request of this class itself (no failover) and how fast."""
        entry = self.outcomes.setdefault((policy, class_key, backend_id), [0.0, 0.0, latency_ms])
        entry[0 if ok else 1] += 1
        entry[2] += LATENCY_ALPHA * (latency_ms - entry[2])
        if self.shared is not None:
            self.shared.add_outcome((policy, class_key, backend_id), ok, latency_ms)

    def success_rate(self, policy: str, class_key: str, backend_id: str) -> float:
        ok, failed, _ = self.outcomes.get((policy, class_key, backend_id), (0.0, 0.0, 0.0))
        return (ok + 1) / (ok + failed + 1)  # Laplace: one assumed success before any outcome

    def expected_quality(
        self,
        policy: PolicyRuntime,
        class_key: str,
        choice: Choice,
        near: Mapping[str, tuple[float, float]] | None = None,
    ) -> float:
        """Declared quality, replaced by what was observed as observations accumulate, times the
        share of this class's requests the backend answered without failing over.

        `near`: what the backend scored on prompts like this one (backend id -> (mean, evidence),
        `Neighbours.estimate`); it replaces the class figure as its evidence grows.
        """
        prior = choice.backend.quality
        if not policy.learning:
            return prior
        n, total = self.quality.get((policy.name, class_key, choice.backend.id), (0.0, 0.0))
        weight = policy.learning_prior_weight
        quality = (prior * weight + total) / (weight + n) if weight + n else prior
        if near and choice.backend.id in near:
            mean, evidence = near[choice.backend.id]
            quality = (mean * evidence + quality * NEIGHBOUR_PRIOR) / (evidence + NEIGHBOUR_PRIOR)
        return quality * self.success_rate(policy.name, class_key, choice.backend.id)


@dataclass(frozen=True, slots=True)
class RequestContext:
    features: Features
    classification: Classification
    hash_key: str
    # API family -> why this request cannot be sent to a backend of it (e.g. "'n' other than 1
    # ...", from the translation): such backends are not eligible.
    refused_apis: Mapping[str, RequestError] = field(default_factory=dict)
    # The prompt's vector, for per-prompt learning (None: the class alone decides).
    vector: np.ndarray | None = None
    # The API the client speaks: a backend that speaks it too needs no translation, so
    # `refused_apis` does not apply to it.
    client_api: str = "openai"


@dataclass(frozen=True, slots=True)
class Selection:
    choice: Choice
    reason: str
    # (backend id, kept, why) for every declared backend, when explain was asked for.
    candidates: tuple[tuple[str, bool, str], ...] = ()


def _weighted(policy_id: str, choices: tuple[Choice, ...], state: SelectionState) -> Choice:
    """Smooth weighted round-robin: exact shares over any window, no randomness needed."""
    current = state.wrr[policy_id]
    total, best = 0, None
    for c in choices:
        current[c.index] = current.get(c.index, 0) + c.weight
        total += c.weight
        if best is None or current[c.index] > current[best.index]:
            best = c
    if best is None or total == 0:
        best = choices[0]
    current[best.index] -= total
    return best


def _required_capabilities(f: Features) -> set[str]:
    needed = set()
    if f.has_tools:
        needed.add("tools")
    if f.has_images:
        needed.add("vision")
    if f.json_mode:
        needed.add("json")
    if f.stream:
        needed.add("streaming")
    if f.embeddings:
        needed.add("embeddings")
    return needed


def select_weighted(p: PolicyRuntime, cs: tuple[Choice, ...], ctx: RequestContext, st: SelectionState):
    return _weighted(p.id, cs, st), "weighted"


def select_round_robin(p: PolicyRuntime, cs: tuple[Choice, ...], ctx: RequestContext, st: SelectionState):
    n = st.rr[p.id]
    st.rr[p.id] = n + 1
    return cs[n % len(cs)], "round-robin"


def select_failover(p: PolicyRuntime, cs: tuple[Choice, ...], ctx: RequestContext, st: SelectionState):
    # Choices are sorted by (priority, listing order): the first is the highest priority alive.
    return cs[0], "failover:priority"


def select_cost(p: PolicyRuntime, cs: tuple[Choice, ...], ctx: RequestContext, st: SelectionState):
    """Cheapest backend that is good enough for this request's class.

    "Good enough" is the per-complexity minimum quality, or, with `cost.qualityTolerance`,
    within that distance of the best eligible backend. Quality is what was learned for this
    class when the policy learns, else what the provider declares.
    """
    cls = ctx.classification
    near = st.neighbours.estimate(p.name, ctx.vector, [c.backend.id for c in cs]) if ctx.vector is not None else {}
    quality = {c.index: st.expected_quality(p, cls.class_key, c, near) for c in cs}

    def price(c: Choice) -> tuple[float, float]:
        return _price(ctx.features, c), -quality[c.index]

    if p.learning and len(cs) > 1 and st.rng.random() < p.learning_exploration_rate:
        return st.rng.choice(cs), "cost:explore"
    if p.quality_tolerance >= 0:
        best_quality = max(quality.values())
        near_best = [c for c in cs if quality[c.index] >= best_quality - p.quality_tolerance]
        return min(near_best, key=price), f"cost:cheapest-within-{p.quality_tolerance:g}-of-best"
    min_q = p.min_quality.get(cls.complexity, 0.0)
    quality_ok = [c for c in cs if quality[c.index] >= min_q]
    if quality_ok:
        return min(quality_ok, key=price), f"cost:cheapest-with-quality>={min_q:g}"
    best = max(cs, key=lambda c: quality[c.index])
    return best, f"cost:none-meets-quality>={min_q:g}-best-available"


def expected_cost_usd(f: Features, b: BackendRuntime) -> float:
    """This request's cost on a backend before it is answered (accounting.expected_usage)."""
    return cost_usd(expected_usage(f.estimated_tokens, f.max_output_tokens), b.input_price, b.output_price)


def _price(f: Features, c: Choice) -> float:
    return expected_cost_usd(f, c.backend)


# Downgrade: a request is held to the quality floor of the complexity one level below its own.
_LOWER = {"expert": "complex", "complex": "moderate", "moderate": "simple", "simple": "simple"}


def select_within_budget(
    p: PolicyRuntime, cs: tuple[Choice, ...], ctx: RequestContext, st: SelectionState, status: BudgetStatus
) -> tuple[Choice, str]:
    """A policy past its downgrade fraction (or exhausted, configured to go cheapest) overrides
    its strategy: spend, not balance or latency, is what matters now."""
    w = status.binding
    tag = f"budget-{status.state}:{w.window}-{w.fraction:.0%}"
    if status.state == EXHAUSTED:
        return min(cs, key=lambda c: (_price(ctx.features, c), c.index)), f"{tag}:cheapest"
    floor = p.min_quality.get(_LOWER.get(ctx.classification.complexity, "simple"), 0.0)
    quality = {c.index: st.expected_quality(p, ctx.classification.class_key, c) for c in cs}
    good_enough = [c for c in cs if quality[c.index] >= floor]
    if good_enough:
        best = min(good_enough, key=lambda c: (_price(ctx.features, c), -quality[c.index]))
        return best, f"{tag}:cheapest-with-quality>={floor:g}"
    return max(cs, key=lambda c: quality[c.index]), f"{tag}:none-meets-quality>={floor:g}-best-available"


def select_latency(p: PolicyRuntime, cs: tuple[Choice, ...], ctx: RequestContext, st: SelectionState):
    if len(cs) > 1 and st.rng.random() < p.exploration_rate:
        return st.rng.choice(cs), "latency:explore"
    best = min(cs, key=lambda c: st.latency_ms.get(c.backend.id, c.backend.latency_prior_ms))
    return best, "latency:lowest-ewma"


def select_least_busy(p: PolicyRuntime, cs: tuple[Choice, ...], ctx: RequestContext, st: SelectionState):
    low = min(st.in_flight[c.backend.id] for c in cs)
    idle = [c for c in cs if st.in_flight[c.backend.id] == low]
    return (idle[0] if len(idle) == 1 else _weighted(p.id, tuple(idle), st)), "least-busy"


def select_hash(p: PolicyRuntime, cs: tuple[Choice, ...], ctx: RequestContext, st: SelectionState):
    # Rendezvous hashing: a key keeps its backend unless that backend leaves the set.
    key = ctx.hash_key.encode()
    best = max(cs, key=lambda c: (zlib.crc32(key + c.backend.id.encode()) * max(c.weight, 1), c.index))
    return best, "hash:sticky"


def select_classified(p: PolicyRuntime, cs: tuple[Choice, ...], ctx: RequestContext, st: SelectionState):
    cls = ctx.classification
    allowed = {c.index for c in cs}
    for n, route in enumerate(p.routes):
        if (not route.task_types or cls.task_type in route.task_types) and (
            not route.complexities or cls.complexity in route.complexities
        ):
            members = tuple(c for c in route.choices if c.index in allowed)
            if members:
                return _weighted(f"{p.id}#{n}", members, st), f"classified:{cls.task_type}/{cls.complexity}"
    return _weighted(p.id, cs, st), f"classified:{cls.task_type}/{cls.complexity}:no-route"


Selector = Callable[[PolicyRuntime, tuple[Choice, ...], RequestContext, SelectionState], tuple[Choice, str]]

SELECTORS: dict[str, Selector] = {
    "weighted": select_weighted,
    "round-robin": select_round_robin,
    "failover": select_failover,
    "fastest": select_failover,  # Envoy hedges to the next backend after the hedge delay
    "cost": select_cost,
    "latency": select_latency,
    "least-busy": select_least_busy,
    "hash": select_hash,
    "classified": select_classified,
}


def eligible(
    policy: PolicyRuntime,
    ctx: RequestContext,
    explain: bool = False,
    cooling: Mapping[str, tuple[float, str]] | None = None,
):
    """Choices that can serve this request at all: capabilities and context window; of those,
    the ones not cooling down (`cooling`: backend id -> (until, reason)) unless every one is (a
    backend that may answer beats a refusal: Envoy fails over from it if it does not)."""
    f = ctx.features
    needed = _required_capabilities(f)
    want_tokens = f.estimated_tokens + f.max_output_tokens
    kept: list[Choice] = []
    notes: list[tuple[str, bool, str]] = []
    healthy = {c.backend.id for c in policy.choices}
    refused = ctx.refused_apis
    for c in policy.choices:
        missing = needed - c.backend.capabilities
        if missing:
            notes.append((c.backend.id, False, f"lacks {','.join(sorted(missing))}"))
        elif c.backend.provider.api in refused and not c.backend.provider.speaks(ctx.client_api):
            notes.append((c.backend.id, False, refused[c.backend.provider.api].message))
        elif want_tokens > c.backend.context_window:
            notes.append((c.backend.id, False, f"context {c.backend.context_window} < {want_tokens} tokens"))
        else:
            kept.append(c)
            notes.append((c.backend.id, True, "eligible"))
    cooling = cooling or {}
    resting = {c.backend.id for c in kept if c.backend.id in cooling}
    if resting and len(resting) < len(kept):
        kept = [c for c in kept if c.backend.id not in resting]
        now = time.time()
        notes = [
            (b, False, f"cooling down ({cooling[b][1]}) for {max(0.0, cooling[b][0] - now):.1f} s")
            if b in resting
            else (b, ok, text)
            for b, ok, text in notes
        ]
    if explain:
        notes += [
            (b.id, False, "api key unavailable" if b.provider.key_missing else "unhealthy")
            for b in policy.all_backends
            if b.id not in healthy
        ]
    return tuple(kept), tuple(notes)


def client_request_error(policy: PolicyRuntime, ctx: RequestContext) -> MalformedRequest | None:
    """The client's own mistake, when that is why no backend can take the request: every backend
    needs a translation, and translating found the request malformed in the client's API (e.g. an
    Anthropic request without `max_tokens`). The client hears that mistake, as its API's provider
    would say it, rather than that no backend fits."""
    if not policy.choices or any(c.backend.provider.speaks(ctx.client_api) for c in policy.choices):
        return None
    errors = [ctx.refused_apis.get(c.backend.provider.api) for c in policy.choices]
    first = errors[0]
    return (
        first if isinstance(first, MalformedRequest) and all(isinstance(e, MalformedRequest) for e in errors) else None
    )


def select(
    policy: PolicyRuntime,
    ctx: RequestContext,
    state: SelectionState,
    explain: bool = False,
    budget: BudgetStatus | None = None,
) -> Selection:
    if not policy.choices:
        raise NoHealthyBackend(f"no healthy backend for policy {policy.name!r}")
    if policy.learning or policy.strategy == "latency":
        state.refresh()
    choices, notes = eligible(policy, ctx, explain, state.cooling())
    if not choices:
        malformed = client_request_error(policy, ctx)
        if malformed is not None:
            raise malformed
        reasons = "; ".join(f"{b}: {why}" for b, _, why in notes)
        raise UnsatisfiableRequest(f"no backend of policy {policy.name!r} can serve this request ({reasons})")
    if budget is not None and budget.state != OK:
        choice, reason = select_within_budget(policy, choices, ctx, state, budget)
    else:
        choice, reason = SELECTORS[policy.strategy](policy, choices, ctx, state)
    return Selection(choice, reason, notes if explain else ())
