"""Learning observations shared by the ext_proc workers of one gateway (SQLite, `sharedstate`).

`SelectionState` keeps what strategies read in dicts (quality, outcomes, latency averages).
With a `SharedLearning` attached it writes every observation through to the file and reloads
the dicts whenever another worker has written (SQLite's `data_version`, a cheap check per
decision), so feedback that reached one worker teaches all of them. Rows are keyed like the
dicts: (policy name, class, backend); latency by backend. Per-prompt observations (their
prompts' vectors, `neighbours`) and the vectors of recent decisions (for feedback that reaches
another worker than the one that decided) are rows too; each worker loads the new ones.

The other gateway replicas' observations arrive as `remote_*` rows (written by
`signalbox.replicasync`) and are added in: counts sum; the latency average is this replica's
own when it has one (it is what this replica's clients see), else the others' mean. Their
per-prompt observations arrive as rows of `neighbours` like this replica's own, each noted in
`neighbour_origins` by replica and reference: taken in once however often it is published, and
never published again by this replica.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from signalbox.core.replicastate import decode_vector, encode_vector

from .sharedstate import connect

_SCHEMA = """
CREATE TABLE IF NOT EXISTS quality (
  policy TEXT NOT NULL, class TEXT NOT NULL, backend TEXT NOT NULL, n REAL NOT NULL, total REAL NOT NULL,
  PRIMARY KEY (policy, class, backend));
CREATE TABLE IF NOT EXISTS outcomes (
  policy TEXT NOT NULL, class TEXT NOT NULL, backend TEXT NOT NULL,
  ok REAL NOT NULL, failed REAL NOT NULL, latency REAL NOT NULL,
  PRIMARY KEY (policy, class, backend));
CREATE TABLE IF NOT EXISTS latency (backend TEXT PRIMARY KEY, ms REAL NOT NULL);
CREATE TABLE IF NOT EXISTS remote_quality (
  replica TEXT NOT NULL, policy TEXT NOT NULL, class TEXT NOT NULL, backend TEXT NOT NULL,
  n REAL NOT NULL, total REAL NOT NULL, PRIMARY KEY (replica, policy, class, backend));
CREATE TABLE IF NOT EXISTS remote_outcomes (
  replica TEXT NOT NULL, policy TEXT NOT NULL, class TEXT NOT NULL, backend TEXT NOT NULL,
  ok REAL NOT NULL, failed REAL NOT NULL, latency REAL NOT NULL, PRIMARY KEY (replica, policy, class, backend));
