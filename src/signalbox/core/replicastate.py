"""The state one gateway replica publishes for the others: its key of the replica ConfigMap.

A JSON object: `day` (start of the UTC day it describes), `spend` (policy -> hourly bucket ->
USD), `held` (policy -> [USD held by requests in flight, until]), `learning` (table ->
rows), `cooldown` (backend -> [until, reason]: backends its attempts put to rest) and
`rollouts` (epoch -> figure -> value: what its requests counted of each rollout).
Gateways write and read it (`signalbox.replicasync`); the operator reads it to report spend in
RoutingPolicy status. Pure: no Kubernetes, no SQLite.
"""

from __future__ import annotations

import json
from typing import Any

Spend = dict[str, dict[int, float]]  # policy -> hourly bucket -> USD
Held = dict[str, tuple[float, float]]  # policy -> (USD held by requests in flight, until)
Learning = dict[str, list[list[object]]]  # table -> rows
Resting = dict[str, tuple[float, str]]  # backend id -> (until, reason): backends cooling down
Rollouts = dict[str, dict[str, float]]  # rollout epoch -> figure -> value (core/rollouts.py)


def encode(
    day: int,
    spend: Spend,
    learning: Learning,
    held: Held | None = None,
    resting: Resting | None = None,
    rollouts: Rollouts | None = None,
) -> str:
    payload: dict[str, Any] = {
        "day": day,
        "spend": {policy: {str(b): usd for b, usd in sorted(buckets.items())} for policy, buckets in spend.items()},
        "learning": learning,
    }
    if held:
        payload["held"] = {policy: [usd, until] for policy, (usd, until) in held.items()}
    if resting:
        payload["cooldown"] = {backend: [until, reason] for backend, (until, reason) in sorted(resting.items())}
    if rollouts:
        payload["rollouts"] = rollouts
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def decode(raw: str) -> tuple[int, Spend, Learning, Held] | None:
    """(day, spend, learning, held) of a replica's key; None if the value is not ours to read."""
    try:
        data = json.loads(raw)
        spend = {
            str(policy): {int(b): float(usd) for b, usd in buckets.items()} for policy, buckets in data["spend"].items()
        }
        learning = {table: [list(row) for row in data["learning"].get(table, [])] for table in ("quality", "outcomes")}
        held = {str(policy): (float(usd), float(until)) for policy, (usd, until) in data.get("held", {}).items()}
        return int(data["day"]), spend, learning, held
    except (ValueError, TypeError, AttributeError, KeyError):
        return None


def decode_resting(raw: str) -> Resting:
    """The backends a replica has cooling down (`cooldown`: backend -> [until, reason]); empty
    when the key has none or is not ours to read."""
    try:
        data = json.loads(raw).get("cooldown", {})
        return {str(backend): (float(until), str(reason)) for backend, (until, reason) in data.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


def decode_rollouts(raw: str) -> Rollouts:
    """A replica's rollout figures (`rollouts`: epoch -> figure -> value); empty when the key
    has none or is not ours to read."""
    try:
        data = json.loads(raw).get("rollouts", {})
        return {str(epoch): {str(f): float(v) for f, v in figures.items()} for epoch, figures in data.items()}
    except (ValueError, TypeError, AttributeError):
        return {}
