"""Budget spend and learning shared by gateway replicas through one ConfigMap (kmock's API
emulator, the real `kubernetes` client): each replica sees the others' within about one
publishing interval."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

from signalbox.core.budget import DAY, HOUR, Budget, assess, window_start
from signalbox.extproc.learning import SharedLearning
from signalbox.extproc.ledger import SpendLedger
from signalbox.operator.kube import api_client
from signalbox.replicasync import DEFAULT_INTERVAL, ReplicaSync
from tests.windows import clear_of_the_hour_edge

NS, NAME = "signalbox-system", "signalbox-replicas"
BUDGET = Budget(hourly_usd=1.0, daily_usd=0.0, downgrade_at=0.8, reject_when_exhausted=True)
KEY = ("p", "code/simple", "default/cheap/m")


def replica(k8s, tmp_path, name: str, interval: float = DEFAULT_INTERVAL) -> ReplicaSync:
    return ReplicaSync(
        api_client(str(k8s.url)),
        NS,
        NAME,
        name,
        SpendLedger(tmp_path / f"{name}-spend.db"),
        SharedLearning(tmp_path / f"{name}-learning.db"),
        interval,
    )


def hour_spend(ledger: SpendLedger, policy: str = "default/p") -> tuple[float, float]:
    now = time.time()
    (w,) = assess(BUDGET, ledger.buckets(policy, now), now).windows
    return round(w.local_usd, 9), round(w.remote_usd, 9)


async def wait_until(check, timeout: float = 15.0) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, "replica state did not converge"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_replicas_converge_on_each_others_spend_and_learning_within_an_interval(k8s, tmp_path):
    clear_of_the_hour_edge()
    a, b = replica(k8s, tmp_path, "gw-a"), replica(k8s, tmp_path, "gw-b")
    assert a.learning is not None and b.learning is not None
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in (a, b)]
    try:
        lags, rng = [], random.Random(7)
        for n in range(1, 6):
            await asyncio.sleep(rng.uniform(0, DEFAULT_INTERVAL))  # spend arrives at any point of an interval
            a.ledger.add("default/p", 0.1)
            lags.append(await wait_until(lambda n=n: hour_spend(b.ledger) == (0.0, round(0.1 * n, 9))))
        b.ledger.add("default/p", 0.05)
        await wait_until(lambda: hour_spend(a.ledger) == (0.5, 0.05))
        # Each side counts its own spend exactly and the other's as published: the same total.
        assert sum(hour_spend(a.ledger)) == sum(hour_spend(b.ledger)) == 0.55

        # Feedback and outcomes one replica saw teach the other (counts add up; latency stays local).
        a.learning.add_quality(KEY, 0.0)
        a.learning.add_quality(KEY, 1.0)
        a.learning.add_outcome(KEY, False, 900.0)
        b.learning.add_quality(KEY, 0.5)
        b.learning.add_outcome(KEY, True, 100.0)

        def learned(side: ReplicaSync):
            assert side.learning is not None
            quality, outcomes = side.learning.load()
            return quality.get(KEY), outcomes.get(KEY)

        # A replica may publish between two of the writes above, so wait for all of them to arrive.
        await wait_until(
            lambda: learned(b) == ([3.0, 1.5], [1.0, 1.0, 100.0]) and learned(a) == ([3.0, 1.5], [1.0, 1.0, 900.0])
        )

        median, worst = statistics.median(lags), max(lags)
        # A figure for the docs, not an assertion: convergence is what wait_until checks.
        print(f"lag between replicas (interval {DEFAULT_INTERVAL:g}s): median {median:.2f}s, max {worst:.2f}s")
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_a_gone_replicas_state_counts_until_the_day_ends_then_is_removed(k8s, tmp_path):
    now = time.time()
    hour = window_start(now, HOUR)
    gone, alive = replica(k8s, tmp_path, "gw-gone"), replica(k8s, tmp_path, "gw-alive")
    gone.ledger.add("default/p", 0.4, now=now)
    await asyncio.to_thread(gone.sync_once, now)  # creates the ConfigMap: no replica had written yet
    seen = await asyncio.to_thread(alive.sync_once, now)
    assert seen["spend"] == {"gw-gone": {"default/p": {hour: 0.4}}}

    # The next day the gone replica has not republished: the next writer deletes its key.
    tomorrow = now + DAY
    alive.ledger.add("default/p", 0.01, now=tomorrow)
    assert (await asyncio.to_thread(alive.sync_once, tomorrow))["spend"] == {}
    await asyncio.to_thread(alive.sync_once, tomorrow)
    cm = await asyncio.to_thread(alive.core.read_namespaced_config_map, NAME, NS)
    assert sorted(cm.data) == ["gw-alive.json"]
    published = json.loads(cm.data["gw-alive.json"])
    assert published["day"] == window_start(tomorrow, DAY)
    assert published["spend"] == {"default/p": {str(window_start(tomorrow, HOUR)): 0.01}}


async def test_requests_in_flight_on_one_replica_hold_budget_on_the_others_until_they_end(k8s, tmp_path):
    clear_of_the_hour_edge(10)
    now = time.time()
    a, b = replica(k8s, tmp_path, "gw-a"), replica(k8s, tmp_path, "gw-b")
    a.ledger.hold("default/p", "r1", 0.25, until=now + 60)
    a.ledger.hold("default/p", "r2", 0.5, until=now + 90)
    await asyncio.to_thread(a.sync_once, now)
    seen = await asyncio.to_thread(b.sync_once, now)
    assert seen["held"] == {"gw-a": {"default/p": (0.75, now + 90)}}
    assert b.ledger.in_flight("default/p", now) == 0.75
    assert b.ledger.in_flight("default/p", now + 91) == 0.0  # a gone replica's holds lapse

    a.ledger.add("default/p", 0.2, now=now, release="r1")  # r1 answered, r2 still in flight
    await asyncio.to_thread(a.sync_once, now)
    await asyncio.to_thread(b.sync_once, now)
    assert b.ledger.in_flight("default/p", now) == 0.5 and hour_spend(b.ledger) == (0.0, 0.2)


async def test_unreadable_entries_are_ignored_not_fatal(k8s, tmp_path):
    clear_of_the_hour_edge(10)
    one = replica(k8s, tmp_path, "gw-1")
    one.ledger.add("default/p", 0.2)
    await asyncio.to_thread(one.sync_once)
    await asyncio.to_thread(
        one.core.patch_namespaced_config_map, NAME, NS, {"data": {"intruder.json": "not json", "notes": "hello"}}
    )
    assert await asyncio.to_thread(one.sync_once) == {"spend": {}, "learning": {}, "held": {}}
    assert hour_spend(one.ledger) == (0.2, 0.0)


async def test_learning_too_large_for_the_configmap_is_left_out_but_spend_is_shared(k8s, tmp_path, monkeypatch):
    import signalbox.replicasync

    monkeypatch.setattr(signalbox.replicasync, "MAX_KEY_BYTES", 2048)
    clear_of_the_hour_edge(10)
    big, other = replica(k8s, tmp_path, "gw-big"), replica(k8s, tmp_path, "gw-other")
    assert big.learning is not None
    for n in range(100):
        big.learning.add_quality(("p", f"class-{n}", "default/cheap/m"), 1.0)
    big.ledger.add("default/p", 0.3)
    await asyncio.to_thread(big.sync_once)
    seen = await asyncio.to_thread(other.sync_once)
    assert seen["learning"] == {"gw-big": {"quality": [], "outcomes": []}}
    assert hour_spend(other.ledger) == (0.0, 0.3)
    assert big.learning_left_out
