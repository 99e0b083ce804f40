"""Learning observations shared by the ext_proc workers of one gateway (SQLite, `sharedstate`).

`SelectionState` keeps what strategies read in dicts. With a `SharedLearning` attached it
writes every observation through to the file and reloads the dicts whenever another worker
has written (SQLite's `data_version`, a cheap check per decision), so feedback that reached
one worker teaches all of them. Rows are keyed like the dicts: (policy name, class, backend).
"""

from __future__ import annotations

from pathlib import Path

from .sharedstate import connect

_SCHEMA = """
CREATE TABLE IF NOT EXISTS quality (
  policy TEXT NOT NULL, class TEXT NOT NULL, backend TEXT NOT NULL, n REAL NOT NULL, total REAL NOT NULL,
  PRIMARY KEY (policy, class, backend));
CREATE TABLE IF NOT EXISTS outcomes (
  policy TEXT NOT NULL, class TEXT NOT NULL, backend TEXT NOT NULL,
  ok REAL NOT NULL, failed REAL NOT NULL, latency REAL NOT NULL,
  PRIMARY KEY (policy, class, backend));
"""
# Weight of the newest latency in the outcome EWMA (the same as SelectionState's).
LATENCY_ALPHA = 0.3

Key = tuple[str, str, str]


class SharedLearning:
    def __init__(self, path: str | Path | None = None):
        self.db = connect(path, _SCHEMA)
        self._version: int | None = None

    def close(self) -> None:
        self.db.close()

    def add_quality(self, key: Key, score: float) -> None:
        self.db.execute(
            "INSERT INTO quality VALUES (?, ?, ?, 1, ?) ON CONFLICT (policy, class, backend) "
            "DO UPDATE SET n = n + 1, total = total + excluded.total",
            (*key, score),
        )

    def add_outcome(self, key: Key, ok: bool, latency_ms: float) -> None:
        self.db.execute(
            "INSERT INTO outcomes VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (policy, class, backend) "
            "DO UPDATE SET ok = ok + excluded.ok, failed = failed + excluded.failed, "
            f"latency = latency + {LATENCY_ALPHA} * (excluded.latency - latency)",
            (*key, 1.0 if ok else 0.0, 0.0 if ok else 1.0, latency_ms),
        )

    def changed(self) -> bool:
        """True the first time, then whenever another connection has committed since the last call."""
        version = int(self.db.execute("PRAGMA data_version").fetchone()[0])
        changed, self._version = version != self._version, version
        return changed

    def load(self) -> tuple[dict[Key, list[float]], dict[Key, list[float]]]:
        quality = {(p, c, b): [n, t] for p, c, b, n, t in self.db.execute("SELECT * FROM quality")}
        outcomes = {(p, c, b): [ok, f, lat] for p, c, b, ok, f, lat in self.db.execute("SELECT * FROM outcomes")}
        return quality, outcomes
