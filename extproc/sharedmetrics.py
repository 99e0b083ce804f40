"""Counters and histograms whose series grow with the config (by policy, backend, consumer), kept
by every ext_proc worker in one SQLite table instead of prometheus_client's per-process files.

Why: prometheus_client's multiprocess mode keeps, in every worker that ever touched a series, a
Python object per value and an entry in a memory-mapped file: about 1 KB per counter series and
11 KB per histogram series (11 buckets). A request routed to a backend touches seven of them
(requests, classifications, tokens in and out, cost, duration, time to first token): 37 KB per
(policy, backend) in each worker. At the 2,000-provider fleet (10,000 backends) a worker that had
seen traffic to every backend would hold about 370 MB of metrics (issue 12: ≤ 100 MB a worker).

Here a worker holds only what it added since its last flush (a dict of deltas, flushed every
FLUSH_S in one transaction); the table holds each series once for the whole gateway, and the
worker that serves `/metrics` reads it at scrape time. The series, names, help and samples are
what prometheus_client would expose (`_total`, `_bucket`/`_count`/`_sum`), so dashboards and
alerts see no difference. A scrape sees everything counted before it, as with prometheus_client:
it asks every worker to flush (a number in the table each worker's flush thread polls every
POLL_S) and reads once each live worker has answered (at most SCRAPE_WAIT_S). What stays on
prometheus_client: gauges (their cross-process modes) and the few metrics whose labels the
config does not multiply.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import orjson
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .sharedstate import connect

SERIES_FILE = "series.sqlite"  # not *.db: prometheus_client's MultiProcessCollector reads those
FLUSH_S = 0.5
POLL_S = 0.02  # how often a worker looks for a scrape's request to flush (one small read)
SCRAPE_WAIT_S = 1.0  # how long a scrape waits for the workers' flushes before it reads anyway
# Deltas held before they are flushed at once, whatever the timer (a process without one: a
# single ext_proc keeps its table in memory and is read at scrape time).
PENDING_MAX = 4096
SUM = -1  # a histogram's sum; slots 0..len(buckets) are its (non-cumulative) bucket counts

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    metric TEXT NOT NULL,
    labels TEXT NOT NULL,
    slot INTEGER NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (metric, labels, slot)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS flush_wanted (id INTEGER PRIMARY KEY CHECK (id = 0), number INTEGER NOT NULL);
INSERT OR IGNORE INTO flush_wanted (id, number) VALUES (0, 0);
CREATE TABLE IF NOT EXISTS flushed (pid INTEGER PRIMARY KEY, number INTEGER NOT NULL);
"""


