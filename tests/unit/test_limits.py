"""Consumer and policy limits, held to one set of rules in both stores: the embedded SQLite one
(the workers of one replica) and Redis (every replica; a real redis-server on a Unix socket).

Time is an argument of the stores, so each test places its requests in chosen windows.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from signalbox.core.errors import BudgetExhausted, LimitExceeded, LimitsUnavailable, RequestError, TokenLimitExceeded
from signalbox.extproc.limits import (
    Admission,
    Admitted,
    Charge,
    EmbeddedLimits,
    Refusal,
    StoreUnavailable,
    SubjectLimits,
    Windows,
    refuse,
    unavailable,
)
from signalbox.extproc.redislimits import RedisLimits
from tests.redis_server import RedisServer

# 2023-11-14 22:14:00 UTC: the start of a minute, 46 s before the hour ends.
T0 = 1_699_999_980.0 + 60 - 1_699_999_980 % 60


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture(params=["embedded", "redis"])
async def store(request, tmp_path):
    if request.param == "embedded":
        s = EmbeddedLimits(tmp_path / "limits.db")
        yield s
        s.close()
    else:
        server = RedisServer(tmp_path).start()
        s = RedisLimits(server.url, timeout=5.0)  # the rules, not the timeout, are tested here
        yield s
        await s.aclose()
        server.stop()


def team(**limits) -> SubjectLimits:
    return SubjectLimits("consumer:default/team-a", "consumer default/team-a", **limits)


def admission(*subjects: SubjectLimits, now: float = T0, tokens: float = 100, usd: float = 0.01, rid: str = ""):
    return Admission(rid or uuid.uuid4().hex, subjects, tokens, usd, now, now + 300)


async def test_requests_per_minute_refuse_the_request_past_the_limit_until_the_minute_ends(store):
    limits = team(requests_per_minute=3)
    outcomes = [await store.admit(admission(limits, now=T0 + i)) for i in range(4)]
    assert [isinstance(o, Admitted) for o in outcomes] == [True, True, True, False]
    refusal = outcomes[3]
    assert isinstance(refusal, Refusal) and refusal.limit == "requests_per_minute"
    assert refusal.retry_after == 57  # the minute started at T0, this was T0 + 3
    with pytest.raises(LimitExceeded) as err:
        refuse(refusal)
    assert err.value.status == 429 and ("retry-after", "57") in err.value.headers
    assert "3 requests per minute" in err.value.message and "team-a" in err.value.message
    # The next minute starts afresh.
    assert isinstance(await store.admit(admission(limits, now=T0 + 60)), Admitted)


async def test_tokens_per_minute_hold_estimates_in_flight_and_charge_real_usage(store):
    limits = team(tokens_per_minute=1000)
    first = admission(limits, tokens=600)
    assert isinstance(await store.admit(first), Admitted)
    # 600 held: a second request is still admitted (below the limit), a third is not.
    second = admission(limits, tokens=600, now=T0 + 1)
    assert isinstance(await store.admit(second), Admitted)
    refusal = await store.admit(admission(limits, now=T0 + 2))
    assert isinstance(refusal, Refusal) and refusal.limit == "tokens_per_minute" and refusal.held == 1200
    assert refusal.retry_after == 1  # only requests in flight fill it
    with pytest.raises(TokenLimitExceeded):
        refuse(refusal)
    # Real usage replaces the holds: 150 + 200 tokens used, room again.
    await store.settle(first.request_id, (Charge(limits.subject, 150, 0.0),), T0 + 3)
    await store.settle(second.request_id, (Charge(limits.subject, 200, 0.0),), T0 + 3)
    assert isinstance(await store.admit(admission(limits, tokens=600, now=T0 + 4)), Admitted)
    # Used up for real: refused until the minute ends.
    for i in range(5):
        await store.settle(f"used-{i}", (Charge(limits.subject, 200, 0.0),), T0 + 5)
    late = await store.admit(admission(limits, now=T0 + 10))
    assert isinstance(late, Refusal) and late.used >= 1000 and late.retry_after == 50


async def test_max_concurrent_counts_requests_in_flight(store):
    limits = team(max_concurrent=2)
    a, b = admission(limits), admission(limits)
    assert isinstance(await store.admit(a), Admitted) and isinstance(await store.admit(b), Admitted)
    refused = await store.admit(admission(limits))
    assert isinstance(refused, Refusal) and refused.limit == "max_concurrent"
    await store.settle(a.request_id, (Charge(limits.subject, 0, 0),), T0 + 1)
    assert isinstance(await store.admit(admission(limits, now=T0 + 1)), Admitted)


async def test_budgets_count_spend_and_holds_per_window_and_reset_with_it(store):
    limits = team(budget_usd=(0.0, 1.0, 0.0))  # one USD per day
    spent = admission(limits, usd=0.5)
    assert isinstance(await store.admit(spent), Admitted)
    await store.settle(spent.request_id, (Charge(limits.subject, 10, 0.9),), T0)
    admitted = await store.admit(admission(limits, usd=0.2, now=T0 + 1))
    assert isinstance(admitted, Admitted)
    (day_spent, held) = admitted.budgets[limits.subject]
    assert day_spent[1] == pytest.approx(0.9) and held == 0
    refusal = await store.admit(admission(limits, now=T0 + 2))  # 0.9 spent + 0.2 held >= 1
    assert isinstance(refusal, Refusal) and refusal.limit == "budget_day" and refusal.retry_after == 1
    with pytest.raises(BudgetExhausted) as err:
        refuse(refusal)
    assert "daily budget of $1" in err.value.message
    assert (await store.spend(limits.subject, T0 + 2))[1] == pytest.approx(0.9)
    tomorrow = Windows.at(T0).day + 86400
    assert isinstance(await store.admit(admission(limits, now=tomorrow + 1)), Admitted)


async def test_a_monthly_budget_resets_on_the_first_of_the_month(store):
    limits = team(budget_usd=(0.0, 0.0, 5.0))
    w = Windows.at(T0)
    await store.settle("old", (Charge(limits.subject, 0, 5.0),), T0)
    refusal = await store.admit(admission(limits, now=T0 + 5))
    assert isinstance(refusal, Refusal) and refusal.limit == "budget_month"
    assert refusal.retry_after == int(w.month_end - (T0 + 5))
    assert isinstance(await store.admit(admission(limits, now=w.month_end + 1)), Admitted)


async def test_a_refusal_by_one_subject_holds_nothing_for_the_others(store):
    policy = SubjectLimits("policy:default/chat", "policy chat", requests_per_minute=1)
    team_b = SubjectLimits("consumer:default/team-b", "consumer default/team-b", max_concurrent=1)
    assert isinstance(await store.admit(admission(team(), policy)), Admitted)
    # Team B's request is refused by the policy's limit...
    refused = await store.admit(admission(team_b, policy))
    assert isinstance(refused, Refusal) and refused.subject == policy
    # ...and took none of team B's room: its one concurrent slot is still free.
    assert isinstance(await store.admit(admission(team_b)), Admitted)


async def test_a_hold_whose_request_never_reports_lapses_at_its_estimate(store):
    limits = team(max_concurrent=1, budget_usd=(10.0, 0.0, 0.0))
    lost = Admission("lost", (limits,), 100, 0.25, T0, T0 + 30)
    assert isinstance(await store.admit(lost), Admitted)
    assert isinstance(await store.admit(admission(limits, now=T0 + 10)), Refusal)
    after = await store.admit(admission(limits, now=T0 + 31))
    assert isinstance(after, Admitted)
    assert after.budgets[limits.subject][0][0] == pytest.approx(0.25)  # charged at its estimate


async def test_concurrent_admissions_from_two_replicas_overshoot_by_at_most_one_estimate(redis_server):
    """Two replicas (two clients with their own connections) admit a burst against one small
    token limit: the script's atomicity keeps the total held to the limit plus one estimate."""
    # Sixty connections at once on a busy machine: a timeout would make it fail open here.
    replicas = [RedisLimits(redis_server.url, timeout=5.0), RedisLimits(redis_server.url, timeout=5.0)]
    limits = team(tokens_per_minute=1000)
    burst = [admission(limits, tokens=90) for _ in range(60)]
    outcomes = await asyncio.gather(*(replicas[i % 2].admit(a) for i, a in enumerate(burst)))
    admitted = sum(isinstance(o, Admitted) for o in outcomes)
    assert 1000 <= admitted * 90 < 1000 + 90
    for r in replicas:
        await r.aclose()