CREATE TABLE IF NOT EXISTS neighbours (
  id INTEGER PRIMARY KEY AUTOINCREMENT, policy TEXT NOT NULL, backend TEXT NOT NULL, score REAL NOT NULL,
  vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS decision_vectors (token TEXT PRIMARY KEY, vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS neighbour_origins (
  id INTEGER PRIMARY KEY, replica TEXT NOT NULL, ref TEXT NOT NULL, UNIQUE (replica, ref));
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Per-prompt observations kept in the file (the newest; each worker's memory keeps its own
# capacity of them), and decisions whose vectors are kept for the feedback that may follow.
NEIGHBOUR_ROWS = 65536
DECISION_ROWS = 16384
# This replica's newest per-prompt observations in what it publishes for the others (float16
# vectors in base64: about 750 bytes each, 48 KB for 64, within a replica's ConfigMap key). A
# replica publishes at most once per sync interval, so the others miss none while fewer than
# this many arrive per interval (32 a second at the default 2 s) and the newest otherwise.
SHARED_NEIGHBOURS = 64
# How far back among all rows a replica looks for its own newest: further back than the others
# can publish in one interval (64 each, 128 replicas), so nothing unpublished is missed.
NEIGHBOUR_SCAN = 8192
# Weight of the newest latency in the outcome EWMA (the same as SelectionState's).
LATENCY_ALPHA = 0.3

Key = tuple[str, str, str]


class SharedLearning:
    def __init__(self, path: str | Path | None = None):
        self.db = connect(path, _SCHEMA)
        self._version: int | None = None
        # Names this file's observations for the other replicas: row ids start again in a new
        # file (a restarted pod), and the others must not take its rows for ones already seen.
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (secrets.token_hex(6),))
        self._epoch = str(self.db.execute("SELECT value FROM meta WHERE name = 'epoch'").fetchone()[0])

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

    def add_latency(self, backend: str, ms: float, alpha: float, prior: float) -> None:
        """One finished request's duration into the backend's average (`latency` strategy)."""
        self.db.execute(
            "INSERT INTO latency VALUES (?, ?) ON CONFLICT (backend) DO UPDATE SET ms = ms + ? * (? - ms)",
            (backend, prior + alpha * (ms - prior), alpha, ms),
        )

    # ------------------------------------------------------------------ per prompt

    def add_neighbour(self, policy: str, vector: np.ndarray, backend: str, score: float) -> None:
        row = self.db.execute(
            "INSERT INTO neighbours (policy, backend, score, vector) VALUES (?, ?, ?, ?)",
            (policy, backend, score, np.asarray(vector, dtype=np.float32).tobytes()),
        )
        if row.lastrowid and row.lastrowid % 1024 == 0:
            self._trim_neighbours(row.lastrowid)

    def _trim_neighbours(self, last_id: int) -> None:
        self.db.execute("DELETE FROM neighbours WHERE id <= ?", (last_id - NEIGHBOUR_ROWS,))
        self.db.execute("DELETE FROM neighbour_origins WHERE id <= ?", (last_id - NEIGHBOUR_ROWS,))

    def neighbours_since(self, last_id: int) -> list[tuple[int, str, str, float, np.ndarray]]:
        """Observations after `last_id` (every worker's), oldest first."""
        return [
            (int(i), policy, backend, float(score), np.frombuffer(blob, dtype=np.float32))
            for i, policy, backend, score, blob in self.db.execute(
                "SELECT id, policy, backend, score, vector FROM neighbours WHERE id > ? ORDER BY id", (last_id,)
            )
        ]

    def remember_decision(self, token: str, vector: np.ndarray) -> None:
        row = self.db.execute(
            "INSERT OR REPLACE INTO decision_vectors VALUES (?, ?)",
            (token, np.asarray(vector, dtype=np.float32).tobytes()),
        )
        if row.lastrowid and row.lastrowid % 1024 == 0:
            self.db.execute("DELETE FROM decision_vectors WHERE rowid <= ?", (row.lastrowid - DECISION_ROWS,))

    def decision_vector(self, token: str) -> np.ndarray | None:
        row = self.db.execute("SELECT vector FROM decision_vectors WHERE token = ?", (token,)).fetchone()
        return np.frombuffer(row[0], dtype=np.float32) if row else None

    def load_latency(self) -> dict[str, float]:
        return dict(self.db.execute("SELECT backend, ms FROM latency").fetchall())

    def changed(self) -> bool:
        """True the first time, then whenever another connection has committed since the last call."""
        version = int(self.db.execute("PRAGMA data_version").fetchone()[0])
        changed, self._version = version != self._version, version
        return changed

    def load(self) -> tuple[dict[Key, list[float]], dict[Key, list[float]]]:
        """(quality, outcomes) as SelectionState keeps them: this replica's plus the others'."""
        quality: dict[Key, list[float]] = {}
        for p, c, b, n, total in self.db.execute(
            "SELECT policy, class, backend, SUM(n), SUM(total) FROM ("
            " SELECT policy, class, backend, n, total FROM quality"
            " UNION ALL SELECT policy, class, backend, n, total FROM remote_quality"
            ") GROUP BY policy, class, backend"
        ):
            quality[(p, c, b)] = [n, total]
        outcomes: dict[Key, list[float]] = {}
        for p, c, b, ok, failed, own, others in self.db.execute(
            "SELECT policy, class, backend, SUM(ok), SUM(failed), MAX(own), AVG(other) FROM ("
            " SELECT policy, class, backend, ok, failed, latency AS own, NULL AS other FROM outcomes"
            " UNION ALL SELECT policy, class, backend, ok, failed, NULL, latency FROM remote_outcomes"
            ") GROUP BY policy, class, backend"
        ):
            outcomes[(p, c, b)] = [ok, failed, own if own is not None else others]
        return quality, outcomes

    def local_rows(self) -> dict[str, list[list[object]]]:
        """This replica's own observations, as published for the others: class-level counts, and
        its newest per-prompt observations ([reference, policy, backend, score, vector])."""
        # Among the newest NEIGHBOUR_SCAN rows only: a replica that learned little itself would
        # otherwise walk every other replica's row each round (38 ms over 65,536 of them).
        newest = self.db.execute(
            "SELECT id, policy, backend, score, vector FROM neighbours n"
            " WHERE id > (SELECT COALESCE(MAX(id), 0) FROM neighbours) - ?"
            " AND NOT EXISTS (SELECT 1 FROM neighbour_origins o WHERE o.id = n.id)"
            " ORDER BY id DESC LIMIT ?",
            (NEIGHBOUR_SCAN, SHARED_NEIGHBOURS),
        ).fetchall()
        return {
            "quality": [list(r) for r in self.db.execute("SELECT * FROM quality ORDER BY 1, 2, 3")],
            "outcomes": [list(r) for r in self.db.execute("SELECT * FROM outcomes ORDER BY 1, 2, 3")],
            "neighbours": [
                [f"{self._epoch}.{i}", policy, backend, score, encode_vector(np.frombuffer(blob, dtype=np.float32))]
                for i, policy, backend, score, blob in reversed(newest)
            ],
        }

    def set_remote(self, rows: dict[str, dict[str, list[list[object]]]]) -> None:
        """Replace what is known of the other replicas: replica -> local_rows() of that replica."""
        with self.db:  # one transaction: readers see the old set or the new one
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM remote_quality")
            self.db.execute("DELETE FROM remote_outcomes")
            for replica, tables in rows.items():
                self.db.executemany(
                    "INSERT INTO remote_quality VALUES (?, ?, ?, ?, ?, ?)",
                    [(replica, *r) for r in tables.get("quality", [])],
                )
                self.db.executemany(
                    "INSERT INTO remote_outcomes VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(replica, *r) for r in tables.get("outcomes", [])],
                )
                self._take_neighbours(replica, tables.get("neighbours", []))

    def _take_neighbours(self, replica: str, rows: Iterable[list[object]]) -> None:
        """Another replica's per-prompt observations not taken in before, as rows of `neighbours`
        (the workers load them like their own). Called inside set_remote's transaction."""
        last = None
        for ref, policy, backend, score, vector in rows:
            seen = self.db.execute(
                "SELECT 1 FROM neighbour_origins WHERE replica = ? AND ref = ?", (replica, ref)
            ).fetchone()
            if seen:
                continue
            last = self.db.execute(
                "INSERT INTO neighbours (policy, backend, score, vector) VALUES (?, ?, ?, ?)",
                (policy, backend, score, decode_vector(str(vector)).tobytes()),
            ).lastrowid
            self.db.execute("INSERT INTO neighbour_origins VALUES (?, ?, ?)", (last, replica, ref))
        if last:
            self._trim_neighbours(last)
