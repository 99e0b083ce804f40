import random
from collections import Counter

import pytest

from signalbox.core.compiler import compile_config
from signalbox.core.errors import NoHealthyBackend
from signalbox.extproc.classify import classify, features
from signalbox.extproc.runtime import RuntimeTable
from signalbox.extproc.strategies import RequestContext, SelectionState, UnsatisfiableRequest, select
from tests.factories import backend, model, policy, provider

PROVIDERS = [
    provider(
        "cheap",
        "http://127.0.0.1:1/v1",
        [
            model(
                "mini",
                quality=0.5,
                inputPricePer1M=0.1,
                outputPricePer1M=0.4,
                contextWindow=8000,
                capabilities=["streaming", "json"],
                latencyPriorMs=500,
            )
        ],
    ),
    provider(
        "mid",
        "http://127.0.0.1:2/v1",
        [
            model(
                "med",
                quality=0.75,
                inputPricePer1M=1,
                outputPricePer1M=2,
                contextWindow=32000,
                capabilities=["streaming", "tools", "json"],
                latencyPriorMs=800,
            )
        ],
    ),
    provider(
        "top",
        "http://127.0.0.1:3/v1",
        [
            model(
                "max",
                quality=0.95,
                inputPricePer1M=5,
                outputPricePer1M=15,
                contextWindow=200000,
                capabilities=["streaming", "tools", "vision", "json"],
                latencyPriorMs=1500,
            )
        ],
    ),
    provider("down", "http://127.0.0.1:4/v1", [model("dead", quality=1.0)], healthy=False),
]
ALL = [backend("cheap", "mini"), backend("mid", "med"), backend("top", "max")]


def table(strategy, backends=ALL, **spec):
    result = compile_config(PROVIDERS, [policy("p", ["x"], backends, strategy=strategy, **spec)])
    assert result.ok, result.problems
    return RuntimeTable.from_config(result.config)


def ctx(text="hello", key="", **body):
    f = features({"model": "x", "messages": [{"role": "user", "content": text}], **body})
    from signalbox.extproc.classify import DEFAULT_RULES

    return RequestContext(f, classify(f, DEFAULT_RULES), key)


def pick(t, c=None, state=None):
    return select(t.policies[0], c or ctx(), state or SelectionState(rng=random.Random(1))).choice.backend.id


def test_weighted_split_is_exact_three_to_one():
    t = table("weighted", [backend("cheap", "mini", weight=3), backend("mid", "med", weight=1)])
    state = SelectionState()
    counts = Counter(pick(t, state=state) for _ in range(2000))
    assert counts == {"default/cheap/mini": 1500, "default/mid/med": 500}


def test_round_robin_cycles():
    t, state = table("round-robin"), SelectionState()
    assert [pick(t, state=state) for _ in range(4)] == [
        "default/cheap/mini",
        "default/mid/med",
        "default/top/max",
        "default/cheap/mini",
    ]


def test_failover_takes_highest_priority_and_skips_unhealthy():
    t = table(
        "failover",
        [backend("down", "dead", priority=0), backend("top", "max", priority=1), backend("cheap", "mini", priority=2)],
    )
    assert pick(t) == "default/top/max"


def test_cost_picks_cheapest_backend_meeting_quality_and_capabilities():
    t = table("cost")
    assert pick(t, ctx("hi")) == "default/cheap/mini"  # simple: any quality
    assert pick(t, ctx("Explain step by step how to design a cache")) == "default/mid/med"  # complex >= 0.7
    assert pick(t, ctx("Prove the theorem")) == "default/top/max"  # expert >= 0.85
    assert pick(t, ctx("hi", tools=[{"type": "function"}])) == "default/mid/med"  # needs tools
    big = ctx("hi " * 50000)  # ~37.5k tokens: only the 200k-context model fits
    assert pick(t, big) == "default/top/max"


def test_cost_falls_back_to_best_quality_when_none_is_good_enough():
    t = table("cost", [backend("cheap", "mini")])
    sel = select(t.policies[0], ctx("Prove the theorem"), SelectionState())
    assert sel.choice.backend.id == "default/cheap/mini" and "best-available" in sel.reason


def test_request_needing_what_no_backend_has_is_refused_clearly():
    t = table("cost", [backend("cheap", "mini")])
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    with pytest.raises(UnsatisfiableRequest, match="lacks vision"):
        select(t.policies[0], ctx(**body), SelectionState())


def test_all_unhealthy_is_503():
    t = table("weighted", [backend("down", "dead")])
    with pytest.raises(NoHealthyBackend):
        pick(t)


def test_latency_prefers_lowest_observed_average_and_explores():
    t = table("latency", latency={"explorationRate": 0.0})
    state = SelectionState()
    assert pick(t, state=state) == "default/cheap/mini"  # lowest prior
    for _ in range(10):
        state.observe_latency("default/cheap/mini", 3000, 0.5, 500)
    assert pick(t, state=state) == "default/mid/med"
    explore = table("latency", latency={"explorationRate": 1.0})
    seen = {pick(explore, state=SelectionState(rng=random.Random(i))) for i in range(30)}
    assert len(seen) == 3


def test_least_busy_avoids_loaded_backends():
    t, state = table("least-busy"), SelectionState()
    state.in_flight["default/cheap/mini"] = 4
    state.in_flight["default/top/max"] = 1
    assert pick(t, state=state) == "default/mid/med"


def test_hash_is_sticky_per_key_and_spreads_keys():
    t = table("hash", hash={"header": "x-user"})
    for user in ("alice", "bob", "carol"):
        assert len({pick(t, ctx(key=user)) for _ in range(20)}) == 1
    assert len({pick(t, ctx(key=f"user-{i}")) for i in range(200)}) == 3


def test_hash_keeps_keys_whose_backend_stays_when_one_leaves():
    full = table("hash")
    reduced = table("hash", [backend("cheap", "mini"), backend("mid", "med")])
    keys = [f"user-{i}" for i in range(300)]
    before = {k: pick(full, ctx(key=k)) for k in keys}
    after = {k: pick(reduced, ctx(key=k)) for k in keys}
    moved = [k for k in keys if before[k] != "default/top/max" and before[k] != after[k]]
    assert moved == []


def test_classified_sends_code_and_chat_to_different_rows():
    t = table(
        "classified",
        routes=[
            {"taskTypes": ["code"], "backends": ["top/max"]},
            {"backends": ["cheap/mini"]},
        ],
    )
    assert pick(t, ctx("Write a python function that parses dates")) == "default/top/max"
    assert pick(t, ctx("good morning, how are you")) == "default/cheap/mini"
