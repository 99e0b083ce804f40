"""The spend ledger: USD per policy in hourly buckets, in SQLite (`sharedstate`).

Every ext_proc worker of a replica opens the same file, so the router phase of one sees what
the access log of another just counted (budgets are locally exact). In a cluster the
gateway sidecar also opens it to publish this replica's spend and to record the other
replicas' (`signalbox.replicasync`).

Rows: `spend(policy, bucket, usd)` for this replica and `remote(replica, policy, bucket, usd)`
for the others. Keys are policy ids ("namespace/name").
"""

from __future__ import annotations

import time
from pathlib import Path

from .budget import DAY, HOUR, Buckets, window_start
from .sharedstate import connect

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
  policy TEXT NOT NULL, bucket INTEGER NOT NULL, usd REAL NOT NULL, PRIMARY KEY (policy, bucket));
CREATE TABLE IF NOT EXISTS remote (
  replica TEXT NOT NULL, policy TEXT NOT NULL, bucket INTEGER NOT NULL, usd REAL NOT NULL,
  PRIMARY KEY (replica, policy, bucket));
"""
# Buckets older than this are deleted: the day window never needs more than 24 of them.
KEEP_SECONDS = 2 * DAY


class SpendLedger:
    def __init__(self, path: str | Path | None = None):
        self.db = connect(path, _SCHEMA)
        self._pruned_bucket = 0

    def close(self) -> None:
        self.db.close()

    def add(self, policy: str, usd: float, now: float | None = None) -> None:
        bucket = window_start(time.time() if now is None else now, HOUR)
        self.db.execute(
            "INSERT INTO spend VALUES (?, ?, ?) ON CONFLICT (policy, bucket) DO UPDATE SET usd = usd + excluded.usd",
            (policy, bucket, usd),
        )
        if bucket != self._pruned_bucket:
            self._pruned_bucket = bucket
            self.prune(bucket)

    def prune(self, now: float) -> None:
        cutoff = now - KEEP_SECONDS
        self.db.execute("DELETE FROM spend WHERE bucket < ?", (cutoff,))
        self.db.execute("DELETE FROM remote WHERE bucket < ?", (cutoff,))

    def buckets(self, policy: str, now: float) -> Buckets:
        """Hourly buckets of the current UTC day: (start, this replica's USD, other replicas' USD)."""
        since = window_start(now, DAY)
        rows = self.db.execute(
            "SELECT bucket, SUM(l), SUM(r) FROM ("
            " SELECT bucket, usd AS l, 0.0 AS r FROM spend WHERE policy = ? AND bucket >= ?"
            " UNION ALL SELECT bucket, 0.0, usd FROM remote WHERE policy = ? AND bucket >= ?"
            ") GROUP BY bucket",
            (policy, since, policy, since),
        ).fetchall()
        return [(int(b), float(local), float(remote)) for b, local, remote in rows]

    def local(self, now: float) -> dict[str, dict[int, float]]:
        """This replica's spend of the current day, policy -> bucket -> USD (what it publishes)."""
        out: dict[str, dict[int, float]] = {}
        for policy, bucket, usd in self.db.execute(
            "SELECT policy, bucket, usd FROM spend WHERE bucket >= ?", (window_start(now, DAY),)
        ):
            out.setdefault(policy, {})[int(bucket)] = float(usd)
        return out

    def set_remote(self, spend: dict[str, dict[str, dict[int, float]]]) -> None:
        """Replace what is known of the other replicas: replica -> policy -> bucket -> USD."""
        rows = [
            (replica, policy, bucket, usd)
            for replica, policies in spend.items()
            for policy, buckets in policies.items()
            for bucket, usd in buckets.items()
        ]
        with self.db:  # one transaction: readers see the old set or the new one
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM remote")
            self.db.executemany("INSERT INTO remote VALUES (?, ?, ?, ?)", rows)
