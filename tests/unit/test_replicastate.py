"""A replica's published key is read by the other replicas and the operator: whatever another
version or a damaged write left there, reading it never fails, and the per-prompt observations
it carries come through as published (issue 16)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from signalbox.core.replicastate import decode, decode_vector, encode, encode_vector, neighbour_row
from signalbox.extproc.learning import SharedLearning

JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


@given(st.lists(JSON, max_size=8))
def test_any_published_neighbour_rows_read_without_failing_keeping_only_well_formed_ones(rows):
    raw = json.dumps({"day": 0, "spend": {}, "learning": {"quality": [], "outcomes": [], "neighbours": rows}})
    decoded = decode(raw)
    assert decoded is not None
    for row in decoded[2]["neighbours"]:
        assert neighbour_row(row) == row
        assert 0.0 <= row[3] <= 1.0


@given(
    st.lists(st.floats(-1.0, 1.0, width=16), min_size=1, max_size=300),
    st.floats(0.0, 1.0),
    st.text(min_size=1, max_size=10),
)
def test_a_published_observation_reads_back_as_it_was_written(values, score, policy):
    vector = np.array(values, dtype=np.float32)
    row = ["e.1", policy, "default/cheap/m", score, encode_vector(vector)]
    (_, _, learning, _) = decode(encode(0, {}, {"neighbours": [row]}))  # type: ignore[misc]
    assert learning["neighbours"] == [row]
    assert np.array_equal(decode_vector(learning["neighbours"][0][4]), vector)


@pytest.mark.parametrize(
    "row",
    [
        ["e.1", "p", "b", 1.5, encode_vector(np.ones(4))],  # score outside 0..1
        ["e.1", "p", "b", True, encode_vector(np.ones(4))],  # a boolean is not a score
        ["e.1", "p", "b", 0.5, "not base64!"],
        ["e.1", "p", "b", 0.5, "AA=="],  # an odd number of bytes
        ["e.1", "p", "b", 0.5, encode_vector(np.array([np.inf, 0.0]))],
        ["e.1", "p", "b", 0.5, encode_vector(np.ones(5000))],  # longer than any embedding
        ["e.1", "", "b", 0.5, encode_vector(np.ones(4))],
        ["e.1", "p", "b", 0.5],
    ],
)
def test_malformed_observations_are_refused(row):
    with pytest.raises(ValueError):
        neighbour_row(row)


def test_the_newest_observations_are_published_and_others_are_not_republished(tmp_path):
    from signalbox.extproc import learning

    mine, theirs = SharedLearning(tmp_path / "mine.db"), SharedLearning(tmp_path / "theirs.db")
    for n in range(learning.SHARED_NEIGHBOURS + 10):
        mine.add_neighbour("p", np.full(4, n, dtype=np.float32), "b", 1.0)
    published = mine.local_rows()["neighbours"]
    assert len(published) == learning.SHARED_NEIGHBOURS
    assert [decode_vector(r[4])[0] for r in published] == list(range(10, learning.SHARED_NEIGHBOURS + 10))
    theirs.set_remote({"gw-a": mine.local_rows()})
    theirs.set_remote({"gw-a": mine.local_rows()})  # published again next round: taken in once
    assert len(theirs.neighbours_since(0)) == learning.SHARED_NEIGHBOURS
    assert theirs.local_rows()["neighbours"] == []
    # The other replica's rows leave no remote rows behind when it is gone (its counts do);
    # what was learned stays, as a worker's own observations do.
    theirs.set_remote({})
    assert len(theirs.neighbours_since(0)) == learning.SHARED_NEIGHBOURS


def test_a_vector_of_another_length_is_left_out_not_fatal():
    from signalbox.extproc.neighbours import Neighbours

    memory = Neighbours()
    memory.add("p", np.ones(4, dtype=np.float32) / 2, "b", 1.0)
    memory.add("p", np.ones(8, dtype=np.float32), "b", 0.0)  # another replica's embedding
    assert len(memory) == 1
    assert memory.estimate("p", np.ones(8, dtype=np.float32), ["b"]) == {}
    assert memory.estimate("p", np.ones(4, dtype=np.float32) / 2, ["b"])["b"][0] == 1.0