async def test_an_unreachable_redis_is_store_unavailable_and_fails_as_configured(redis_server):
    store = RedisLimits(redis_server.url)
    limits = team(requests_per_minute=10)
    assert isinstance(await store.admit(admission(limits)), Admitted)
    redis_server.stop()
    with pytest.raises(StoreUnavailable):
        await store.admit(admission(limits))
    with pytest.raises(StoreUnavailable):
        await store.settle("x", (Charge(limits.subject, 1, 0),), T0)
    # Fail open by default: admitted, uncounted.
    assert unavailable((limits,), T0).uncounted
    # Fail closed where a limit says so: a 503 naming who refuses.
    closed = team(requests_per_minute=10, fail_closed=True)
    with pytest.raises(LimitsUnavailable) as err:
        unavailable((limits, closed), T0)
    assert err.value.status == 503 and "team-a" in err.value.message
    budget_closed = team(budget_usd=(1.0, 0.0, 0.0), budget_fail_closed=True)
    with pytest.raises(RequestError):
        unavailable((budget_closed,), T0)
    redis_server.start()
    assert isinstance(await store.admit(admission(limits, now=T0 + 1)), Admitted)
    await store.aclose()


async def test_settlements_of_one_access_log_message_go_together(store):
    limits = team(tokens_per_minute=1000, max_concurrent=3)
    held = [admission(limits, tokens=300) for _ in range(3)]
    for a in held:
        assert isinstance(await store.admit(a), Admitted)
    await store.settle_many([(a.request_id, (Charge(limits.subject, 100, 0.0),)) for a in held], T0 + 1)
    # The three slots are free again (all three holds released), and 300 tokens are used.
    for _ in range(3):
        assert isinstance(await store.admit(admission(limits, tokens=100, now=T0 + 2)), Admitted)
    full = await store.admit(admission(limits, now=T0 + 2))
    assert isinstance(full, Refusal) and full.limit == "max_concurrent"
    crowded = await store.admit(admission(team(tokens_per_minute=600), now=T0 + 2))
    assert isinstance(crowded, Refusal) and crowded.used == 300 and crowded.held == 300


def test_refusals_state_large_and_small_limits_as_people_write_them():
    subject = SubjectLimits("consumer:default/big", "consumer default/big", tokens_per_minute=1_000_000)
    with pytest.raises(TokenLimitExceeded) as err:
        refuse(Refusal(subject, "tokens_per_minute", 12, used=1_000_512, limit_value=1_000_000, held=2_048))
    assert "limited to 1,000,000 tokens per minute (1,000,512 used, 2,048 held by requests in flight)" in (
        err.value.message
    )
    with pytest.raises(BudgetExhausted) as spent:
        refuse(Refusal(subject, "budget_month", 60, used=1_250_000.5, limit_value=1_000_000))
    assert "has spent $1,250,000.5 of its monthly budget of $1,000,000;" in spent.value.message
    with pytest.raises(BudgetExhausted) as tiny:
        refuse(Refusal(subject, "budget_day", 60, used=0.0001234, limit_value=0.000001))
    assert "has spent $0.000123 of its daily budget of $0.000001;" in tiny.value.message
