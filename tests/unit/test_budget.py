"""Budgets: the ledger's windows, the state spend puts a policy in, and what selection does then."""

import random
import threading

import pytest

from signalbox.core.budget import (
    DAY,
    DOWNGRADE,
    EXHAUSTED,
    HOLD_SLACK_SECONDS,
    HOUR,
    OK,
    Budget,
    assess,
    refuse_if_exhausted,
)
from signalbox.core.compiler import compile_config
from signalbox.core.errors import BudgetExhausted
from signalbox.core.limits import SubjectLimits
from signalbox.core.limits import budget_status as consumer_budget
from signalbox.extproc.decide import finish, prepare
from signalbox.extproc.ledger import SpendLedger
from signalbox.extproc.runtime import RuntimeTable
from signalbox.extproc.strategies import SelectionState, select
from tests.factories import backend, policy
from tests.unit.test_strategies import ALL, PROVIDERS, ctx

# 2026-11-28 13:30:00 UTC: half past the hour, so the hour and day windows differ.
NOW = 1795872600.0
assert NOW % HOUR == 1800


def test_spend_lands_in_the_hour_and_day_windows_of_its_time():
    ledger = SpendLedger()
    ledger.add("ns/p", 0.25, now=NOW)
    ledger.add("ns/p", 0.5, now=NOW + 60)
    ledger.add("ns/p", 1.0, now=NOW - HOUR)  # earlier hour, same day
    ledger.add("ns/p", 9.0, now=NOW - DAY)  # yesterday
    ledger.add("ns/other", 4.0, now=NOW)
    status = assess(
        Budget(hourly_usd=1.0, daily_usd=10.0, downgrade_at=0.8, reject_when_exhausted=True),
        ledger.buckets("ns/p", NOW),
        NOW,
    )
    hour, day = status.windows
    assert (hour.window, hour.spent_usd, hour.remaining_usd) == ("hour", 0.75, 0.25)
    assert (day.window, day.spent_usd) == ("day", 1.75)
    assert hour.resets_at == NOW - 1800 + HOUR and day.resets_at % DAY == 0 and day.resets_at > NOW
    assert status.state == OK  # 75% of the hour, 17.5% of the day


def test_state_follows_the_most_spent_window():
    budget = Budget(hourly_usd=1.0, daily_usd=0.0, downgrade_at=0.5, reject_when_exhausted=False)
    at = lambda usd: assess(budget, [(int(NOW - 1800), usd, 0.0)], NOW).state  # noqa: E731
    assert [at(0.49), at(0.5), at(0.99), at(1.0)] == [OK, DOWNGRADE, DOWNGRADE, EXHAUSTED]
    assert [w.window for w in assess(budget, [], NOW).windows] == ["hour"]  # daily 0: no limit


def test_other_replicas_spend_counts_and_is_replaced_not_added():
    ledger = SpendLedger()
    ledger.add("ns/p", 0.2, now=NOW)
    bucket = int(NOW - 1800)
    ledger.set_remote({"gw-b": {"ns/p": {bucket: 0.3}}, "gw-c": {"ns/p": {bucket: 0.1}}})
    ledger.set_remote({"gw-b": {"ns/p": {bucket: 0.4}}, "gw-c": {"ns/p": {bucket: 0.1}}})
    (hour,) = assess(Budget(1.0, 0.0, 0.8, True), ledger.buckets("ns/p", NOW), NOW).windows
    assert (hour.local_usd, round(hour.remote_usd, 9)) == (0.2, 0.5)
    assert ledger.local(NOW) == {"ns/p": {bucket: 0.2}}  # only our own spend is published


def test_workers_sharing_a_ledger_file_count_every_cent(tmp_path):
    """Locally exact: several workers (here threads with their own connections) add concurrently."""
    path = tmp_path / "spend.db"

    def worker():
        ledger = SpendLedger(path)
        for _ in range(200):
            ledger.add("ns/p", 0.001, now=NOW)
        ledger.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (hour,) = assess(Budget(1.0, 0.0, 0.8, True), SpendLedger(path).buckets("ns/p", NOW), NOW).windows
    assert hour.local_usd == pytest.approx(0.8, abs=1e-9)


