"""Consumer and policy limits: the rules, pure (numbers in, a refusal or nothing out).

A request is admitted against every *subject* it counts for: its consumer (when it has one)
and its policy (when the policy has `limits`), in one atomic check-and-hold of the limit store
(`signalbox.extproc.limits`: SQLite for one replica, Redis for several):

- requests per minute: the calendar minute's count, plus this request, within the limit;
- tokens per minute: the minute's real usage plus what requests in flight hold must be below the
  limit; the request then holds its estimate (prompt estimate + max_tokens). So a burst
  overshoots by at most the estimate of the one request admitted just below the limit;
- max concurrent: requests held in flight below the limit;
- budget: USD spent in the hour, day and month (UTC) plus what is held, against each limit;
  past `downgrade_at` the decision goes cheaper, at a limit `reject` refuses.

Windows are calendar minutes, hours, days and months in UTC, so a refusal can say when it ends
(Retry-After). Here too: the Redis key of a subject's spend, which the gateways write and the
operator reads for `Consumer` status.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .budget import ADJECTIVES, EXHAUSTED, BudgetStatus, WindowSpend, count, dollars
from .budget import OK as BUDGET_OK
from .errors import BudgetExhausted, LimitExceeded, LimitsUnavailable, TokenLimitExceeded

MINUTE, HOUR, DAY = 60, 3600, 86400
# Retry-After when only requests in flight fill a limit: they usually finish in seconds.
IN_FLIGHT_RETRY_SECONDS = 1
BUDGET_WINDOWS = ("hour", "day", "month")


@dataclass(frozen=True, slots=True)
class SubjectLimits:
    """One subject's limits as the stores read them (0: none of that kind)."""

    subject: str  # "consumer:<ns/name>" or "policy:<ns/name>"
    label: str  # how refusals name it: "consumer team-a", "policy chat"
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent: int = 0
    # USD per hour, day, month (0: none).
    budget_usd: tuple[float, float, float] = (0.0, 0.0, 0.0)
    downgrade_at: float = 1.0
    reject_when_exhausted: bool = True
    count_cached_tokens: bool = True
    # While the store is unreachable: refuse (True) or admit uncounted.
    fail_closed: bool = False
    budget_fail_closed: bool = False

    @property
    def has_budget(self) -> bool:
        return any(self.budget_usd)


