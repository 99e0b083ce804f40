"""Envoy's outlier ejections, made visible (issue 13: circuit breaking).

Envoy's outlier detection takes a backend that fails repeatedly (5 consecutive 5xx) out of
every request on that Envoy, then tries it again after the ejection time. Envoy decides
alone; what it did was only in its own stats. Its outlier event log (bootstrap
`cluster_manager.outlier_detection.event_log_path`, one JSON `OutlierDetectionEvent` per line)
is read here and each enforced ejection of a backend cluster becomes a rest with reason
`ejected` in the cooldown store, for as long as Envoy's ejection lasts (its UNEJECT ends it).
From there it reaches what every cooldown reaches:

- the explain API (`/v1/models`: `cooling_down`, reason `ejected`) and the metric
  `signalbox_cooldowns_total{reason="ejected"}`;
- the router phase, which stops choosing it first;
- the other replicas (replica ConfigMap), whose Envoys take it out on their next health check,
  and `AIProvider` status.cooldowns, written by the operator from the same ConfigMap.

One reader per gateway (the ext_proc worker that serves the admin API). It reads the file from
the start, so a restarted worker rebuilds the ejections still running; past ones are skipped.

The rest sends the backend's cluster again (extproc/xds.py), and Envoy builds a changed cluster
anew: its outlier detector starts from nothing, so every event after that says it is the
host's first ejection. Envoy alone would make each further ejection of a host that keeps failing
longer (15, 30, 45 s ... up to 300 s). So the reader counts a backend's ejections itself, the way
Envoy does (one more per ejection, one less per detection interval the host spent back in
service), and a backend that keeps failing rests longer each time instead of costing five failed
attempts every 15 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from envoy.data.cluster.v3 import outlier_detection_event_pb2 as od
from google.protobuf import json_format

from signalbox.core.envoygen.contract import OUTLIER_BASE_EJECTION_S, OUTLIER_INTERVAL_S, OUTLIER_MAX_EJECTION_S

from .cooldown import EJECTED, Cooldowns
from .metrics import Metrics
from .reload import TableHolder

log = logging.getLogger("signalbox.extproc")

READ_EVERY_S = 0.5
# A line longer than this is not an event of Envoy's: skipped, never held.
MAX_LINE_BYTES = 64 * 1024


def ejection_seconds(num_ejections: int) -> float:
    """How long Envoy keeps a host out on its n-th ejection (base times n, capped)."""
    return float(min(OUTLIER_BASE_EJECTION_S * max(num_ejections, 1), OUTLIER_MAX_EJECTION_S))


def parse(line: bytes) -> od.OutlierDetectionEvent | None:
    """One line of Envoy's outlier event log; None when it is not one."""
    event = od.OutlierDetectionEvent()
    try:
        json_format.Parse(line.decode("utf-8"), event, ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError, ValueError, TypeError, RecursionError):
        return None
    return event if event.cluster_name else None


class OutlierEvents:
    def __init__(self, path: str | Path, tables: TableHolder, cooldowns: Cooldowns, metrics: Metrics):
        self.path = Path(path)
        self.tables, self.cooldowns, self.metrics = tables, cooldowns, metrics
        self.offset = 0
        self.partial = b""
        # Backend id -> (its ejections as counted, when the last one ends): what Envoy's rebuilt
        # detector forgot (module docstring).
        self.strikes: dict[str, tuple[int, float]] = {}

    def read_new(self, now: float | None = None) -> int:
        """Apply the events appended since the last read; returns how many were applied."""
        now = time.time() if now is None else now
        try:
            with self.path.open("rb") as f:
                size = f.seek(0, 2)
                if size < self.offset:  # a new file (Envoy restarted on a fresh work dir)
                    self.offset, self.partial = 0, b""
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return 0  # no ejection yet: Envoy creates the file with its first event
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > MAX_LINE_BYTES:
            self.partial = b""
        applied = 0
        for line in lines:
            event = parse(line) if len(line) <= MAX_LINE_BYTES else None
            if event is not None and self.apply(event, now):
                applied += 1
        return applied

    def apply(self, event: od.OutlierDetectionEvent, now: float) -> bool:
        backend = self.tables.current.by_cluster.get(event.cluster_name)
        if backend is None:
            return False  # the ext_proc's own cluster, or a backend of an older config
        if event.action == od.UNEJECT:
            if backend.id in self.strikes:  # back in service from now, not from when it was due
                stamp = event.timestamp.ToSeconds() if event.HasField("timestamp") else now
                self.strikes[backend.id] = (self.strikes[backend.id][0], stamp)
            self.cooldowns.uneject(backend.id)
            log.info("backend %s back from Envoy's outlier ejection", backend.id)
            return True
        if not event.enforced:
            return False
        when = event.timestamp.ToSeconds() if event.HasField("timestamp") else now
        until = when + ejection_seconds(self.count(backend.id, event.num_ejections, when))
        if until <= now or not self.cooldowns.eject(backend.id, until):
            return False  # over already (an old line read at start), or resting longer anyway
        kind = od.OutlierEjectionType.Name(event.type).lower()
        self.metrics.cooldowns.labels(backend.provider.name, backend.model, EJECTED).inc()
        log.warning("backend %s ejected by Envoy (%s) for %.0f s", backend.id, kind, until - now)
        return True

    def count(self, backend: str, said: int, when: float) -> int:
        """The backend's ejections including this one, at least what Envoy says: one more than
        before, less one per detection interval it spent back in service since the last."""
        before, ended = self.strikes.get(backend, (0, when))
        served = max(when - ended, 0.0)
        count = max(before - int(served // OUTLIER_INTERVAL_S), 0) + 1
        count = max(count, said)
        self.strikes[backend] = (count, when + ejection_seconds(count))
        return count

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.read_new)
            except Exception as exc:  # a locked state file: the next round reads on
                log.warning("reading Envoy's outlier events: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), READ_EVERY_S)