def budget_table(strategy="weighted", backends=ALL, **budget):
    spec = {"hourlyUsd": 1.0, **budget}
    result = compile_config(PROVIDERS, [policy("p", ["x"], backends, strategy=strategy, budget=spec)])
    assert result.ok, result.problems
    return RuntimeTable.from_config(result.config)


def status(table, spent):
    return assess(table.policies[0].budget, [(int(NOW - 1800), spent, 0.0)], NOW)


def test_downgrade_overrides_the_strategy_with_the_cheapest_good_enough_backend():
    t = budget_table(
        "weighted",
        [backend("top", "max", weight=1), backend("mid", "med", weight=0), backend("cheap", "mini", weight=0)],
        downgradeAt=0.5,
    )
    p, state = t.policies[0], SelectionState(rng=random.Random(1))
    assert select(p, ctx("Prove the theorem"), state, budget=status(t, 0.1)).choice.backend.id == "default/top/max"
    # Expert request, downgraded to the complex floor (0.7): mid (0.75) instead of top.
    sel = select(p, ctx("Prove the theorem"), state, budget=status(t, 0.6))
    assert sel.choice.backend.id == "default/mid/med"
    assert sel.reason == "budget-downgrade:hour-60%:cheapest-with-quality>=0.7"
    # A simple request goes to the cheapest backend of all.
    assert select(p, ctx("hi"), state, budget=status(t, 0.6)).choice.backend.id == "default/cheap/mini"


def test_exhausted_budget_goes_cheapest_or_refuses_with_429_and_retry_after():
    cheapest = budget_table(onExhausted="cheapest")
    sel = select(cheapest.policies[0], ctx("Prove the theorem"), SelectionState(), budget=status(cheapest, 1.2))
    assert (sel.choice.backend.id, sel.reason) == ("default/cheap/mini", "budget-exhausted:hour-120%:cheapest")

    reject = budget_table()  # onExhausted defaults to reject
    prepared = prepare(reject, "/v1/chat/completions", {}, b'{"model":"x","messages":[]}')
    with pytest.raises(BudgetExhausted) as err:
        finish(prepared, SelectionState(), budget=status(reject, 1.0), now=NOW)
    assert err.value.status == 429 and err.value.code == "budget_exhausted"
    assert "hourly budget of $1" in err.value.message and "resets in 1800 s" in err.value.message
    assert dict(err.value.headers) == {"retry-after": "1800"}
    refuse_if_exhausted("p", status(reject, 0.99), NOW)  # not yet: no error


def test_an_exhausted_consumer_budget_is_named_as_the_consumers_not_the_policys():
    # The decision sees a consumer's budget where it is further spent than the policy's (the
    # explain API's dry run reaches this refusal; live, admission refuses first, naming it).
    theirs = SubjectLimits("consumer:default/data", "consumer default/data", budget_usd=(0.0, 0.5, 0.0))
    prepared = prepare(budget_table(), "/v1/chat/completions", {}, b'{"model":"x","messages":[]}')
    with pytest.raises(BudgetExhausted) as err:
        finish(prepared, SelectionState(), budget=consumer_budget(theirs, (0.0, 0.6, 0.0), 0.0, NOW), now=NOW)
    assert err.value.message.startswith("consumer default/data has spent $0.6 of its daily budget of $0.5;")
    assert "policy" not in err.value.message


def test_budget_needs_a_limit_and_a_sane_fraction():
    def problems(budget):
        return [
            f"{pr.path}: {pr.message}"
            for pr in compile_config(PROVIDERS, [policy("p", ["x"], ALL, budget=budget)]).problems
        ]

    assert problems({"hourlyUsd": 1, "downgradeAt": 1.5}) == [
        "spec.budget.downgradeAt: Input should be less than or equal to 1"
    ]
    assert problems({"onExhausted": "cheapest"}) == ["spec.budget: a budget needs hourlyUsd or dailyUsd"]
    assert problems({"dailyUsd": 0}) == ["spec.budget.dailyUsd: Input should be greater than 0"]