@dataclass(frozen=True, slots=True)
class Windows:
    """The calendar windows `now` falls in (UTC starts, and when each ends)."""

    minute: int
    hour: int
    day: int
    month: int
    month_end: int

    @classmethod
    def at(cls, now: float) -> Windows:
        t = datetime.fromtimestamp(now, UTC)
        month = calendar.timegm((t.year, t.month, 1, 0, 0, 0))
        days = calendar.monthrange(t.year, t.month)[1]
        return cls(
            int(now // MINUTE) * MINUTE, int(now // HOUR) * HOUR, int(now // DAY) * DAY, month, month + days * DAY
        )

    def budget_starts(self) -> tuple[int, int, int]:
        return self.hour, self.day, self.month

    def budget_ends(self) -> tuple[int, int, int]:
        return self.hour + HOUR, self.day + DAY, self.month_end


@dataclass(frozen=True, slots=True)
class Admission:
    request_id: str
    subjects: tuple[SubjectLimits, ...]
    tokens: float  # estimate held against tokens per minute
    usd: float  # estimate held against budgets
    now: float
    until: float  # when the hold lapses


@dataclass(frozen=True, slots=True)
class Refusal:
    subject: SubjectLimits
    limit: str  # requests_per_minute | tokens_per_minute | max_concurrent | budget_hour | ...
    retry_after: int
    used: float
    limit_value: float
    held: float = 0.0


@dataclass(frozen=True, slots=True)
class Admitted:
    # Per subject with a budget: USD spent in its (hour, day, month) and held by requests in
    # flight, before this request: what a downgrade decides on (budget_status).
    budgets: dict[str, tuple[tuple[float, float, float], float]] = field(default_factory=dict)
    # The store could not be reached and every subject fails open: nothing was counted.
    uncounted: bool = False


@dataclass(frozen=True, slots=True)
class Charge:
    subject: str
    tokens: float
    usd: float


def refuse(refusal: Refusal) -> None:
    """Raise the client's 429 for a refusal: which limit, of whom, and when to retry."""
    s, limit = refusal.subject, refusal.limit
    retry = (("retry-after", str(refusal.retry_after)),)
    if limit.startswith("budget_"):
        window = limit.removeprefix("budget_")
        message = (
            f"{s.label} has spent {dollars(refusal.used)} of its {ADJECTIVES[window]} budget of "
            + dollars(refusal.limit_value)
            + (f" (requests in flight hold {dollars(refusal.held)})" if refusal.held else "")
            + f"; retry in {refusal.retry_after} s"
        )
        raise BudgetExhausted(message, headers=retry)
    what = {
        "requests_per_minute": f"{count(refusal.limit_value)} requests per minute",
        "tokens_per_minute": f"{count(refusal.limit_value)} tokens per minute",
        "max_concurrent": f"{count(refusal.limit_value)} concurrent requests",
    }[limit]
    used = f"{count(refusal.used)} used" + (
        f", {count(refusal.held)} held by requests in flight" if refusal.held else ""
    )
    error = TokenLimitExceeded if limit == "tokens_per_minute" else LimitExceeded
    raise error(f"{s.label} is limited to {what} ({used}); retry in {refusal.retry_after} s", headers=retry)


def unavailable(subjects: tuple[SubjectLimits, ...], now: float) -> Admitted:
    """The store is down: admit uncounted, unless some subject's limit fails closed (503)."""
    closed = [s.label for s in subjects if s.fail_closed or (s.budget_fail_closed and s.has_budget)]
    if closed:
        raise LimitsUnavailable(
            f"the limit store is unreachable and the limits of {', '.join(closed)} refuse requests until it is back",
            headers=(("retry-after", "1"),),
        )
    return Admitted(uncounted=True)


def budget_status(limits: SubjectLimits, spent: tuple[float, float, float], held: float, now: float) -> BudgetStatus:
    """The subject's budget in the policy budget's terms (core.budget), for the downgrade."""
    w = Windows.at(now)
    windows = tuple(
        WindowSpend(name, limit, used, 0.0, end, held)
        for name, limit, used, end in zip(BUDGET_WINDOWS, limits.budget_usd, spent, w.budget_ends(), strict=True)
        if limit > 0
    )
    worst = max((x.fraction for x in windows), default=0.0)
    state = EXHAUSTED if worst >= 1.0 else "downgrade" if worst >= limits.downgrade_at else BUDGET_OK
    return BudgetStatus(state, windows, limits.reject_when_exhausted, owner=limits.label)


def check(
    limits: SubjectLimits,
    w: Windows,
    now: float,
    requests: float,
    tokens: float,
    held_tokens: float,
    held_count: int,
    spent: tuple[float, float, float],
    held_usd: float,
) -> Refusal | None:
    """The admission rules for one subject, on what its store read (the Lua script in
    redislimits.py is the same rules; tests hold both to them)."""
    next_minute = max(int(w.minute + MINUTE - now), 1)
    if limits.requests_per_minute and requests + 1 > limits.requests_per_minute:
        return Refusal(limits, "requests_per_minute", next_minute, requests, limits.requests_per_minute)
    if limits.tokens_per_minute and tokens + held_tokens >= limits.tokens_per_minute:
        wait = IN_FLIGHT_RETRY_SECONDS if tokens < limits.tokens_per_minute else next_minute
        return Refusal(
            limits, "tokens_per_minute", min(wait, next_minute), tokens, limits.tokens_per_minute, held_tokens
        )
    if limits.max_concurrent and held_count >= limits.max_concurrent:
        return Refusal(limits, "max_concurrent", IN_FLIGHT_RETRY_SECONDS, held_count, limits.max_concurrent)
    if limits.reject_when_exhausted:
        for name, limit, used, end in zip(BUDGET_WINDOWS, limits.budget_usd, spent, w.budget_ends(), strict=True):
            if limit and used + held_usd >= limit:
                wait = IN_FLIGHT_RETRY_SECONDS if used < limit else max(int(end - now), 1)
                return Refusal(limits, f"budget_{name}", wait, used, limit, held_usd)
    return None


def usd_key(subject: str, window: str, start: int) -> str:
    """The Redis key of a subject's USD in one budget window (redislimits writes it, the
    operator reads it). The braces are a Redis Cluster hash tag: one subject, one slot."""
    return f"sbx:{{{subject}}}:usd:{window}:{start}"
