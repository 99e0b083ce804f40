"""Per-prompt learning (issue 16): feedback moves decisions for a prompt's neighbours, not only
its class. A planted pattern: in one class, prompts of one kind are too hard for the cheap
backend and prompts of another kind are not. Live feedback (the `/v1/feedback` path, decision
tokens and all) teaches the router to send each kind where it belongs; class-level learning
alone cannot, since both kinds are one class."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalbox.extproc import decide
from signalbox.extproc.decisions import DecisionSigner
from signalbox.extproc.neighbours import Neighbours
from signalbox.extproc.strategies import SelectionState
from tests.planted import EVENTS, learn_live, route, table


def test_feedback_teaches_the_prompts_neighbours_within_the_stated_events():
    accuracy, classes = learn_live(per_prompt=True, events=EVENTS)
    assert len(classes) == 1  # one class: only the prompts themselves tell the kinds apart
    assert accuracy >= 0.95, accuracy


def test_class_level_learning_alone_cannot_tell_the_kinds_apart():
    accuracy, _ = learn_live(per_prompt=False, events=EVENTS * 5)
    assert accuracy <= 0.6, accuracy


def test_an_estimate_leans_on_the_nearest_and_its_evidence_grows_with_closeness():
    memory = Neighbours(k=4, bandwidth=0.1)
    a, b = np.array([1.0, 0.0], dtype=np.float32), np.array([0.0, 1.0], dtype=np.float32)
    for _ in range(4):
        memory.add("p", a, "x", 1.0)
        memory.add("p", b, "x", 0.0)
    near_a = memory.estimate("p", np.array([0.995, 0.0998], dtype=np.float32), ["x", "unknown"])
    assert set(near_a) == {"x"} and near_a["x"][0] > 0.95 and near_a["x"][1] > 3.5
    far = memory.estimate("p", np.array([0.7071, -0.7071], dtype=np.float32), ["x"])
    assert far["x"][1] < near_a["x"][1]  # a region never seen counts for less
    assert memory.estimate("other", a, ["x"]) == {}


def test_the_memory_is_a_bounded_ring():
    memory = Neighbours(capacity=8)
    for i in range(20):
        memory.add("p", np.array([1.0, 0.0], dtype=np.float32), "x", float(i >= 12))
    assert len(memory) == 8
    (mean, _) = memory.estimate("p", np.array([1.0, 0.0], dtype=np.float32), ["x"])["x"]
    assert mean == pytest.approx(1.0)  # the oldest (scored 0) were forgotten first


def test_workers_sharing_a_learning_file_learn_from_each_others_feedback(tmp_path):
    """Two workers: one decides, the other gets the feedback (Envoy balances feedback calls
    too); both then know the prompt's neighbourhood."""
    from signalbox.extproc.learning import SharedLearning

    deciding = SelectionState(shared=SharedLearning(tmp_path / "learning.db"))
    other = SelectionState(shared=SharedLearning(tmp_path / "learning.db"))
    t, signer = table(True), DecisionSigner()
    outcome = route(t, deciding, "Prove that there are infinitely many primes of the form 4k+3.")
    token = signer.token("learner", outcome.classification.class_key, outcome.selection.choice.backend.id)
    deciding.remember(token, outcome.vector)
    decide.apply_feedback(t, other, json.dumps({"decision": token, "score": 0.0}).encode(), signer)
    chosen = outcome.selection.choice.backend.id
    assert other.neighbours.estimate("learner", outcome.vector, [chosen])[chosen][0] == 0.0
    deciding.refresh()
    assert deciding.neighbours.estimate("learner", outcome.vector, [chosen])[chosen][0] == 0.0
    assert len(deciding.neighbours) == len(other.neighbours) == 1


def _held(memory: Neighbours) -> set[tuple[str, int]]:
    """(policy, arrival) of every observation the memory holds: its score is its arrival here."""
    held = set()
    for name, ring in memory._rings.items():
        for slot in range(ring.filled):
            if ring.backends[slot] != -1:
                held.add((name, int(ring.scores[slot])))
    return held


def test_the_memory_is_bounded_across_policies_forgetting_the_oldest_of_any():
    """A worker's memory grows with what it is told to keep, not with the number of policies
    that get feedback: past `total`, the oldest observation of any policy goes first."""
    memory = Neighbours(capacity=8, total=12)
    for i in range(40):
        memory.add(f"p{i % 5}", np.array([1.0, 0.0], dtype=np.float32), "x", float(i))
    assert len(memory) == 12
    assert _held(memory) == {(f"p{i % 5}", i) for i in range(28, 40)}
    # A policy whose every observation was forgotten is gone, and one that gets new feedback
    # starts again.
    quiet = Neighbours(capacity=8, total=4)
    quiet.add("old", np.array([1.0, 0.0], dtype=np.float32), "x", 0.0)
    for i in range(4):
        quiet.add("busy", np.array([1.0, 0.0], dtype=np.float32), "x", float(i))
    assert quiet.estimate("old", np.array([1.0, 0.0], dtype=np.float32), ["x"]) == {}
    quiet.add("old", np.array([0.0, 1.0], dtype=np.float32), "x", 1.0)
    assert quiet.estimate("old", np.array([0.0, 1.0], dtype=np.float32), ["x"])["x"][0] == pytest.approx(1.0)
    assert len(quiet) == 4


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 3), max_size=120),
    st.integers(1, 6),
    st.integers(1, 10),
)
def test_what_the_memory_holds_is_each_policys_latest_then_the_latest_of_all(policies, capacity, total):
    memory = Neighbours(capacity=capacity, total=total)
    expected: list[tuple[str, int]] = []
    for i, p in enumerate(policies):
        memory.add(f"p{p}", np.array([1.0, 0.0], dtype=np.float32), "x", float(i))
        expected.append((f"p{p}", i))
        mine = [e for e in expected if e[0] == f"p{p}"]
        if len(mine) > capacity:
            expected.remove(mine[0])  # the policy's ring overwrote its oldest
        if len(expected) > total:
            expected.pop(0)  # the oldest of all
        assert _held(memory) == set(expected)
        assert len(memory) == len(expected)
