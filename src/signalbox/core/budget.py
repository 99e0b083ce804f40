"""Budgets: what a policy's spend makes it do (pure: spend figures in, a state out).

Windows are calendar hours and days in UTC rather than sliding ones: "resets at 14:00 UTC" is
something a client can be told (Retry-After) and an operator can reason about, and spend is
stored in hourly buckets so both windows are sums of the same rows. Spend has two parts:
`local` (this gateway replica, exact: every worker writes the same ledger) and `remote` (the
other replicas, as last published through the Kubernetes API).

Requests still in flight count too, at their estimated cost (`in_flight`): a routed request
holds that much until its real cost replaces the hold. Without it a burst of concurrent
requests is admitted on the spend of the requests before the burst and overshoots a limit by
everything the burst costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from signalbox.core.errors import BudgetExhausted

HOUR, DAY = 3600, 86400
# How a refusal names a window's budget ("daily", not "dayly").
ADJECTIVES = {"hour": "hourly", "day": "daily", "month": "monthly"}
OK, DOWNGRADE, EXHAUSTED = "ok", "downgrade", "exhausted"
# Retry-After of a refusal that only requests in flight cause: they usually finish in seconds.
IN_FLIGHT_RETRY_SECONDS = 2
# A hold outlives the policy's request timeout by this much: the access log entry that releases
# it is batched and may queue behind others.
HOLD_SLACK_SECONDS = 30


@dataclass(frozen=True, slots=True)
class Budget:
    """A policy's limits as the data plane reads them (0: no limit for that window)."""

    hourly_usd: float
    daily_usd: float
    downgrade_at: float
    reject_when_exhausted: bool
    # How long a request's hold stands before it is presumed lost (its access log entry never
    # came, e.g. the ext_proc restarted): the policy's whole-request timeout plus slack.
    hold_seconds: float = 180.0

    def limits(self) -> tuple[tuple[str, int, float], ...]:
        return tuple(
            (name, seconds, limit)
            for name, seconds, limit in (("hour", HOUR, self.hourly_usd), ("day", DAY, self.daily_usd))
            if limit > 0
        )


def window_start(now: float, seconds: int) -> int:
    return int(now // seconds) * seconds


@dataclass(frozen=True, slots=True)
class WindowSpend:
    window: str
    limit_usd: float
    local_usd: float
    remote_usd: float
    resets_at: int
    # Estimated cost of the requests in flight (every replica's), held against the limit.
    in_flight_usd: float = 0.0

    @property
    def spent_usd(self) -> float:
        return self.local_usd + self.remote_usd

    @property
    def remaining_usd(self) -> float:
        return max(self.limit_usd - self.spent_usd - self.in_flight_usd, 0.0)

    @property
    def fraction(self) -> float:
        return (self.spent_usd + self.in_flight_usd) / self.limit_usd


def dollars(usd: float) -> str:
    """An amount as a refusal states it: "$1,000,000", "$0.5", "$0.000001" (never "$1e+06")."""
    return "$" + (f"{usd:,.6f}".rstrip("0").rstrip(".") or "0")


def count(n: float) -> str:
    """Requests or tokens as a refusal states them: "1,000,000", never "1e+06"."""
    return f"{n:,.0f}"


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    state: str
    windows: tuple[WindowSpend, ...]
    reject_when_exhausted: bool
    # Whose budget, as a refusal names it, when not the policy's ("consumer default/team-a"):
    # the decision sees a consumer's budget where it is further spent than the policy's.
    owner: str = ""

    @property
    def binding(self) -> WindowSpend:
        """The window closest to (or furthest past) its limit: the one that decides the state."""
        return max(self.windows, key=lambda w: w.fraction)


# Hourly buckets: (bucket start, local USD, remote USD).
Buckets = list[tuple[int, float, float]]


def assess(budget: Budget, buckets: Buckets, now: float, in_flight_usd: float = 0.0) -> BudgetStatus:
    windows = []
    for name, seconds, limit in budget.limits():
        start = window_start(now, seconds)
        inside = [(local, remote) for bucket, local, remote in buckets if start <= bucket < start + seconds]
        windows.append(
            WindowSpend(
                window=name,
                limit_usd=limit,
                local_usd=sum(local for local, _ in inside),
                remote_usd=sum(remote for _, remote in inside),
                resets_at=start + seconds,
                in_flight_usd=in_flight_usd,
            )
        )
    worst = max((w.fraction for w in windows), default=0.0)
    state = EXHAUSTED if worst >= 1.0 else DOWNGRADE if worst >= budget.downgrade_at else OK
    return BudgetStatus(state, tuple(windows), budget.reject_when_exhausted)


def refuse_if_exhausted(policy: str, status: BudgetStatus, now: float) -> None:
    """Raise the 429 a `reject` policy answers while its budget is spent."""
    if status.state != EXHAUSTED or not status.reject_when_exhausted:
        return
    w = status.binding
    owner = status.owner or f"policy {policy!r}"
    message = f"{owner} has spent {dollars(w.spent_usd)} of its {ADJECTIVES[w.window]} budget of {dollars(w.limit_usd)}"
    if w.spent_usd < w.limit_usd:
        # Full only with what requests in flight hold: room may come back when they finish.
        wait = min(max(int(w.resets_at - now), 1), IN_FLIGHT_RETRY_SECONDS)
        message += f", and requests in flight hold {dollars(w.in_flight_usd)} of the rest; retry in {wait} s"
    else:
        wait = max(int(w.resets_at - now), 1)
        message += f"; it resets in {wait} s"
    raise BudgetExhausted(
        message,
        headers=(("retry-after", str(wait)),),
    )