class SeriesStore:
    """The deltas this process counted, and the table they are flushed to. `folder`: the
    gateway's shared metrics folder (a worker flushes on a timer and at exit); None: a private
    in-memory table (one process, tests)."""

    def __init__(self, folder: str | Path | None = None):
        self.db = connect(Path(folder) / SERIES_FILE if folder else None, _SCHEMA)
        self._pending: dict[tuple[str, tuple[str, ...], int], float] = {}
        self._lock = threading.Lock()  # the pending deltas
        self._db_lock = threading.Lock()  # the connection (flush timer, scrapes)
        # With a folder, flushes run on a timer thread (a full batch wakes it early): never on
        # the caller's thread, which is a worker's event loop, while another worker holds the
        # file's lock. Without one, the table is this process's memory and a full batch is
        # flushed where it filled.
        self._wake: threading.Event | None = None
        if folder:
            self._wake = threading.Event()
            self._answered = self._wanted()  # scrapes before this process started need nothing of it
            self._answer(self._answered)
            threading.Thread(target=self._flush_every, name="signalbox-metrics-flush", daemon=True).start()
            atexit.register(self.flush)

    def add(self, metric: str, labels: tuple[str, ...], slot: int, amount: float) -> None:
        key = (metric, labels, slot)
        with self._lock:
            self._pending[key] = self._pending.get(key, 0.0) + amount
            full = len(self._pending) > PENDING_MAX
        if full:
            if self._wake is not None:
                self._wake.set()
            else:
                self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        rows = [
            (metric, orjson.dumps(labels).decode(), slot, value) for (metric, labels, slot), value in pending.items()
        ]
        with self._db_lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")  # waits out another worker's flush (busy timeout)
                self.db.executemany(
                    "INSERT INTO series (metric, labels, slot, value) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (metric, labels, slot) DO UPDATE SET value = value + excluded.value",
                    rows,
                )
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                with self._lock:  # counted again next time, not lost
                    for key, value in pending.items():
                        self._pending[key] = self._pending.get(key, 0.0) + value
                raise

    def sync(self) -> None:
        """Before a scrape: this process's deltas flushed, and every worker's counted before the
        call (`_everyone_flushed`). A file the workers cannot write is read as it is: a scrape
        is never failed for that. Blocks: callers on an event loop use a thread."""
        with contextlib.suppress(sqlite3.Error):
            self.flush()  # kept for the next flush if it fails
            if self._wake is not None:
                self._everyone_flushed()

    def series(self, metric: str) -> dict[tuple[str, ...], dict[int, float]]:
        """One metric's series: labels -> slot -> value (one metric at a time: a scrape at a
        large fleet never holds every series at once)."""
        with self._db_lock:
            rows = self.db.execute("SELECT labels, slot, value FROM series WHERE metric = ?", (metric,)).fetchall()
        out: dict[tuple[str, ...], dict[int, float]] = {}
        for labels, slot, value in rows:
            out.setdefault(tuple(orjson.loads(labels)), {})[slot] = value
        return out

    def chunks(self, metric: str, size: int) -> Iterator[dict[tuple[str, ...], dict[int, float]]]:
        """One metric's series, `size` at a time (in the table's order), read as they are
        formatted: the rows of a whole metric are never in memory at once. The connection is
        held meanwhile (the flush thread waits; requests never touch it)."""
        with self._db_lock:
            rows = self.db.execute(
                "SELECT labels, slot, value FROM series WHERE metric = ? ORDER BY labels, slot", (metric,)
            )
            chunk: dict[tuple[str, ...], dict[int, float]] = {}
            last = None
            for labels, slot, value in rows:
                if labels != last:
                    if len(chunk) == size:
                        yield chunk
                        chunk = {}
                    last = labels
                    current = chunk.setdefault(tuple(orjson.loads(labels)), {})
                current[slot] = value
            if chunk:
                yield chunk

    def read(self) -> dict[str, dict[tuple[str, ...], dict[int, float]]]:
        """Every series of the gateway, synced first: metric -> labels -> slot -> value."""
        self.sync()
        with self._db_lock:
            names = [name for (name,) in self.db.execute("SELECT DISTINCT metric FROM series")]
        return {name: self.series(name) for name in names}

    def _wanted(self) -> int:
        with self._db_lock:
            return int(self.db.execute("SELECT number FROM flush_wanted WHERE id = 0").fetchone()[0])

    def _answer(self, number: int) -> None:
        with self._db_lock:
            self.db.execute("INSERT OR REPLACE INTO flushed (pid, number) VALUES (?, ?)", (os.getpid(), number))

    def _everyone_flushed(self) -> None:
        """Ask every worker to flush, and wait until each live one has (or SCRAPE_WAIT_S)."""
        with self._db_lock:
            number = int(
                self.db.execute("UPDATE flush_wanted SET number = number + 1 WHERE id = 0 RETURNING number").fetchone()[
                    0
                ]
            )
        self._answer(number)
        deadline = time.monotonic() + SCRAPE_WAIT_S
        while time.monotonic() < deadline:
            with self._db_lock:
                behind = self.db.execute("SELECT pid FROM flushed WHERE number < ?", (number,)).fetchall()
            waiting = [pid for (pid,) in behind if _alive(pid)]
            if len(waiting) < len(behind):  # workers that have stopped: nothing to wait for
                with self._db_lock:
                    self.db.executemany(
                        "DELETE FROM flushed WHERE pid = ?", [(pid,) for (pid,) in behind if pid not in waiting]
                    )
            if not waiting:
                return
            time.sleep(POLL_S / 2)

    def _flush_every(self) -> None:
        """The timer: a flush every FLUSH_S, at once when a batch is full or a scrape asks."""
        assert self._wake is not None
        due = time.monotonic() + FLUSH_S
        while True:
            full = self._wake.wait(POLL_S)
            self._wake.clear()
            try:
                wanted = self._wanted()
                if full or wanted > self._answered or time.monotonic() >= due:
                    self.flush()
                    due = time.monotonic() + FLUSH_S
                if wanted > self._answered:
                    self._answer(wanted)
                    self._answered = wanted
            except Exception:  # a busy or vanished file: the deltas wait for the next round
                continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Shared:
    def __init__(self, store: SeriesStore, name: str, documentation: str, labelnames: Sequence[str]):
        self.store, self.name, self.documentation = store, name, documentation
        self.labelnames = tuple(labelnames)

    def _labels(self, values: tuple[object, ...]) -> tuple[str, ...]:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected, got {len(values)}")
        return tuple(str(v) for v in values)


