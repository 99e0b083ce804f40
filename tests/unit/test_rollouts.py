"""Rollout figures and pauses (issue 17): the pure rule and epochs, the store the workers share,
and what a replica publishes of them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from signalbox.core import rollouts
from signalbox.core.compiler import rollout_epoch
from signalbox.core.models import RolloutSpec, RoutingPolicySpec
from signalbox.core.replicastate import decode_rollouts, encode
from signalbox.extproc.rolloutstats import RolloutStats

RULE = rollouts.PauseRule(max_error_rate=0.2, min_requests=10)
CANDIDATE_SPEC = RoutingPolicySpec.model_validate(
    {"match": {"models": ["next"]}, "backends": [{"provider": "b", "model": "m"}]}
)


@given(decided=st.integers(0, 10_000), errors=st.integers(0, 10_000))
def test_a_rollout_pauses_only_past_its_rate_and_never_before_its_minimum(decided, errors):
    errors = min(errors, decided)
    figures = {rollouts.CANDIDATE: float(decided), rollouts.CANDIDATE_ERRORS: float(errors)}
    assert RULE.breached(figures) == (decided >= 10 and errors / decided > 0.2)


def test_an_epoch_changes_with_the_rollout_or_the_candidate_and_nothing_else():
    rollout = RolloutSpec.model_validate({"candidate": "next", "mode": "canary", "percent": 5})
    same = RolloutSpec.model_validate({"candidate": "next", "mode": "canary", "percent": 5.0})
    wider = RolloutSpec.model_validate({"candidate": "next", "mode": "canary", "percent": 10})
    edited = RoutingPolicySpec.model_validate(
        {"match": {"models": ["next"]}, "backends": [{"provider": "b", "model": "m"}], "timeoutMs": 1000}
    )
    first = rollout_epoch(rollout, CANDIDATE_SPEC)
    assert rollout_epoch(same, CANDIDATE_SPEC) == first
    assert len({first, rollout_epoch(wider, CANDIDATE_SPEC), rollout_epoch(rollout, edited)}) == 3


def test_replicas_figures_add_up_and_the_earliest_pause_is_the_pause():
    summed = rollouts.total(
        [
            {rollouts.CANDIDATE: 3, rollouts.CANDIDATE_ERRORS: 1, rollouts.PAUSED: 0},
            {rollouts.CANDIDATE: 2, rollouts.PAUSED: 200.0},
            {rollouts.CANDIDATE: 1, rollouts.PAUSED: 100.0, "unknown": 7},
        ]
    )
    assert (summed[rollouts.CANDIDATE], summed[rollouts.CANDIDATE_ERRORS], summed[rollouts.PAUSED]) == (6, 1, 100.0)
    assert "unknown" not in summed


def test_two_workers_share_figures_and_a_pause_and_the_other_replicas_count(tmp_path):
    one, two = RolloutStats(tmp_path / "rollout.db"), RolloutStats(tmp_path / "rollout.db")
    try:
        for _ in range(9):
            assert one.record("e1", RULE, {rollouts.CANDIDATE: 1, rollouts.CANDIDATE_ERRORS: 1}, 10.0) is None
        # Another replica counted 10 good requests: 10 errors of 20 is past 20 %, and only one
        # worker records the pause.
        two.set_remote({"replica-b": {"e1": {rollouts.CANDIDATE: 10}}})
        paused = two.record("e1", RULE, {rollouts.CANDIDATE: 1, rollouts.CANDIDATE_ERRORS: 1}, 11.0)
        assert paused is not None and paused[rollouts.CANDIDATE] == 20
        assert one.record("e1", RULE, {rollouts.CANDIDATE: 1, rollouts.CANDIDATE_ERRORS: 1}, 12.0) is None
        assert one.paused("e1") and not one.paused("e2")
        assert one.local() == {"e1": {rollouts.CANDIDATE: 11, rollouts.CANDIDATE_ERRORS: 11, rollouts.PAUSED: 11.0}}
        # A pause another replica published pauses this one.
        one.set_remote({"replica-b": {"e2": {rollouts.PAUSED: 5.0}}})
        assert two.paused("e2")
        # A config without epoch e1: its figures go.
        one.forget({"e2"})
        assert two.local() == {}
    finally:
        one.close()
        two.close()


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=20),
        st.dictionaries(st.sampled_from(rollouts.FIELDS), st.floats(0, 1e9, allow_nan=False)),
        max_size=5,
    )
)
def test_a_replicas_rollout_figures_survive_its_key(figures):
    raw = encode(0, {}, {}, rollouts=figures)
    assert decode_rollouts(raw) == figures


@given(st.text(max_size=200))
def test_an_unreadable_key_has_no_rollout_figures(raw):
    assert isinstance(decode_rollouts(raw), dict)


async def test_counts_buffered_in_a_worker_reach_the_other_workers_within_the_flush_interval(tmp_path):
    import asyncio
    import time

    from signalbox.extproc.rolloutstats import FLUSH_EVERY_S

    worker, other = RolloutStats(tmp_path / "rollout.db"), RolloutStats(tmp_path / "rollout.db")
    try:
        worker.flush()  # a flush just happened: what follows waits for the timer
        for _ in range(3):
            worker.add("e1", {rollouts.REQUESTS: 1, rollouts.CANDIDATE: 1})
        started = time.monotonic()
        while other.figures("e1")[rollouts.REQUESTS] < 3:
            assert time.monotonic() - started < FLUSH_EVERY_S + 2.0, "buffered counts were never written"
            await asyncio.sleep(0.02)
        # A failure is written at once, with everything buffered before it.
        worker.add("e1", {rollouts.REQUESTS: 1})
        worker.record("e1", RULE, {rollouts.CANDIDATE: 1, rollouts.CANDIDATE_ERRORS: 1}, 1.0)
        assert other.figures("e1")[rollouts.REQUESTS] == 4 and other.figures("e1")[rollouts.CANDIDATE_ERRORS] == 1
    finally:
        worker.close()
        other.close()


def test_a_candidate_with_the_live_policys_tiers_reuses_its_classification_and_others_classify_again():
    from signalbox.core.compiler import compile_config
    from signalbox.extproc import decide
    from signalbox.extproc.runtime import RuntimeTable
    from tests.factories import backend, model, policy, provider

    rule = {"name": "python-is-math", "keywords": ["python"], "taskType": "math"}
    result = compile_config(
        [provider("a", "http://127.0.0.1:9001/v1", [model("m")])],
        [
            policy("live", ["auto"], [backend("a", "m")], strategy="cost", rollout={"candidate": "same"}),
            policy("same", ["same"], [backend("a", "m")], strategy="weighted"),
            policy("ruled", ["ruled"], [backend("a", "m")], classification={"rules": [rule]}),
        ],
    )
    assert result.ok, result.problems
    table = RuntimeTable.from_config(result.config)
    raw = b'{"model": "auto", "messages": [{"role": "user", "content": "write python to sort a list"}]}'
    live = decide.prepare(table, "/v1/chat/completions", {}, raw)
    same = decide.prepare_candidate(live, table.by_id["default/same"], raw)
    ruled = decide.prepare_candidate(live, table.by_id["default/ruled"], raw)
    assert same.classification is live.classification
    assert ruled.classification.task_type == "math" != live.classification.task_type