def test_requests_in_flight_hold_their_cost_until_the_real_cost_replaces_it():
    ledger, budget = SpendLedger(), Budget(1.0, 0.0, 0.5, True, hold_seconds=60)

    def hour():
        (w,) = assess(budget, ledger.buckets("ns/p", NOW), NOW, ledger.in_flight("ns/p", NOW)).windows
        return w

    ledger.add("ns/p", 0.2, now=NOW)
    ledger.hold("ns/p", "r1", 0.3, until=NOW + 60)
    ledger.hold("ns/p", "r2", 0.4, until=NOW + 60)
    ledger.hold("ns/other", "r3", 5.0, until=NOW + 60)  # another policy's
    w = hour()
    assert (w.spent_usd, w.in_flight_usd, round(w.remaining_usd, 9), round(w.fraction, 9)) == (0.2, 0.7, 0.1, 0.9)

    ledger.add("ns/p", 0.25, now=NOW, release="r1")  # r1 answered: cost less than it held
    w = hour()
    assert (w.spent_usd, w.in_flight_usd) == (0.45, 0.4)
    ledger.add("ns/p", 0.0, now=NOW, release="r2")  # r2 failed: no usage, nothing spent
    assert (hour().spent_usd, hour().in_flight_usd) == (0.45, 0.0)


def test_a_hold_whose_accounting_never_came_is_charged_at_its_estimate(caplog):
    """E.g. the request finished while the ext_proc restarted: Envoy dropped its access log entry."""
    ledger, budget = SpendLedger(), Budget(1.0, 0.0, 0.8, True)
    ledger.hold("ns/p", "lost", 0.3, until=NOW + 150)
    ledger.hold("ns/p", "live", 0.1, until=NOW + 400)
    ledger.set_remote({}, {"gw-b": {"ns/p": (0.2, NOW + 150)}})  # another replica's: it charges its own

    later = NOW + 151
    (w,) = assess(budget, ledger.buckets("ns/p", later), later, ledger.in_flight("ns/p", later)).windows
    assert (w.spent_usd, w.in_flight_usd) == (0.3, 0.1)  # lost charged, live still held, gw-b's lapsed
    assert "1 request(s) finished without accounting" in caplog.text and "$0.300000" in caplog.text
    assert ledger.db.execute("SELECT id FROM held").fetchall() == [("live",)]


def test_a_refusal_that_only_holds_cause_asks_to_retry_soon():
    budget = Budget(1.0, 0.0, 0.8, True)
    full_with_holds = assess(budget, [(int(NOW - 1800), 0.6, 0.0)], NOW, in_flight_usd=0.5)
    assert full_with_holds.state == EXHAUSTED
    with pytest.raises(BudgetExhausted) as err:
        refuse_if_exhausted("p", full_with_holds, NOW)
    assert "requests in flight hold $0.5 of the rest" in err.value.message and "retry in 2 s" in err.value.message
    assert dict(err.value.headers) == {"retry-after": "2"}


def test_routing_holds_the_expected_cost_on_the_chosen_backend_unless_accounting_is_off():
    from signalbox.extproc.reload import TableHolder
    from signalbox.extproc.server import Processor

    table = budget_table("weighted", [backend("top", "max")])
    holder = TableHolder()
    holder.current = table
    body = b'{"model":"x","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}'
    prepared = prepare(table, "/v1/chat/completions", {}, body)
    chosen = table.backends["default/top/max"]
    processor = Processor(holder)
    assert processor.hold(prepared, chosen, NOW)
    prompt = prepared.features.estimated_tokens
    held = processor.ledger.in_flight("default/p", NOW)
    assert held == pytest.approx((prompt * chosen.input_price + 100 * chosen.output_price) / 1e6)
    # Held for the policy's whole-request timeout (default 120 s) plus slack, then presumed lost.
    lapses = NOW + 120 + HOLD_SLACK_SECONDS
    assert processor.ledger.charge_lapsed(lapses - 1) == 0.0
    assert processor.ledger.charge_lapsed(lapses) == held
    assert processor.ledger.in_flight("default/p", lapses) == 0.0

    off = Processor(holder, accounting=False)  # Envoy reports nothing back: a hold would never go
    assert off.hold(prepared, chosen, NOW) == "" and off.ledger.in_flight("default/p", NOW) == 0.0
