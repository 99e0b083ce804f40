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
from signalbox.extproc.learning import SHARED_NEIGHBOURS, SharedLearning
from signalbox.extproc.ledger import SpendLedger
from signalbox.extproc.strategies import SelectionState
from signalbox.operator.kube import api_client
from signalbox.replicasync import DEFAULT_INTERVAL, ReplicaSync
from tests.planted import EVENTS, accuracy, teach
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

    # The next day (an hour into it) the gone replica has not republished: the next writer
    # deletes its key.
    tomorrow = window_start(now, DAY) + DAY + HOUR
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
    assert seen["learning"] == {"gw-big": {"quality": [], "outcomes": [], "neighbours": []}}
    assert hour_spend(other.ledger) == (0.0, 0.3)
    assert big.learning_left_out


async def test_a_live_replicas_key_is_never_deleted_at_the_turn_of_the_day(k8s, tmp_path):
    """Just after midnight a replica that has not yet republished is alive, not gone: a key is
    stale only well into the new day. And a replica whose key did vanish publishes it again."""
    today = window_start(time.time(), DAY)
    a, b = replica(k8s, tmp_path, "gw-a"), replica(k8s, tmp_path, "gw-b")
    b.ledger.add("default/p", 0.3, now=today - 60)  # yesterday's spend, last published yesterday
    await asyncio.to_thread(b.sync_once, today - 60)
    a.ledger.add("default/p", 0.1, now=today + 5)
    await asyncio.to_thread(a.sync_once, today + 5)  # five seconds into the day
    await asyncio.to_thread(a.sync_once, today + 6)
    cm = await asyncio.to_thread(a.core.read_namespaced_config_map, NAME, NS)
    assert "gw-b.json" in cm.data  # kept: b republishes on its first round of the day

    # Had it been deleted anyway (an old replica version, a hand edit), b puts it back.
    await asyncio.to_thread(a.core.patch_namespaced_config_map, NAME, NS, {"data": {"gw-b.json": None}})
    data, version = await asyncio.to_thread(b._read)
    b.record(data, version, today - 30)
    await asyncio.to_thread(b.sync_once, today - 30)
    cm = await asyncio.to_thread(a.core.read_namespaced_config_map, NAME, NS)
    assert "gw-b.json" in cm.data


async def test_an_older_snapshot_never_replaces_a_newer_one(k8s, tmp_path):
    now = time.time()
    hour = window_start(now, HOUR)
    one = replica(k8s, tmp_path, "gw-1")
    newer = {"gw-2.json": _state(now, 0.5)}
    older = {"gw-2.json": _state(now, 0.2)}
    assert one.record(newer, "120", now)["spend"] == {"gw-2": {"default/p": {hour: 0.5}}}
    # The publishing thread's response, read before the watch delivered version 120:
    assert one.record(older, "95", now)["spend"] == {"gw-2": {"default/p": {hour: 0.5}}}
    assert hour_spend(one.ledger) == (0.0, 0.5)
    assert one.record(older, "121", now)["spend"] == {"gw-2": {"default/p": {hour: 0.2}}}


def _state(now: float, usd: float) -> str:
    from signalbox.core.replicastate import encode

    return encode(window_start(now, DAY), {"default/p": {window_start(now, HOUR): usd}}, {}, {})


async def test_a_backend_one_replica_put_to_rest_rests_on_the_others_until_its_time(k8s, tmp_path):
    """A 429 seen by one replica keeps every replica's requests off that backend."""
    from signalbox.extproc.cooldown import Cooldowns

    def with_cooldowns(name: str) -> ReplicaSync:
        side = replica(k8s, tmp_path, name)
        side.cooldowns = Cooldowns(tmp_path / f"{name}-cooldown.db")
        return side

    a, b = with_cooldowns("gw-a"), with_cooldowns("gw-b")
    assert a.cooldowns is not None and b.cooldowns is not None
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in (a, b)]
    try:
        now = time.time()
        a.cooldowns.observe("default/p/m", 429, {"retry-after": "3"}, now)
        lag = await wait_until(lambda: "default/p/m" in b.cooldowns.active(time.time()))
        until, reason = b.cooldowns.active(time.time())["default/p/m"]
        assert reason == "rate_limited" and until == now + 3
        assert "default/p/m" not in b.cooldowns.local(time.time())  # b publishes only what it saw
        await wait_until(lambda: "default/p/m" not in b.cooldowns.active(time.time()), timeout=6)
        print(f"cooldown reached the other replica in {lag:.2f}s")
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_a_rollout_paused_on_one_replica_is_paused_on_the_others_and_errors_add_up(k8s, tmp_path):
    from signalbox.core import rollouts
    from signalbox.extproc.rolloutstats import RolloutStats

    a, b = replica(k8s, tmp_path, "gw-a"), replica(k8s, tmp_path, "gw-b")
    a.rollouts, b.rollouts = RolloutStats(tmp_path / "a-rollout.db"), RolloutStats(tmp_path / "b-rollout.db")
    rule = rollouts.PauseRule(max_error_rate=0.5, min_requests=4)
    now = time.time()
    # Each replica alone has 1 failure of 2 (under the minimum of 4); together 2 of 4 is not past
    # 50 %, and one more failure on a makes 3 of 5: a pauses, and b follows once it has synced.
    for side in (a, b):
        side.rollouts.add("run-1", {rollouts.CANDIDATE: 2, rollouts.CANDIDATE_ERRORS: 1})
    await asyncio.to_thread(a.sync_once, now)
    await asyncio.to_thread(b.sync_once, now)
    await asyncio.to_thread(a.sync_once, now)  # a reads what b published
    assert a.rollouts.figures("run-1")[rollouts.CANDIDATE] == 4
    assert a.rollouts.record("run-1", rule, {rollouts.CANDIDATE: 1, rollouts.CANDIDATE_ERRORS: 1}, now) is not None
    assert not b.rollouts.paused("run-1")
    await asyncio.to_thread(a.sync_once, now)
    await asyncio.to_thread(b.sync_once, now)
    assert b.rollouts.paused("run-1") and b.rollouts.figures("run-1")[rollouts.CANDIDATE_ERRORS] == 3


