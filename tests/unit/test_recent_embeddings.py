"""The process's embedder remembers the request in hand (extproc/semantic.RecentEmbeddings): the
task-type tier, per-prompt learning and a shadow decision embed one prompt once. What it
serves must be what embedding gives, whatever the calls, and what it keeps is bounded."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from signalbox.extproc import semantic, task_model
from signalbox.extproc.semantic import MAX_CHARS, RecentEmbeddings, default_embedder

EMBED = default_embedder()
TEXTS = st.text(max_size=60) | st.sampled_from(["hi", "Summarize this.", "x" * (MAX_CHARS + 5), "x" * MAX_CHARS])


class Counting:
    def __init__(self):
        self.texts: list[str] = []

    def __call__(self, texts):
        self.texts += list(texts)
        return EMBED(texts)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(TEXTS, max_size=6), max_size=8))
def test_rows_served_are_what_embedding_gives_whatever_the_calls(calls):
    recent = RecentEmbeddings(EMBED)
    for texts in calls:
        got = recent(texts)
        assert got.shape == (len(texts), 256)
        assert np.array_equal(got, EMBED(texts), equal_nan=True)  # "" embeds as NaN either way
        got[:] = 0.0  # a caller writing to its rows changes nothing kept
    assert len(recent.rows) <= RecentEmbeddings.RECENT
    assert all(len(k) <= MAX_CHARS for k in recent.rows)


def test_a_prompt_classified_then_learned_from_is_embedded_once():
    counting = Counting()
    recent = RecentEmbeddings(counting)
    text = "Summarize the plot of Hamlet in two sentences."
    task_model.vectors(text, recent)  # the task-type tier: whole, first and last sentence
    recent([text])  # per-prompt learning's vector of the same prompt
    task_model.vectors(text, recent)  # a rollout's shadow classifies it again
    assert counting.texts == [text]


def test_the_process_embedder_is_the_remembering_one():
    assert isinstance(semantic.shared_embedder(), RecentEmbeddings)
