"""A rollout's figures and when it pauses: pure, shared by the gateways and the operator.

A rollout's figures are counted per *epoch*: a digest of its `spec.rollout` and of its
candidate's spec. Any edit of either starts a new epoch with fresh figures, which is how a
rollout paused on errors resumes: fix the candidate (or change the rollout) and it runs again,
judged on what it does from then on, not on the errors that paused it.

The gateways count (each replica its own, shared through the replica ConfigMap) and pause a
candidate whose error rate passes the rollout's limit once it has served `minRequests`;
the operator sums the same figures into `status.rollout` of the live policy, with the
`RolloutProgressing` condition and an Event when it pauses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# The figures of one epoch, as every replica counts and publishes them.
REQUESTS = "requests"  # requests of the live policy while the rollout ran
CANDIDATE = "candidate"  # of those, decided by the candidate (shadow: all; canary: its share)
DIFFERS = "differs"  # shadow: the candidate chose another backend
CANDIDATE_ERRORS = "candidate_errors"  # canary: served by it and failed; shadow: it could not decide
LIVE_ERRORS = "live_errors"  # served by the live policy and failed
LIVE_USD = "live_usd"  # canary: real cost of the live side; shadow: the live choices' estimate
CANDIDATE_USD = "candidate_usd"  # canary: real cost of the candidate side; shadow: its choices' estimate
PAUSED = "paused"  # when (epoch seconds) a replica paused it; 0: running
FIELDS = (REQUESTS, CANDIDATE, DIFFERS, CANDIDATE_ERRORS, LIVE_ERRORS, LIVE_USD, CANDIDATE_USD, PAUSED)

Figures = dict[str, float]

SHADOW, CANARY, PAUSED_STATE = "Shadow", "Canary", "Paused"


def epoch(rollout: Mapping[str, Any], candidate_spec: Mapping[str, Any]) -> str:
    """The digest naming one run of a rollout: its spec and its candidate's, as declared
    (camelCase dicts, defaults applied), so the gateways and the operator agree."""
    text = json.dumps([rollout, candidate_spec], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def total(parts: Iterable[Mapping[str, float]]) -> Figures:
    """Figures of one epoch summed over replicas (or workers); `paused` is the earliest pause."""
    out: Figures = dict.fromkeys(FIELDS, 0.0)
    for part in parts:
        for field in FIELDS:
            value = float(part.get(field, 0.0) or 0.0)
            if field == PAUSED:
                if value > 0 and (out[PAUSED] == 0 or value < out[PAUSED]):
                    out[PAUSED] = value
            else:
                out[field] += value
    return out


@dataclass(frozen=True)
class PauseRule:
    """Pause when the candidate failed more than `max_error_rate` of at least `min_requests`."""

    max_error_rate: float
    min_requests: int

    def breached(self, figures: Mapping[str, float]) -> bool:
        decided = figures.get(CANDIDATE, 0.0)
        if decided < max(self.min_requests, 1):
            return False
        return figures.get(CANDIDATE_ERRORS, 0.0) / decided > self.max_error_rate


def error_rate(figures: Mapping[str, float]) -> float:
    decided = figures.get(CANDIDATE, 0.0)
    return figures.get(CANDIDATE_ERRORS, 0.0) / decided if decided else 0.0


def describe_pause(candidate: str, figures: Mapping[str, float], rule: PauseRule) -> str:
    errors, decided = int(figures.get(CANDIDATE_ERRORS, 0)), int(figures.get(CANDIDATE, 0))
    return (
        f"candidate {candidate} failed {errors} of {decided} requests "
        f"({error_rate(figures):.0%} > {rule.max_error_rate:.0%}): paused, the live policy serves everything; "
        "edit the candidate or spec.rollout to resume"
    )


def status(
    candidate: str, canary: bool, percent: float, run: str, figures: Mapping[str, float], rule: PauseRule
) -> dict[str, Any]:
    """`status.rollout` of a live policy: its state and the figures of the current epoch."""
    decided, requests = figures.get(CANDIDATE, 0.0), figures.get(REQUESTS, 0.0)
    paused = figures.get(PAUSED, 0.0) > 0
    out: dict[str, Any] = {
        "state": PAUSED_STATE if paused else (CANARY if canary else SHADOW),
        "candidate": candidate,
        "epoch": run,
        "requests": int(requests),
        "candidateRequests": int(decided),
        "candidateErrors": int(figures.get(CANDIDATE_ERRORS, 0.0)),
        "liveErrors": int(figures.get(LIVE_ERRORS, 0.0)),
        "liveCostUsd": round(figures.get(LIVE_USD, 0.0), 6),
        "candidateCostUsd": round(figures.get(CANDIDATE_USD, 0.0), 6),
    }
    if canary:
        out["percent"] = percent
    else:
        out["differingPercent"] = round(100 * figures.get(DIFFERS, 0.0) / decided, 2) if decided else 0.0
    if paused:
        out["message"] = describe_pause(candidate, figures, rule)
    return out
