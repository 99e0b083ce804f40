"""The shipped task-type classifier (extproc/task_model.py): what it is, and that any text a
client sends is classified without error, within the tier's budget of work."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from signalbox.extproc import default_routes, task_model
from signalbox.extproc.semantic import prompt_vector

MODEL = task_model.load()


def test_the_shipped_model_covers_every_task_type_and_says_what_it_was_trained_on():
    assert set(MODEL.classes) == {
        "chat",
        "code",
        "creative",
        "extraction",
        "math",
        "qa",
        "reasoning",
        "summarization",
        "translation",
    }
    assert MODEL.weights.shape == (len(MODEL.classes), 256 + task_model.HASH_BUCKETS)
    assert MODEL.meta["hash_buckets"] == task_model.HASH_BUCKETS and MODEL.meta["training_rows"] > 1000
    assert len(MODEL.meta["training_data_sha256"]) == 64


def test_the_words_a_request_uses_steer_it_to_its_type():
    # Requests written here (not from any dataset): one per type the datasets do not label.
    for text, expected in (
        ("Please translate 'the invoice is overdue' into Swedish.", "translation"),
        ("Give me a three-bullet TL;DR of the attached meeting minutes.", "summarization"),
        ("Pull every phone number out of the text below and return JSON.", "extraction"),
    ):
        hit = default_routes.router().classify(text)
        assert hit is not None and hit.task_type == expected and hit.name == f"task-{expected}", (text, hit)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=3000))
def test_any_text_gets_a_distribution_over_the_types(text):
    probabilities = MODEL.probabilities(prompt_vector(text or " "), text)
    assert probabilities.shape == (len(MODEL.classes),) and np.isclose(probabilities.sum(), 1.0)
    buckets = task_model.word_buckets(text)
    assert buckets.size == 0 or (buckets.min() >= 0 and buckets.max() < task_model.HASH_BUCKETS)
    hit = default_routes.router().classify(text)
    assert hit is None or (hit.task_type in MODEL.classes and hit.similarity >= default_routes.MIN_PROBABILITY)
