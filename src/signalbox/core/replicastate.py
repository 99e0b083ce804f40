"""The state one gateway replica publishes for the others: its key of the replica ConfigMap.

A JSON object: `day` (start of the UTC day it describes), `spend` (policy -> hourly bucket ->
USD), `held` (policy -> [USD held by requests in flight, until]), `learning` (table ->
rows), `cooldown` (backend -> [until, reason]: backends its attempts put to rest) and
`rollouts` (epoch -> figure -> value: what its requests counted of each rollout). Learning's
tables are `quality` and `outcomes` (class-level counts) and `neighbours` (its newest
per-prompt observations: [reference, policy, backend, score, vector as float16 in base64]).
Gateways write and read it (`signalbox.replicasync`); the operator reads it to report spend in
RoutingPolicy status. Pure: no Kubernetes, no SQLite.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np

Spend = dict[str, dict[int, float]]  # policy -> hourly bucket -> USD
Held = dict[str, tuple[float, float]]  # policy -> (USD held by requests in flight, until)
Learning = dict[str, list[list[object]]]  # table -> rows
Resting = dict[str, tuple[float, str]]  # backend id -> (until, reason): backends cooling down
Rollouts = dict[str, dict[str, float]]  # rollout epoch -> figure -> value (core/rollouts.py)
# The longest prompt vector read from another replica (the semantic tier's has 256 values).
MAX_VECTOR = 4096


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
        learning["neighbours"] = _valid_rows(data["learning"].get("neighbours", []))
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


def encode_vector(vector: np.ndarray) -> str:
    """A prompt vector as published: float16 (what the embedding rows are stored as) in base64."""
    return base64.b64encode(np.asarray(vector, dtype=np.float16).tobytes()).decode("ascii")


def decode_vector(text: str) -> np.ndarray:
    """The float32 vector of `encode_vector`'s text; ValueError if it is not one (odd length, not
    base64, or not finite)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64") from exc
    if not raw or len(raw) % 2 or len(raw) > 2 * MAX_VECTOR:
        raise ValueError("not float16 values")
    vector = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
    if not np.isfinite(vector).all():
        raise ValueError("not finite")
    return vector


def neighbour_row(row: object) -> list[object]:
    """One published per-prompt observation, checked: [reference, policy, backend, score in
    0..1, vector text]; ValueError otherwise."""
    if not isinstance(row, list) or len(row) != 5:
        raise ValueError("not a 5-item row")
    ref, policy, backend, score, vector = row
    if not all(isinstance(v, str) and v for v in (ref, policy, backend, vector)):
        raise ValueError("reference, policy, backend and vector are strings")
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise ValueError("score is a number")
    if not 0.0 <= score <= 1.0:
        raise ValueError("score is within 0..1")
    decode_vector(vector)
    return [ref, policy, backend, float(score), vector]


def _valid_rows(rows: object) -> list[list[object]]:
    """The well-formed per-prompt observations of a replica's key (another version's or a
    damaged row is left out, not the whole key)."""
    if not isinstance(rows, list):
        return []
    out = []
    for row in rows:
        try:
            out.append(neighbour_row(row))
        except ValueError:
            continue
    return out
