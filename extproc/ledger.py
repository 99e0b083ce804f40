"""The spend ledger: USD per policy in hourly buckets, in SQLite (`sharedstate`).

Every ext_proc worker of a replica opens the same file, so the router phase of one sees what
the access log of another just counted (budgets are locally exact). In a cluster the
gateway sidecar also opens it to publish this replica's spend and to record the other
replicas' (`signalbox.replicasync`).

Rows: `spend(policy, bucket, usd)` for this replica and `remote(replica, policy, bucket, usd)`
for the others. Keys are policy ids ("namespace/name"). Requests in flight hold their estimated
cost in `held(id, policy, usd, until)` (this replica) and `remote_held(replica, policy, usd,
until)` (the others, summed per policy).

A hold still here after `until` (the policy's timeout plus slack) belongs to a request whose
access log entry never came, typically because it finished while the ext_proc was restarting
(the file outlives the process). It is charged at its estimate: a budget errs towards spent,
not towards free. Another replica's holds past `until` are only ignored: that replica charges
its own, or is gone. (An entry arriving after its hold was charged would count twice; Envoy
delivers entries within its 100 ms batching or drops them, far inside the 30 s slack.)
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from signalbox.core.budget import DAY, EXHAUSTED, HOUR, Buckets, Budget, BudgetStatus, assess, window_start

from .sharedstate import connect

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
  policy TEXT NOT NULL, bucket INTEGER NOT NULL, usd REAL NOT NULL, PRIMARY KEY (policy, bucket));
CREATE TABLE IF NOT EXISTS remote (
  replica TEXT NOT NULL, policy TEXT NOT NULL, bucket INTEGER NOT NULL, usd REAL NOT NULL,
  PRIMARY KEY (replica, policy, bucket));
CREATE TABLE IF NOT EXISTS held (
  id TEXT PRIMARY KEY, policy TEXT NOT NULL, usd REAL NOT NULL, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS remote_held (
  replica TEXT NOT NULL, policy TEXT NOT NULL, usd REAL NOT NULL, until REAL NOT NULL,
  PRIMARY KEY (replica, policy));
"""
# Buckets older than this are deleted: the day window never needs more than 24 of them.
KEEP_SECONDS = 2 * DAY
_ADD_SPEND = "INSERT INTO spend VALUES (?, ?, ?) ON CONFLICT (policy, bucket) DO UPDATE SET usd = usd + excluded.usd"
# How often one process looks for lapsed holds to charge.
SWEEP_SECONDS = 10.0

log = logging.getLogger("signalbox.extproc")


