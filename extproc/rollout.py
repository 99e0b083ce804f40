"""Trying a candidate policy on a live policy's traffic: shadow and canary (issue 17).

A policy's `spec.rollout` names a candidate RoutingPolicy. In **canary** mode a stable share
of callers (by a sticky key: a header, else the client address) is decided and served by the
candidate; the key is hashed with the policy's id, so one caller stays on one side for as long
as the share does not change, and raising the share only moves callers to the candidate. In
**shadow** mode every request is decided by the live policy and served so; the candidate then
decides the same request (classification and selection only: no budget hold, nothing sent),
and the pair is recorded: metrics, the response's `x-signalbox-rollout` and the request log. A
candidate that fails to decide never fails the live request.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

from . import decide
from .runtime import RuntimeTable

# Buckets of the sticky hash: shares are honoured to 0.01 %.
BUCKETS = 10_000


def bucket(policy_id: str, key: str) -> float:
    """The caller's place in [0, 100): below the canary's percent, the candidate serves it."""
    return zlib.crc32(f"{policy_id}|{key}".encode()) % BUCKETS * 100 / BUCKETS


def serves_candidate(policy_id: str, key: str, percent: float) -> bool:
    return bucket(policy_id, key) < percent


class Sides(NamedTuple):
    """What a rollout does with one request: who serves it, who shadows it, and the note the
    response header and the request log carry ("" without a rollout)."""

    serve: decide.Prepared
    shadow: decide.Prepared | None
    note: str


def sides(table: RuntimeTable, prepared: decide.Prepared, headers: dict[str, str], raw: bytes, address: str) -> Sides:
    """The rollout of the request's policy applied, as the router phase and `signalbox replay`
    both do (a pause is the caller's: it needs the gateways' figures)."""
    live = prepared.policy
    spec = live.rollout
    candidate = table.by_id.get(spec.candidate) if spec is not None else None
    if spec is None or candidate is None:
        return Sides(prepared, None, "")
    if not spec.canary:
        return Sides(prepared, decide.prepare_candidate(prepared, candidate, raw, address), "")
    key = (headers.get(spec.sticky_header, "") if spec.sticky_header else "") or address
    if not serves_candidate(live.id, key, spec.percent):
        return Sides(prepared, None, "live")
    return Sides(decide.prepare_candidate(prepared, candidate, raw, address), None, f"canary:{candidate.name}")
