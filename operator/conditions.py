"""Status conditions from compile problems: pure functions, no Kubernetes I/O.

Accepted: the object itself is valid (reason Invalid otherwise, message lists JSON paths).
ResolvedRefs: everything it names exists (providers, models, Secrets).
Ready: accepted, resolved and carried by the routing config now in force.
A condition keeps its lastTransitionTime while its status does not change.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

from signalbox.core.errors import Problem

ACCEPTED, RESOLVED, READY, HEALTHY = "Accepted", "ResolvedRefs", "Ready", "Healthy"


def now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(kind: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def _messages(problems: Iterable[Problem]) -> str:
    return "; ".join(f"{p.path}: {p.message}" for p in problems)


def for_object(
    problems: list[Problem], generation: int, published: bool, blocked_by: list[Problem], config_generation: int
) -> list[dict[str, Any]]:
    """Accepted/ResolvedRefs/Ready for one object, given its own problems and everyone else's."""
    invalid = [p for p in problems if p.reason == "Invalid"]
    missing = [p for p in problems if p.reason == "RefNotFound"]
    out = [
        condition(
            ACCEPTED, not invalid, "Invalid" if invalid else "Accepted", _messages(invalid) or "valid", generation
        ),
        condition(
            RESOLVED,
            not missing,
            "RefNotFound" if missing else "ResolvedRefs",
            _messages(missing) or "all references resolved",
            generation,
        ),
    ]
    if invalid or missing:
        out.append(
            condition(
                READY, False, "NotAccepted", "fix the problems above; the last good config stays in force", generation
            )
        )
    elif not published:
        others = "; ".join(str(p) for p in blocked_by[:5])
        out.append(
            condition(
                READY,
                False,
                "ConfigNotPublished",
                f"other resources have problems, config not updated: {others}",
                generation,
            )
        )
    else:
        out.append(condition(READY, True, "InForce", f"in routing config generation {config_generation}", generation))
    return out


def health(status: dict[str, Any], generation: int) -> dict[str, Any]:
    """Healthy, from what the probes wrote to status.health (the probes write no conditions)."""
    ok = bool(status.get("healthy"))
    message = str(status.get("message") or ("probe succeeded" if ok else "probe failed"))
    return condition(HEALTHY, ok, "ProbeSucceeded" if ok else "ProbeFailed", message, generation)


def merge(previous: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """New conditions, keeping lastTransitionTime where the status did not change, and other types."""
    old = {c.get("type"): c for c in previous or []}
    stamp = now()
    merged = []
    for c in new:
        before = old.get(c["type"])
        same = before is not None and before.get("status") == c["status"]
        merged.append(
            {**c, "lastTransitionTime": before.get("lastTransitionTime", stamp) if same and before else stamp}
        )
    kept = [c for t, c in old.items() if t not in {c["type"] for c in new}]
    return sorted(kept + merged, key=lambda c: str(c.get("type")))


def changed(previous: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conditions in `new` whose status or reason differ from `previous` (for Events)."""
    old = {c.get("type"): c for c in previous or []}
    return [
        c
        for c in new
        if (old.get(c["type"]) or {}).get("status") != c["status"]
        or (old.get(c["type"]) or {}).get("reason") != c["reason"]
    ]


def strip_times(conditions: list[dict[str, Any]]) -> list[tuple]:
    return sorted(
        (c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration"))
        for c in conditions or []
    )