class SpendLedger:
    def __init__(self, path: str | Path | None = None):
        self.db = connect(path, _SCHEMA)
        # One connection may serve several threads (replica sync's watch and publisher): their
        # transactions must not interleave on it ("cannot start a transaction within a transaction").
        self._tx = threading.RLock()
        self._pruned_bucket = 0
        self._swept_at = float("-inf")

    def close(self) -> None:
        self.db.close()

    def add(self, policy: str, usd: float, now: float | None = None, release: str = "") -> None:
        """Count spend; `release` names the hold it replaces (one transaction: readers never see
        a request's cost twice or not at all)."""
        now = time.time() if now is None else now
        bucket = window_start(now, HOUR)
        with self._tx, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if release:
                self.db.execute("DELETE FROM held WHERE id = ?", (release,))
            if usd:
                self.db.execute(_ADD_SPEND, (policy, bucket, usd))
        if bucket != self._pruned_bucket:
            self._pruned_bucket = bucket
            self.prune(now)

    def hold(self, policy: str, hold_id: str, usd: float, until: float) -> None:
        """A routed request's estimated cost, counted until `add(..., release=hold_id)`."""
        self.db.execute("INSERT OR REPLACE INTO held VALUES (?, ?, ?, ?)", (hold_id, policy, usd, until))

    def admit(
        self, policy: str, limits: Budget, hold_id: str, usd: float, until: float, now: float
    ) -> BudgetStatus | None:
        """Check and hold in one transaction: sum spend and holds, decide, insert the hold.

        Returns None when the hold was placed; otherwise the exhausted status that refused it
        (only for `reject` budgets). `BEGIN IMMEDIATE` takes SQLite's write lock before the
        reads, so two workers can never both admit on the same remaining room: the most a
        burst overshoots a limit by is the estimate of the one request admitted just below it.
        """
        with self._tx, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            status = assess(limits, self.buckets(policy, now, sweep=False), now, self.in_flight(policy, now))
            if status.state == EXHAUSTED and status.reject_when_exhausted:
                return status
            self.db.execute("INSERT OR REPLACE INTO held VALUES (?, ?, ?, ?)", (hold_id, policy, usd, until))
        return None

    def in_flight(self, policy: str, now: float) -> float:
        """What requests in flight hold: this replica's (lapsed ones too, until they are charged)
        and the others' as last published."""
        (usd,) = self.db.execute(
            "SELECT COALESCE(SUM(usd), 0.0) FROM ("
            " SELECT usd FROM held WHERE policy = ?"
            " UNION ALL SELECT usd FROM remote_held WHERE policy = ? AND until > ?)",
            (policy, policy, now),
        ).fetchone()
        return float(usd)

    def charge_lapsed(self, now: float) -> float:
        """Charge the holds past their `until` at their estimate, in the hour they lapsed in;
        returns what was charged."""
        self._swept_at = now
        with self._tx, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            lapsed = self.db.execute(
                "DELETE FROM held WHERE until <= ? RETURNING policy, usd, until", (now,)
            ).fetchall()
            self.db.executemany(_ADD_SPEND, [(policy, window_start(until, HOUR), usd) for policy, usd, until in lapsed])
        charged = sum(usd for _, usd, _ in lapsed)
        if lapsed:
            log.warning(
                "budget: %d request(s) finished without accounting (was the ext_proc restarting?): "
                "charged at their estimate, $%.6f",
                len(lapsed),
                charged,
            )
        return charged

    def _charge_lapsed_if_due(self, now: float) -> None:
        # On the read paths (budget checks, publishing), at most every SWEEP_SECONDS: a lapsed
        # hold counts as in flight until then, so nothing drops out in between.
        if now - self._swept_at >= SWEEP_SECONDS:
            self.charge_lapsed(now)

    def prune(self, now: float) -> None:
        cutoff = window_start(now, HOUR) - KEEP_SECONDS
        self.db.execute("DELETE FROM spend WHERE bucket < ?", (cutoff,))
        self.db.execute("DELETE FROM remote WHERE bucket < ?", (cutoff,))

    def buckets(self, policy: str, now: float, sweep: bool = True) -> Buckets:
        """Hourly buckets of the current UTC day: (start, this replica's USD, other replicas' USD)."""
        if sweep:
            self._charge_lapsed_if_due(now)
        since = window_start(now, DAY)
        rows = self.db.execute(
            "SELECT bucket, SUM(l), SUM(r) FROM ("
            " SELECT bucket, usd AS l, 0.0 AS r FROM spend WHERE policy = ? AND bucket >= ?"
            " UNION ALL SELECT bucket, 0.0, usd FROM remote WHERE policy = ? AND bucket >= ?"
            ") GROUP BY bucket",
            (policy, since, policy, since),
        ).fetchall()
        return [(int(b), float(local), float(remote)) for b, local, remote in rows]

    def local_held(self, now: float) -> dict[str, tuple[float, float]]:
        """This replica's holds per policy, (USD, latest until) (what it publishes)."""
        rows = self.db.execute(
            "SELECT policy, SUM(usd), MAX(until) FROM held WHERE until > ? GROUP BY policy", (now,)
        ).fetchall()
        return {policy: (float(usd), float(until)) for policy, usd, until in rows}

    def local(self, now: float) -> dict[str, dict[int, float]]:
        """This replica's spend of the current day, policy -> bucket -> USD (what it publishes)."""
        self._charge_lapsed_if_due(now)
        out: dict[str, dict[int, float]] = {}
        for policy, bucket, usd in self.db.execute(
            "SELECT policy, bucket, usd FROM spend WHERE bucket >= ?", (window_start(now, DAY),)
        ):
            out.setdefault(policy, {})[int(bucket)] = float(usd)
        return out

    def set_remote(
        self,
        spend: dict[str, dict[str, dict[int, float]]],
        held: dict[str, dict[str, tuple[float, float]]] | None = None,
    ) -> None:
        """Replace what is known of the other replicas: replica -> policy -> bucket -> USD, and
        replica -> policy -> (USD held, until)."""
        rows = [
            (replica, policy, bucket, usd)
            for replica, policies in spend.items()
            for policy, buckets in policies.items()
            for bucket, usd in buckets.items()
        ]
        held_rows = [
            (replica, policy, usd, until)
            for replica, policies in (held or {}).items()
            for policy, (usd, until) in policies.items()
        ]
        with self._tx, self.db:  # one transaction: readers see the old set or the new one
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM remote")
            self.db.executemany("INSERT INTO remote VALUES (?, ?, ?, ?)", rows)
            self.db.execute("DELETE FROM remote_held")
            self.db.executemany("INSERT INTO remote_held VALUES (?, ?, ?, ?)", held_rows)
