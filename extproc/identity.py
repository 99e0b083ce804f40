"""Who is calling: a consumer by its gateway API key (hash) or its JWT (verified by Envoy).

Envoy's jwt_authn checks a token's signature, issuer, audience and expiry before the router
phase and leaves the verified payload in metadata; only then does a token count here. An API key
is compared by its SHA-256 (`core.consumers.key_hash`) against the hashes in the config, so
the gateway never holds a key it could leak. With no consumer declared nobody is identified and
every policy serves everyone, as before consumers existed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core.envoygen.contract import KEY_HEADERS
from signalbox.core.errors import ModelNotAllowed, Unauthenticated
from signalbox.core.keys import key_hash
from signalbox.core.limits import SubjectLimits

if TYPE_CHECKING:
    from .runtime import PolicyRuntime

ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class ConsumerRuntime:
    id: str
    name: str
    team: str
    aliases: frozenset[str]
    policies: frozenset[str]
    limits: SubjectLimits | None

    def may_use(self, policy: PolicyRuntime, alias: str) -> bool:
        if not self.aliases and not self.policies:
            return True
        return alias in self.aliases or policy.id in self.policies


@dataclass(frozen=True, slots=True)
class Identities:
    """The consumers of one config, indexed for the request path."""

    by_hash: Mapping[str, tuple[ConsumerRuntime, int]]  # sha256 -> (consumer, expires unix or 0)
    by_jwt: tuple[tuple[str, tuple[tuple[str, str], ...], ConsumerRuntime], ...]  # (issuer, claims, consumer)
    consumers: Mapping[str, ConsumerRuntime]

    @property
    def enabled(self) -> bool:
        return bool(self.consumers)

    @classmethod
    def empty(cls) -> Identities:
        return cls({}, (), {})

    @classmethod
    def from_config(cls, cfg: pb.RoutingConfig) -> Identities:
        by_hash: dict[str, tuple[ConsumerRuntime, int]] = {}
        by_jwt = []
        consumers = {}
        for c in cfg.consumers:
            runtime = ConsumerRuntime(
                id=c.id,
                name=c.name,
                team=c.team,
                aliases=frozenset(c.aliases),
                policies=frozenset(c.policies),
                limits=subject_limits(f"consumer:{c.id}", f"consumer {c.id}", c.limits, c.budget)
                if c.HasField("limits") or c.HasField("budget")
                else None,
            )
            consumers[c.id] = runtime
            for k in c.keys:
                by_hash[k.sha256] = (runtime, k.expires_unix)
            for m in c.jwt:
                by_jwt.append((m.issuer, tuple(sorted(m.claims.items())), runtime))
        return cls(by_hash, tuple(by_jwt), consumers)

    def identify(self, headers: Mapping[str, str], jwt_payload: Mapping[str, Any] | None, now: float):
        """The consumer the request's credentials name, or None (anonymous: no credential, or
        one that names nobody: the policy decides whether that may pass)."""
        if not self.enabled:
            return None
        if jwt_payload:
            issuer = jwt_payload.get("iss")
            for want_issuer, claims, consumer in self.by_jwt:
                if issuer == want_issuer and all(_claim_has(jwt_payload.get(k), v) for k, v in claims):
                    return consumer
        for name in KEY_HEADERS:
            value = headers.get(name, "")
            if not value:
                continue
            if name == "authorization":
                scheme, _, value = value.partition(" ")
                if scheme.lower() != "bearer":
                    continue
            found = self.by_hash.get(key_hash(value))
            if found is not None and (not found[1] or now < found[1]):
                return found[0]
        return None


def _claim_has(value: Any, want: str) -> bool:
    if isinstance(value, list):
        return want in [str(v) for v in value]
    return value is not None and str(value) == want


def presented(headers: Mapping[str, str]) -> bool:
    return any(headers.get(h) for h in KEY_HEADERS)


def authorize(
    identities: Identities,
    consumer: ConsumerRuntime | None,
    policy: PolicyRuntime,
    alias: str,
    headers: Mapping[str, str],
) -> None:
    """401 for an anonymous caller of a policy that does not serve them, 403 for a consumer on
    an alias it was not given; nothing when no consumer is declared."""
    if not identities.enabled:
        return
    if consumer is None:
        if policy.allow_anonymous:
            return
        _refuse_anonymous(headers)
    if not consumer.may_use(policy, alias):
        raise ModelNotAllowed(f"consumer {consumer.id} may not use model {alias!r}", param="model")


def authorize_feedback(
    identities: Identities,
    consumer: ConsumerRuntime | None,
    policy: PolicyRuntime,
    by_alias: Mapping[str, tuple[PolicyRuntime, ...]],
    headers: Mapping[str, str],
) -> None:
    """Feedback teaches a policy what every caller of it then gets: once consumers exist, only
    a caller who may call one of its aliases may send it (401 and 403 as for a request)."""
    if not identities.enabled:
        return
    if consumer is None:
        if not policy.allow_anonymous:
            _refuse_anonymous(headers)
        return
    if any(consumer.may_use(policy, a) for a, ps in by_alias.items() if any(p is policy for p in ps)):
        return
    raise ModelNotAllowed(f"consumer {consumer.id} may not use policy {policy.name!r}, which the decision names")


def visible_aliases(
    identities: Identities,
    consumer: ConsumerRuntime | None,
    by_alias: Mapping[str, tuple[PolicyRuntime, ...]],
    headers: Mapping[str, str],
) -> list[str]:
    """The aliases the models API lists for this caller, sorted: those `authorize` would let it
    call (a consumer's own; an anonymous caller's, of policies that serve anonymous callers).
    An anonymous caller that could call none gets the 401 it would get calling any of them."""
    if not identities.enabled:
        return sorted(by_alias)
    if consumer is not None:
        return sorted(a for a, ps in by_alias.items() if any(consumer.may_use(p, a) for p in ps))
    public = sorted(a for a, ps in by_alias.items() if any(p.allow_anonymous for p in ps))
    if not public:
        _refuse_anonymous(headers)
    return public


def _refuse_anonymous(headers: Mapping[str, str]) -> NoReturn:
    if presented(headers):
        raise Unauthenticated(
            "the API key or token presented is not valid for this gateway (unknown, revoked or expired)"
        )
    raise Unauthenticated("this gateway needs an API key (Authorization: Bearer <key>, or x-api-key) or a token")


def subject_limits(subject: str, label: str, limits: pb.RateLimits, budget: pb.ConsumerBudget | None = None):
    has_budget = budget is not None and bool(budget.hourly_usd or budget.daily_usd or budget.monthly_usd)
    return SubjectLimits(
        subject=subject,
        label=label,
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        max_concurrent=limits.max_concurrent,
        budget_usd=(budget.hourly_usd, budget.daily_usd, budget.monthly_usd) if has_budget and budget else (0, 0, 0),
        downgrade_at=budget.downgrade_at if has_budget and budget else 1.0,
        reject_when_exhausted=budget.reject_when_exhausted if has_budget and budget else True,
        count_cached_tokens=limits.count_cached_tokens if limits.ByteSize() else True,
        fail_closed=limits.fail_closed,
        budget_fail_closed=budget.fail_closed if has_budget and budget else False,
    )