class SharedCounter(_Shared):
    """`Counter(name, documentation, labelnames)` as prometheus_client's, kept in the store."""

    def labels(self, *values: object) -> _CounterChild:
        return _CounterChild(self, self._labels(values))

    def family(self, series: dict[tuple[str, ...], dict[int, float]]) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, slots in sorted(series.items()):
            family.add_metric(list(labels), slots.get(0, 0.0))
        return family


class _CounterChild:
    __slots__ = ("counter", "values")

    def __init__(self, counter: SharedCounter, values: tuple[str, ...]):
        self.counter, self.values = counter, values

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.counter.store.add(self.counter.name, self.values, 0, amount)


class SharedHistogram(_Shared):
    """`Histogram(name, documentation, labelnames, buckets)` as prometheus_client's, kept in the
    store: a series is its bucket counts and its sum."""

    def __init__(
        self, store: SeriesStore, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ):
        super().__init__(store, name, documentation, labelnames)
        self.bounds = tuple(float(b) for b in buckets)

    def labels(self, *values: object) -> _HistogramChild:
        return _HistogramChild(self, self._labels(values))

    def family(self, series: dict[tuple[str, ...], dict[int, float]]) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [*(floatToGoString(b) for b in self.bounds), "+Inf"]
        for labels, slots in sorted(series.items()):
            cumulative, buckets = 0.0, []
            for slot, edge in enumerate(edges):
                cumulative += slots.get(slot, 0.0)
                buckets.append((edge, cumulative))
            family.add_metric(list(labels), buckets, slots.get(SUM, 0.0))
        return family


class _HistogramChild:
    __slots__ = ("histogram", "values")

    def __init__(self, histogram: SharedHistogram, values: tuple[str, ...]):
        self.histogram, self.values = histogram, values

    def observe(self, amount: float) -> None:
        h = self.histogram
        h.store.add(h.name, self.values, bisect.bisect_left(h.bounds, amount), 1.0)
        h.store.add(h.name, self.values, SUM, amount)


# Series formatted at a time by `SharedCollector.write`.
CHUNK = 256


class SharedCollector(Collector):
    """The store's metrics: for a registry (`collect`, each family whole: tests, single reads)
    and for a scrape (`write`, the exposition text a few series at a time)."""

    def __init__(self, store: SeriesStore):
        self.store = store
        self.metrics: list[SharedCounter | SharedHistogram] = []
        self._quiet = threading.local()

    def collect(self) -> Iterator[Metric]:
        if getattr(self._quiet, "on", False):
            return
        self.store.sync()
        for metric in self.metrics:
            yield metric.family(self.store.series(metric.name))

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """`collect` yields nothing on this thread meanwhile (a registry's other metrics are
        exposed while `write` gives these)."""
        self._quiet.on = True
        try:
            yield
        finally:
            self._quiet.on = False

    def write(self, out: BinaryIO) -> None:
        """The exposition text of every shared metric, as prometheus_client writes it, formatted
        CHUNK series at a time: a scrape at a large fleet made hundreds of thousands of samples
        and lines at once, and the serving worker kept ~25 MB of the freed objects (4,487
        request series: 41 MB). Each metric's HELP and TYPE lines are written once."""
        self.store.sync()
        for metric in self.metrics:
            first = True
            for chunk in self.store.chunks(metric.name, CHUNK):
                text = generate_latest(_Family(metric.family(chunk)))
                out.write(text if first else text.split(b"\n", 2)[2])
                first = False
            if first:  # no series yet: the metric is still described
                out.write(generate_latest(_Family(metric.family({}))))


class _Family(Collector):
    def __init__(self, family: Metric):
        self.family = family

    def collect(self) -> Iterator[Metric]:
        yield self.family
