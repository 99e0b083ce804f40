"""Backends cooling down: a provider said "not now" (429, 503 with Retry-After), rejected the key
(401/403), or its rate-limit headers say it is about to run out.

Envoy tells the ext_proc about such attempts in a second access log (the router's upstream log,
contract.ATTEMPT_LOG_NAME, filtered in Envoy so ordinary answers cost nothing). `cooldown_for`
turns one attempt into how long its backend should rest; `Cooldowns` keeps that in a SQLite file
every ext_proc worker of the gateway shares, and that the replica ConfigMap carries to the other
replicas (`signalbox.replicasync`, within about one sync interval). Two readers act on it:
- the router phase leaves cooling backends out of the first choice (strategies.eligible);
- the ADS server (extproc.xds) marks the backend's endpoint unhealthy in Envoy, so a cooling
  backend is also out of every failover chain and every compiled route, on every Envoy
  worker, within a quarter second.

Provider headers are untrusted input: anything unparsable, negative or absurd falls back to the
backoff, and no cooldown lasts longer than MAX_COOLDOWN_S.
"""

from __future__ import annotations

import math
import random
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

from signalbox.core.envoygen.contract import (
    LOW_REMAINING_REQUESTS,
    LOW_REMAINING_TOKENS,
    REMAINING_HEADERS,
)

from .sharedstate import connect

# Longest rest any header can ask for: a provider (or a bug) saying "come back tomorrow" must
# not take a backend out for a day; the next 429 starts a new cooldown anyway.
MAX_COOLDOWN_S = 300.0
# A 429 without Retry-After: 1 s, doubling with each 429 in a row, up to 60 s, with jitter so
# the replicas and workers do not come back at the same instant.
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
# A rejected key (401/403): the operator's probe reports it in AIProvider status; until a new
# key is in place, one attempt a minute is enough.
KEY_REJECTED_S = 60.0
# Rate-limit headers that say "low" but not when the window resets.
LOW_REMAINING_DEFAULT_S = 1.0

RATE_LIMITED, KEY_REJECTED, UNAVAILABLE, LOW_REMAINING = "rate_limited", "key_rejected", "unavailable", "low_remaining"
# Envoy's outlier detection took it out (failing repeatedly): outliers.py mirrors its ejections.
EJECTED = "ejected"


@dataclass(frozen=True)
class Cooldown:
    seconds: float
    reason: str


def _clamp(seconds: float) -> float | None:
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_COOLDOWN_S)


