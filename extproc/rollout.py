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

# Buckets of the sticky hash: shares are honoured to 0.01 %.
BUCKETS = 10_000


def bucket(policy_id: str, key: str) -> float:
    """The caller's place in [0, 100): below the canary's percent, the candidate serves it."""
    return zlib.crc32(f"{policy_id}|{key}".encode()) % BUCKETS * 100 / BUCKETS


def serves_candidate(policy_id: str, key: str, percent: float) -> bool:
    return bucket(policy_id, key) < percent
