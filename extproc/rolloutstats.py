"""Rollout figures and pauses, shared by a gateway's workers and published to the other replicas.

The router phase counts what it decides (shadow pairs, their estimated costs, shadow errors);
the access log counts what a canary's two sides served (their real cost, their failures). Each
count goes into this replica's rows of a SQLite file every worker opens; the replica ConfigMap
carries them to the other replicas (`signalbox.replicasync`) and to the operator, which puts
their sum in the policy's `status.rollout`.

A pause is a figure too (`paused`: when): the worker that sees the candidate's error rate pass
its limit, over the sum of every replica's figures, writes it, and every worker of every replica
that reads it serves the live policy alone from then on, for that epoch
(`signalbox.core.rollouts`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from signalbox.core import rollouts

from .sharedstate import connect

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollout (epoch TEXT, field TEXT, value REAL, PRIMARY KEY (epoch, field));
CREATE TABLE IF NOT EXISTS remote_rollout (replica TEXT, epoch TEXT, field TEXT, value REAL);
"""
# Counts wait in the worker at most this long before they are written (one commit for many
# requests): the figures in status and in the replica ConfigMap lag by at most this. A failure
# of the candidate is written at once, since it may pause the rollout.
FLUSH_EVERY_S = 0.5


class RolloutStats:
    def __init__(self, path: str | Path | None = None):
        self.db = connect(path, _SCHEMA)
        self._tx = threading.RLock()  # threads sharing the connection (as SpendLedger)
        self._pending: dict[tuple[str, str], float] = {}
        self._flushed_at = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        self.flush()
        self.db.close()

    def add(self, epoch: str, counts: Mapping[str, float]) -> None:
        """Add to this replica's figures of one epoch: buffered, and written within
        FLUSH_EVERY_S (at once outside an event loop)."""
        with self._tx:
            for field, value in counts.items():
                if value:
                    self._pending[(epoch, field)] = self._pending.get((epoch, field), 0.0) + value
        if not self._pending:
            return
        if time.monotonic() - self._flushed_at >= FLUSH_EVERY_S:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # tools and threads: no loop to flush later from
            return
        if self._timer is None:
            self._timer = loop.call_later(FLUSH_EVERY_S, self.flush)

    def flush(self) -> None:
        """Write what this worker counted since the last flush (one statement, one commit)."""
        with self._tx:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._flushed_at = time.monotonic()
            rows, self._pending = self._pending, {}
            if not rows:
                return
            values = ",".join("(?, ?, ?)" for _ in rows)
            self.db.execute(
                f"INSERT INTO rollout VALUES {values} "
                "ON CONFLICT (epoch, field) DO UPDATE SET value = value + excluded.value",
                [v for (epoch, field), value in rows.items() for v in (epoch, field, value)],
            )

    def record(
        self, epoch: str, rule: rollouts.PauseRule, counts: Mapping[str, float], now: float
    ) -> rollouts.Figures | None:
        """Count, then pause the epoch if the candidate's errors now pass the rule; returns the
        figures that paused it (None: not paused by this count)."""
        self.add(epoch, counts)
        if not counts.get(rollouts.CANDIDATE_ERRORS):
            return None  # only a failure can push the rate past the limit
        figures = self.figures(epoch)  # flushes: every worker's failures count at once
        if figures[rollouts.PAUSED] or not rule.breached(figures):
            return None
        return figures if self.pause(epoch, now) else None

    def figures(self, epoch: str) -> rollouts.Figures:
        """One epoch's figures over every worker of every replica (as last published)."""
        self.flush()
        with self._tx:
            local = dict(self.db.execute("SELECT field, value FROM rollout WHERE epoch = ?", (epoch,)).fetchall())
            remote: dict[str, dict[str, float]] = {}
            for replica, field, value in self.db.execute(
                "SELECT replica, field, value FROM remote_rollout WHERE epoch = ?", (epoch,)
            ):
                remote.setdefault(replica, {})[field] = value
        return rollouts.total([local, *remote.values()])

    def pause(self, epoch: str, now: float) -> bool:
        """Record the pause of one epoch on this replica; False if it was already paused here."""
        with self._tx:
            cursor = self.db.execute(
                "INSERT INTO rollout VALUES (?, ?, ?) ON CONFLICT (epoch, field) DO NOTHING",
                (epoch, rollouts.PAUSED, now),
            )
        return cursor.rowcount == 1

    def paused(self, epoch: str) -> bool:
        """Whether any worker of any replica paused this epoch. Read on every request of a
        policy with a rollout (one indexed lookup, ~10 µs), so every worker of this replica
        follows a pause from the next request on."""
        with self._tx:
            row = self.db.execute(
                "SELECT 1 FROM rollout WHERE epoch = ?1 AND field = ?2 AND value > 0 "
                "UNION ALL SELECT 1 FROM remote_rollout WHERE epoch = ?1 AND field = ?2 AND value > 0 LIMIT 1",
                (epoch, rollouts.PAUSED),
            ).fetchone()
        return row is not None

    def local(self) -> dict[str, dict[str, float]]:
        """This replica's figures, epoch -> field -> value (what it publishes)."""
        self.flush()
        out: dict[str, dict[str, float]] = {}
        with self._tx:
            for epoch, field, value in self.db.execute("SELECT epoch, field, value FROM rollout"):
                out.setdefault(epoch, {})[field] = value
        return out

    def set_remote(self, by_replica: Mapping[str, Mapping[str, Mapping[str, float]]]) -> None:
        """The other replicas' figures, as last published (replaces what they said before)."""
        rows = [
            (replica, epoch, field, float(value))
            for replica, epochs in by_replica.items()
            for epoch, figures in epochs.items()
            for field, value in figures.items()
        ]
        with self._tx, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM remote_rollout")
            self.db.executemany("INSERT INTO remote_rollout VALUES (?, ?, ?, ?)", rows)

    def forget(self, keep: set[str]) -> None:
        """Drop this replica's figures of epochs no longer in the config (a new epoch starts
        afresh; the old one's figures would only grow the replica's key)."""
        self.flush()
        with self._tx:
            marks = ",".join("?" * len(keep))
            self.db.execute(f"DELETE FROM rollout WHERE epoch NOT IN ({marks})", tuple(keep))