def _number(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None


def retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds the provider asked to wait: `retry-after-ms`, else `Retry-After` as seconds or an
    HTTP date; None when absent or unreadable."""
    if (ms := _number(headers.get("retry-after-ms", "x"))) is not None:
        return _clamp(ms / 1000)
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    if (seconds := _number(value)) is not None:
        return _clamp(seconds)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return _clamp(max(0.0, when.timestamp() - now))


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?")


def reset_in(value: str, now: float) -> float | None:
    """When a rate-limit window resets: OpenAI's durations ("1s", "6m0s", "20ms", "1h2m3.5s"),
    Anthropic's RFC 3339 times, or plain seconds; None when unreadable."""
    value = value.strip()
    if not value:
        return None
    if (seconds := _number(value)) is not None:
        return _clamp(seconds)
    match = _DURATION.fullmatch(value)
    if match and any(match.groups()):
        h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
        return _clamp(h * 3600 + m * 60 + s + ms / 1000)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return _clamp(max(0.0, when.timestamp() - now))


def backoff(streak: int, rng: random.Random) -> float:
    """The rest after the `streak`-th 429 in a row (0: the first) that named no time."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** min(streak, 16))
    return ceiling * rng.uniform(0.5, 1.0)


def _low(headers: Mapping[str, str], now: float) -> float | None:
    for remaining, reset in REMAINING_HEADERS.items():
        left = _number(headers.get(remaining, "x"))
        if left is None:
            continue
        floor = LOW_REMAINING_REQUESTS if "requests" in remaining else LOW_REMAINING_TOKENS
        if left <= floor:
            return reset_in(headers.get(reset, ""), now) or LOW_REMAINING_DEFAULT_S
    return None


def cooldown_for(
    status: int, headers: Mapping[str, str], now: float, streak: int = 0, rng: random.Random | None = None
) -> Cooldown | None:
    """How long a backend should rest after an attempt that ended with `status` and these
    response headers (lower-case names), or None when nothing says it should."""
    if status == 429:
        asked = retry_after(headers, now)
        return Cooldown(asked if asked is not None else backoff(streak, rng or random.Random()), RATE_LIMITED)
    if status in (401, 403):
        return Cooldown(KEY_REJECTED_S, KEY_REJECTED)
    if status == 503 and (asked := retry_after(headers, now)) is not None:
        return Cooldown(asked, UNAVAILABLE)
    if 200 <= status < 300 and (rest := _low(headers, now)) is not None:
        return Cooldown(rest, LOW_REMAINING)
    return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS cooldowns (
  backend TEXT PRIMARY KEY, until REAL NOT NULL, reason TEXT NOT NULL, streak INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS remote_cooldowns (
  replica TEXT NOT NULL, backend TEXT NOT NULL, until REAL NOT NULL, reason TEXT NOT NULL);
"""
# Readers take the table at most this often: the router phase asks on every request.
READ_EVERY_S = 0.05


class Cooldowns:
    """Backend id -> until when (wall clock) and why it rests, shared by the gateway's workers."""

    def __init__(self, path: str | Path | None = None, rng: random.Random | None = None):
        self.db = connect(path, _SCHEMA)
        self._tx = threading.RLock()  # threads sharing the connection (as SpendLedger)
        self.rng = rng or random.Random()
        self._read_at = float("-inf")
        self._active: dict[str, tuple[float, str]] = {}

    def close(self) -> None:
        self.db.close()

    def observe(self, backend: str, status: int, headers: Mapping[str, str], now: float) -> Cooldown | None:
        """Record what one attempt says about its backend; returns the cooldown it started."""
        with self._tx, self.db:
            self.db.execute("BEGIN IMMEDIATE")  # read and write as one: workers race on a backend
            return self._observe(backend, status, headers, now)

    def _observe(self, backend: str, status: int, headers: Mapping[str, str], now: float) -> Cooldown | None:
        row = self.db.execute("SELECT until, reason, streak FROM cooldowns WHERE backend = ?", (backend,)).fetchone()
        # 429s in a row: the previous rate limit ended less than the longest backoff ago.
        streak = row[2] + 1 if row and row[1] == RATE_LIMITED and now - row[0] < BACKOFF_MAX_S else 0
        rest = cooldown_for(status, headers, now, streak, self.rng)
        if rest is None or rest.seconds <= 0:
            return None
        until = now + rest.seconds
        if row and row[0] > until:
            return None  # already resting longer (another worker saw a longer Retry-After)
        self.db.execute(
            "INSERT OR REPLACE INTO cooldowns VALUES (?, ?, ?, ?)",
            (backend, until, rest.reason, streak if rest.reason == RATE_LIMITED else 0),
        )
        self._read_at = float("-inf")  # this worker sees its own news at once
        return rest

    def eject(self, backend: str, until: float) -> bool:
        """Envoy ejected the backend until then; False if it already rests at least as long."""
        with self._tx, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT until FROM cooldowns WHERE backend = ?", (backend,)).fetchone()
            if row and row[0] >= until:
                return False
            self.db.execute("INSERT OR REPLACE INTO cooldowns VALUES (?, ?, ?, 0)", (backend, until, EJECTED))
        self._read_at = float("-inf")
        return True

    def uneject(self, backend: str) -> None:
        """Envoy put the backend back: an ejection's rest ends (any other rest stays)."""
        with self._tx:
            self.db.execute("DELETE FROM cooldowns WHERE backend = ? AND reason = ?", (backend, EJECTED))
        self._read_at = float("-inf")

    def local(self, now: float) -> dict[str, tuple[float, str]]:
        """What this replica's own attempts put to rest (what it publishes to the others)."""
        rows = self.db.execute("SELECT backend, until, reason FROM cooldowns WHERE until > ?", (now,)).fetchall()
        return {b: (until, reason) for b, until, reason in rows}

    def set_remote(self, by_replica: Mapping[str, Mapping[str, tuple[float, str]]]) -> None:
        """The other replicas' cooldowns, as last published (replaces what they said before)."""
        rows = [(r, b, until, reason) for r, rests in by_replica.items() for b, (until, reason) in rests.items()]
        with self._tx, self.db:  # one transaction: readers see the old set or the new one
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM remote_cooldowns")
            self.db.executemany("INSERT INTO remote_cooldowns VALUES (?, ?, ?, ?)", rows)
        self._read_at = float("-inf")

    def active(self, now: float) -> Mapping[str, tuple[float, str]]:
        """Backend id -> (until, reason) of every backend resting now, whichever replica saw why
        (the longest rest wins)."""
        if now - self._read_at >= READ_EVERY_S:
            self._read_at = now
            rows = self.db.execute(
                "SELECT backend, until, reason FROM cooldowns WHERE until > ?1 "
                "UNION ALL SELECT backend, until, reason FROM remote_cooldowns WHERE until > ?1 ORDER BY until",
                (now,),
            ).fetchall()
            self._active = {b: (until, reason) for b, until, reason in rows}  # ascending: the longest stays
        if not self._active:
            return self._active  # the usual case, on every request: nothing rests
        return {b: v for b, v in self._active.items() if v[0] > now}
