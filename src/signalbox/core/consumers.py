"""Consumers in the compiled config: key hashes, JWT issuers, what each may call, its limits.

Keys themselves are made and hashed in `core.keys`. Pure like the rest of the compiler: the
caller resolves each consumer's keys (operator: its Secret; local runs: its env variable or
file) and passes their hashes in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence

from signalbox.api.v1alpha1 import config_pb2 as pb

from .errors import Problem
from .models import Consumer, OnExhausted, RateLimits, StoreUnavailable

KeyHashes = Mapping[str, Sequence[tuple[str, int]]]


def secret_name(consumer: Consumer) -> str:
    spec = consumer.spec.api_key
    return (spec.secret_name if spec and spec.secret_name else "") or f"{consumer.metadata.name}-api-key"


def jwt_provider_name(issuer: str) -> str:
    """jwt_authn provider name for an issuer: readable and unique (digest of the issuer)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", issuer).strip("-")[:40]
    return f"{slug}-{hashlib.sha256(issuer.encode()).hexdigest()[:8]}"


def rate_limits(spec: RateLimits) -> pb.RateLimits:
    return pb.RateLimits(
        requests_per_minute=spec.requests_per_minute or 0,
        tokens_per_minute=spec.tokens_per_minute or 0,
        max_concurrent=spec.max_concurrent or 0,
        count_cached_tokens=spec.count_cached_tokens,
        fail_closed=spec.when_store_unavailable == StoreUnavailable.REFUSE,
    )


def add_consumers(
    cfg: pb.RoutingConfig,
    consumers: Iterable[Consumer],
    key_hashes: KeyHashes,
    problems: list[Problem],
) -> None:
    """Append every consumer (sorted by id) and the JWT issuers they trust to `cfg`.

    `key_hashes`: consumer id -> [(sha256, expires unix or 0)]; a consumer with an `apiKey` but
    no hash yet (its Secret is not written) is kept: its keys are simply not accepted yet.
    """
    policy_ids = {p.id for p in cfg.policies}
    aliases = {a for p in cfg.policies for a in p.aliases}
    issuers: dict[str, pb.JwtProvider] = {}
    for consumer in sorted(consumers, key=lambda c: c.key):
        spec, meta = consumer.spec, consumer.metadata
        out = pb.Consumer(id=consumer.key, name=meta.name, team=spec.team, aliases=spec.models)
        for i, ref in enumerate(spec.policies):
            policy_id = ref if "/" in ref else f"{meta.namespace}/{ref}"
            if policy_id not in policy_ids:
                problems.append(
                    Problem(
                        "Consumer",
                        meta.name,
                        f"spec.policies[{i}]",
                        f"RoutingPolicy {policy_id} not found",
                        meta.namespace,
                        "RefNotFound",
                    )
                )
            out.policies.append(policy_id)
        for i, alias in enumerate(spec.models):
            if alias not in aliases:
                problems.append(
                    Problem(
                        "Consumer",
                        meta.name,
                        f"spec.models[{i}]",
                        f"no RoutingPolicy serves alias {alias!r}",
                        meta.namespace,
                        "RefNotFound",
                    )
                )
        if not spec.disabled:
            if spec.api_key is not None:
                out.keys.extend(pb.KeyHash(sha256=h, expires_unix=e) for h, e in key_hashes.get(consumer.key, ()))
            if spec.jwt is not None:
                jwt = spec.jwt
                provider = pb.JwtProvider(
                    name=jwt_provider_name(jwt.issuer),
                    issuer=jwt.issuer,
                    audiences=sorted(jwt.audiences),
                    jwks=jwt.jwks or "",
                    jwks_uri=jwt.jwks_uri or "",
                )
                known = issuers.setdefault(jwt.issuer, provider)
                if known != provider:
                    problems.append(
                        Problem(
                            "Consumer",
                            meta.name,
                            "spec.jwt",
                            f"issuer {jwt.issuer!r} is declared with other keys or audiences by another "
                            "Consumer: one issuer, one JWKS and audience list",
                            meta.namespace,
                        )
                    )
                out.jwt.append(pb.JwtMatch(issuer=jwt.issuer, claims=jwt.claims))
        limits = spec.limits
        if limits is not None:
            out.limits.CopyFrom(rate_limits(limits))
            if limits.budget is not None:
                b = limits.budget
                out.budget.CopyFrom(
                    pb.ConsumerBudget(
                        hourly_usd=b.hourly_usd or 0.0,
                        daily_usd=b.daily_usd or 0.0,
                        monthly_usd=b.monthly_usd or 0.0,
                        downgrade_at=b.downgrade_at,
                        reject_when_exhausted=b.on_exhausted == OnExhausted.REJECT,
                        fail_closed=b.when_store_unavailable == StoreUnavailable.REFUSE,
                    )
                )
        cfg.consumers.append(out)
    cfg.jwt_providers.extend(issuers[i] for i in sorted(issuers))
