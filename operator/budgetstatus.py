"""A budgeted RoutingPolicy's spend, for its status (`kubectl get routingpolicies`).

The gateways enforce budgets from their own ledgers; the operator only reports. It reads the
ConfigMap the gateway replicas publish their state to (`signalbox.replicasync`) and puts
every replica's spend and in-flight holds through the same pure assessment the gateways use,
so the state in status is the one the gateways act on, up to one publishing interval.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from signalbox.core.budget import DAY, Budget, assess, window_start
from signalbox.core.models import BudgetSpec, OnExhausted
from signalbox.core.replicastate import decode


def summarize(policy_id: str, spec: BudgetSpec, replicas: dict[str, str], now: float) -> dict[str, Any]:
    """`status.budget` of one policy from the replica ConfigMap's data (replica keys as
    published; unreadable keys and earlier days' are skipped, as replicas skip them)."""
    buckets: dict[int, float] = {}
    in_flight = 0.0
    today = window_start(now, DAY)
    for key, raw in replicas.items():
        decoded = decode(raw) if key.endswith(".json") else None
        if decoded is None or decoded[0] < today:
            continue
        _, spend, _, held = decoded
        for bucket, usd in spend.get(policy_id, {}).items():
            buckets[bucket] = buckets.get(bucket, 0.0) + usd
        usd, until = held.get(policy_id, (0.0, 0.0))
        in_flight += usd if until > now else 0.0
    budget = Budget(
        spec.hourly_usd or 0.0, spec.daily_usd or 0.0, spec.downgrade_at, spec.on_exhausted == OnExhausted.REJECT
    )
    status = assess(budget, [(bucket, 0.0, usd) for bucket, usd in buckets.items()], now, in_flight)
    return {
        "state": status.state,
        "windows": [
            {
                "window": w.window,
                "limitUsd": w.limit_usd,
                "spentUsd": round(w.spent_usd, 6),
                "inFlightUsd": round(w.in_flight_usd, 6),
                "resetsAt": datetime.fromtimestamp(w.resets_at, UTC).isoformat().replace("+00:00", "Z"),
            }
            for w in status.windows
        ],
    }