async def test_feedback_one_replica_got_teaches_the_others_the_prompts_neighbours(k8s, tmp_path):
    """Feedback reaches whichever replica Kubernetes' Service picked: per-prompt learning must
    cross replicas as class-level learning does, or each replica learns from a share of it.
    Replica A gets every feedback event of the planted pattern; replica B, which got none,
    routes fresh prompts of both kinds right once A has published."""
    a, b = replica(k8s, tmp_path, "gw-a"), replica(k8s, tmp_path, "gw-b")
    assert a.learning is not None and b.learning is not None
    taught = SelectionState(rng=random.Random(0), shared=a.learning)
    learner = SelectionState(rng=random.Random(0), shared=b.learning)
    assert EVENTS <= SHARED_NEIGHBOURS  # one publication carries them all
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in (a, b)]
    try:
        teach(taught, per_prompt=True, events=EVENTS)
        await wait_until(lambda: len(b.learning.neighbours_since(0)) == EVENTS)
        right, classes = accuracy(learner, per_prompt=True)
        assert len(classes) == 1  # one class: class-level counts alone cannot tell the kinds apart
        assert right >= 0.95, right
        # What B took in from A is not published again as B's own.
        assert b.learning.local_rows()["neighbours"] == []
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_a_replica_takes_in_each_observation_once_and_a_restarted_ones_anew(k8s, tmp_path):
    """Every round republishes a replica's newest observations: the others take each in once.
    A restarted replica (a new state file) numbers its rows from 1 again; those are new."""
    import numpy as np

    vector = np.ones(256, dtype=np.float32) / 16.0
    a, b = replica(k8s, tmp_path, "gw-a"), replica(k8s, tmp_path, "gw-b")
    assert a.learning is not None and b.learning is not None
    a.learning.add_neighbour("p", vector, "default/cheap/m", 0.0)
    for _ in range(3):
        await asyncio.to_thread(a.sync_once)
        await asyncio.to_thread(b.sync_once)
    assert [(p, s) for _, p, _, s, _ in b.learning.neighbours_since(0)] == [("p", 0.0)]
    a.learning.close()
    (tmp_path / "gw-a-learning.db").unlink()
    restarted = replica(k8s, tmp_path, "gw-a")
    assert restarted.learning is not None
    restarted.learning.add_neighbour("p", vector, "default/cheap/m", 1.0)
    await asyncio.to_thread(restarted.sync_once)
    await asyncio.to_thread(b.sync_once)
    assert [(p, s) for _, p, _, s, _ in b.learning.neighbours_since(0)] == [("p", 0.0), ("p", 1.0)]


async def test_per_prompt_observations_shrink_as_replicas_are_added_so_the_configmap_fits(k8s, tmp_path):
    """A ConfigMap holds 1 MiB for every replica together: each replica's per-prompt share is
    NEIGHBOUR_BYTES over the replicas it saw, its newest observations first."""
    import kubernetes
    import numpy as np

    from signalbox.core.replicastate import decode, decode_vector, encode
    from signalbox.replicasync import NEIGHBOUR_BYTES

    one = replica(k8s, tmp_path, "gw-one")
    assert one.learning is not None
    for n in range(SHARED_NEIGHBOURS):
        one.learning.add_neighbour("p", np.full(256, n / 256, dtype=np.float32), "default/cheap/m", 1.0)
    await asyncio.to_thread(one.sync_once)
    core = kubernetes.client.CoreV1Api(api_client(str(k8s.url)))
    # The emulator answers on this event loop: the client's blocking calls go to a thread.
    read = asyncio.to_thread(core.read_namespaced_config_map, NAME, NS)
    alone = decode((await read).data["gw-one.json"])
    assert alone is not None and len(alone[2]["neighbours"]) == SHARED_NEIGHBOURS
    others = {f"gw-{i}.json": encode(window_start(time.time(), DAY), {}, {}) for i in range(40)}
    await asyncio.to_thread(core.patch_namespaced_config_map, NAME, NS, {"data": others})
    await asyncio.to_thread(one.sync_once)  # reads 41 replicas
    await asyncio.to_thread(one.sync_once)  # publishes its share
    crowded = decode((await asyncio.to_thread(core.read_namespaced_config_map, NAME, NS)).data["gw-one.json"])
    assert crowded is not None
    rows = crowded[2]["neighbours"]
    assert 0 < len(rows) < SHARED_NEIGHBOURS
    assert len(json.dumps(rows, separators=(",", ":"))) <= NEIGHBOUR_BYTES // 41
    # The newest are the ones kept.
    newest = [round(float(decode_vector(r[4])[0]) * 256) for r in rows]
    assert newest == list(range(SHARED_NEIGHBOURS - len(rows), SHARED_NEIGHBOURS))
