"""An AIProvider's models the gateways have cooling down, for its status (`kubectl get aip`).

The gateways decide and enforce cooldowns themselves (`signalbox.extproc.cooldown`: a 429 with
its Retry-After, a rejected key, rate-limit headers near zero); each replica publishes the ones
its attempts started in its key of the replica ConfigMap. The operator only reports: it reads
that ConfigMap once per interval for all providers (`ReplicaView`), and each provider's status
lists its resting models, the longest rest across replicas winning.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from signalbox.core.replicastate import decode_resting

# The longest a provider's status lags what the replicas published (plus their own interval).
COOLDOWN_STATUS_SECONDS = 5.0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def provider_cooldowns(provider_id: str, replicas: Mapping[str, str], now: float) -> list[dict[str, Any]]:
    """`status.cooldowns` of one provider ("namespace/name") from the replica ConfigMap's data:
    one entry per resting model, sorted by model (unreadable keys rest nothing)."""
    prefix = provider_id + "/"
    resting: dict[str, dict[str, Any]] = {}
    for key, raw in replicas.items():
        if not key.endswith(".json"):
            continue
        replica = key.removesuffix(".json")
        for backend, (until, reason) in decode_resting(raw).items():
            if not backend.startswith(prefix) or until <= now:
                continue
            model = backend.removeprefix(prefix)
            entry = resting.setdefault(model, {"model": model, "until": until, "reason": reason, "replicas": []})
            entry["replicas"].append(replica)
            if until > entry["until"]:
                entry["until"], entry["reason"] = until, reason
    return [
        {**entry, "until": _iso(entry["until"]), "replicas": sorted(entry["replicas"])}
        for _, entry in sorted(resting.items())
    ]


class ReplicaView:
    """The replica ConfigMap's data, read at most once per `ttl` however many providers ask."""

    def __init__(self, read: Callable[[], Awaitable[dict[str, Any] | None]], ttl: float):
        self._read, self.ttl = read, ttl
        self._lock = asyncio.Lock()
        self._at = float("-inf")
        self._data: dict[str, str] = {}

    async def data(self) -> dict[str, str]:
        async with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                published = await self._read()
                self._data, self._at = dict((published or {}).get("data", {})), time.monotonic()
            return self._data
