"""A Consumer's spend against its budget, in `status.spend` (what `kubectl get consumers` shows).

The gateways count spend in the shared limit store (Redis; extproc.redislimits), so the
operator reads it there (the keys are `core.limits.usd_key`): one MGET of three counters per
budgeted consumer per interval. With
the embedded store (no Redis) each replica counts alone and nothing is reported here: the
gateway's admin API and its metrics say what that replica spent.
"""

from __future__ import annotations

import datetime
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError

from signalbox.core.limits import BUDGET_WINDOWS, SubjectLimits, Windows, budget_status, usd_key
from signalbox.core.models import ConsumerSpec


def subject(namespace: str, name: str, spec: ConsumerSpec) -> SubjectLimits | None:
    budget = spec.limits.budget if spec.limits else None
    if budget is None:
        return None
    return SubjectLimits(
        subject=f"consumer:{namespace}/{name}",
        label=f"consumer {namespace}/{name}",
        budget_usd=(budget.hourly_usd or 0.0, budget.daily_usd or 0.0, budget.monthly_usd or 0.0),
        downgrade_at=budget.downgrade_at,
    )


def client(url: str, password: str | None) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, password=password or None)


async def read_spend(redis: aioredis.Redis, subject_id: str, now: float) -> tuple[float, float, float] | None:
    w = Windows.at(now)
    keys = [usd_key(subject_id, n, s) for n, s in zip(BUDGET_WINDOWS, w.budget_starts(), strict=True)]
    try:
        values = await redis.mget(keys)
    except (RedisError, OSError):
        return None
    hour, day, month = (float(v) if v is not None else 0.0 for v in values)
    return hour, day, month


async def spend(redis: aioredis.Redis, body: dict[str, Any], now: float) -> dict[str, Any] | None:
    """status.spend for the window closest to its limit, or None (no budget, store down)."""
    meta = body.get("metadata") or {}
    try:
        spec = ConsumerSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return None  # the reconciler says why in the conditions
    limits = subject(meta.get("namespace") or "default", meta["name"], spec)
    if limits is None:
        return None
    spent = await read_spend(redis, limits.subject, now)
    if spent is None:
        return None  # unreachable: the status keeps its last figures
    w = budget_status(limits, spent, 0.0, now).binding
    assert w.window in BUDGET_WINDOWS
    return {
        "window": w.window,
        "spentUsd": round(w.spent_usd, 6),
        "limitUsd": w.limit_usd,
        "remainingUsd": round(w.remaining_usd, 6),
        "resetsAt": datetime.datetime.fromtimestamp(w.resets_at, datetime.UTC).isoformat().replace("+00:00", "Z"),
    }
