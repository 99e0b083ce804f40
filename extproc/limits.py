"""The limit stores: where consumer and policy limits are counted (`core.limits` holds the rules).

`EmbeddedLimits` (SQLite in the gateway's state directory: the workers of one replica, no
server) and `redislimits.RedisLimits` (one Lua script per admission: every replica) apply the
same rules (`core.limits.check`) to a request's subjects and place its holds only when all of
them admit. The access log entry of the request releases its hold and charges its real usage
(`settle`). A hold whose entry never comes lapses at `until` (policy timeout plus slack) and its
estimated cost is charged, as the policy budget's ledger does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from signalbox.core.limits import (
    BUDGET_WINDOWS,
    DAY,
    HOUR,
    Admission,
    Admitted,
    Charge,
    Refusal,
    SubjectLimits,
    Windows,
    budget_status,
    check,
    refuse,
    unavailable,
)

from .sharedstate import connect

# The rules' names, used by the servicer through this module with the stores.
__all__ = [
    "BUDGET_WINDOWS",
    "Admission",
    "Admitted",
    "Charge",
    "EmbeddedLimits",
    "LimitStore",
    "Refusal",
    "StoreUnavailable",
    "SubjectLimits",
    "Windows",
    "budget_status",
    "check",
    "refuse",
    "unavailable",
]


class LimitStore(Protocol):
    async def admit(self, admission: Admission) -> Admitted | Refusal: ...

    async def settle(self, request_id: str, charges: tuple[Charge, ...], now: float) -> None: ...

    async def settle_many(self, items: list[tuple[str, tuple[Charge, ...]]], now: float) -> None: ...

    async def spend(self, subject: str, now: float) -> tuple[float, float, float]: ...

    def close(self) -> None: ...


class StoreUnavailable(Exception):
    """The limit store could not be reached (Redis down, timed out)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
  subject TEXT NOT NULL, kind TEXT NOT NULL, start INTEGER NOT NULL, amount REAL NOT NULL,
  PRIMARY KEY (subject, kind, start));
CREATE TABLE IF NOT EXISTS holds (
  request TEXT NOT NULL, subject TEXT NOT NULL, tokens REAL NOT NULL, usd REAL NOT NULL, until REAL NOT NULL,
  PRIMARY KEY (request, subject));
"""
_ADD = (
    "INSERT INTO counters VALUES (?, ?, ?, ?) "
    "ON CONFLICT (subject, kind, start) DO UPDATE SET amount = amount + excluded.amount"
)


class EmbeddedLimits:
    """The limit store of a single replica: SQLite shared by its ext_proc workers (WAL), one
    `BEGIN IMMEDIATE` transaction per admission, so workers never admit on the same room."""

    def __init__(self, path: str | Path | None = None):
        self.db = connect(path, _SCHEMA)
        self._pruned = 0

    def close(self) -> None:
        self.db.close()

    def _amount(self, subject: str, kind: str, start: int) -> float:
        row = self.db.execute(
            "SELECT amount FROM counters WHERE subject = ? AND kind = ? AND start = ?", (subject, kind, start)
        ).fetchone()
        return float(row[0]) if row else 0.0

    def _spent(self, subject: str, w: Windows) -> tuple[float, float, float]:
        hour, day, month = (
            self._amount(subject, f"usd_{n}", s) for n, s in zip(BUDGET_WINDOWS, w.budget_starts(), strict=True)
        )
        return hour, day, month

    def _charge_usd(self, subject: str, usd: float, w: Windows) -> None:
        if usd:
            self.db.executemany(
                _ADD, [(subject, f"usd_{n}", s, usd) for n, s in zip(BUDGET_WINDOWS, w.budget_starts(), strict=True)]
            )

    def _lapse(self, now: float) -> None:
        """Charge lapsed holds at their estimated cost (the request ended unaccounted)."""
        lapsed = self.db.execute("DELETE FROM holds WHERE until <= ? RETURNING subject, usd", (now,)).fetchall()
        w = Windows.at(now)
        for subject, usd in lapsed:
            self._charge_usd(subject, usd, w)

    def admit_now(self, a: Admission) -> Admitted | Refusal:
        w = Windows.at(a.now)
        budgets: dict[str, tuple[tuple[float, float, float], float]] = {}
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self._lapse(a.now)
            for s in a.subjects:
                held_tokens, held_usd, held_count = self.db.execute(
                    "SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(usd), 0), COUNT(*) FROM holds WHERE subject = ?",
                    (s.subject,),
                ).fetchone()
                spent = self._spent(s.subject, w) if s.has_budget else (0.0, 0.0, 0.0)
                refusal = check(
                    s,
                    w,
                    a.now,
                    self._amount(s.subject, "req", w.minute),
                    self._amount(s.subject, "tok", w.minute),
                    held_tokens,
                    held_count,
                    spent,
                    held_usd,
                )
                if refusal is not None:
                    self.db.execute("ROLLBACK")
                    return refusal
                if s.has_budget:
                    budgets[s.subject] = (spent, held_usd)
            for s in a.subjects:
                self.db.execute(_ADD, (s.subject, "req", w.minute, 1))
                self.db.execute(
                    "INSERT OR REPLACE INTO holds VALUES (?, ?, ?, ?, ?)",
                    (a.request_id, s.subject, a.tokens, a.usd, a.until),
                )
        if w.hour != self._pruned:
            self._pruned = w.hour
            self.db.execute("DELETE FROM counters WHERE kind IN ('req', 'tok') AND start < ?", (w.minute - HOUR,))
            self.db.execute("DELETE FROM counters WHERE start < ?", (w.month - 40 * DAY,))
        return Admitted(budgets)

    async def admit(self, admission: Admission) -> Admitted | Refusal:
        return self.admit_now(admission)

    def settle_now(self, request_id: str, charges: tuple[Charge, ...], now: float) -> None:
        w = Windows.at(now)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM holds WHERE request = ?", (request_id,))
            for c in charges:
                if c.tokens:
                    self.db.execute(_ADD, (c.subject, "tok", w.minute, c.tokens))
                self._charge_usd(c.subject, c.usd, w)

    async def settle(self, request_id: str, charges: tuple[Charge, ...], now: float) -> None:
        self.settle_now(request_id, charges, now)

    async def settle_many(self, items: list[tuple[str, tuple[Charge, ...]]], now: float) -> None:
        for request_id, charges in items:
            self.settle_now(request_id, charges, now)

    async def spend(self, subject: str, now: float) -> tuple[float, float, float]:
        return self._spent(subject, Windows.at(now))
