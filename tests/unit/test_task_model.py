"""The shipped task-type classifier (extproc/task_model.py): what it is, and that any text a
client sends is classified without error, within the tier's budget of work."""

from __future__ import annotations

import itertools
import json
import re
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalbox.core.errors import ModelFileError
from signalbox.extproc import default_routes, task_model
from signalbox.extproc.semantic import shared_embedder

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
    assert MODEL.weights.shape == (len(MODEL.classes), 3 * 256 + 2 * task_model.HASH_BUCKETS)
    assert MODEL.meta["hash_buckets"] == task_model.HASH_BUCKETS and MODEL.meta["training_rows"] > 1000
    assert MODEL.meta["features_version"] == task_model.FEATURES_VERSION
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
    probabilities = MODEL.probabilities(task_model.vectors(text, shared_embedder()), text)
    assert probabilities.shape == (len(MODEL.classes),) and np.isclose(probabilities.sum(), 1.0)
    buckets = task_model.word_buckets(text)
    assert buckets.size == 0 or (buckets.min() >= 0 and buckets.max() < task_model.HASH_BUCKETS)
    hit = default_routes.router().classify(text)
    assert hit is None or (hit.task_type in MODEL.classes and hit.similarity >= default_routes.MIN_PROBABILITY)


def _reference_buckets(text: str) -> np.ndarray:
    """The features the shipped weights were trained against, spelled out plainly."""
    words = re.findall(r"[a-z0-9']+", text[: task_model.MAX_CHARS].lower())
    tokens = set(words) | {f"{a} {b}" for a, b in itertools.pairwise(words)}
    return np.unique(np.array([zlib.crc32(t.encode()) % task_model.HASH_BUCKETS for t in tokens], dtype=np.int64))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=600) | st.lists(st.sampled_from(["the", "cat", "Sat.", "\n", "on", "it!", " "])).map("".join))
def test_word_features_are_the_ones_the_weights_were_trained_on(text):
    """The request path's hashing (Python sets, no numpy per call) gives exactly the buckets the
    model's weights are laid out against."""
    assert np.array_equal(task_model.word_buckets(text), _reference_buckets(text))
    whole, first, last = task_model.segments(text)
    ends = [e for e in (first, last, *task_model._lines(text)) if e]
    union = np.unique(np.concatenate([_reference_buckets(e) for e in ends] or [np.zeros(0, np.int64)]))
    (whole_block, _), (ends_block, _) = task_model.word_blocks(text)
    assert np.array_equal(whole_block, _reference_buckets(whole)) and np.array_equal(ends_block, union)


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=1500)
    | st.lists(st.sampled_from(["Write", "a", "poem", "Translate", "?", "\n", "x"])).map(" ".join)
)
def test_the_served_model_computes_what_training_scored(text):
    """The word weights are served as int8 rows (TaskModel); `make train-classifier` and `make
    eval` score the dense matrix the model reports. Both must give the same probabilities."""
    vectors = task_model.vectors(text, shared_embedder())
    logits = task_model.features(vectors, text) @ MODEL.weights.T + MODEL.bias
    expected = np.exp(logits - logits.max())
    assert np.allclose(MODEL.probabilities(vectors, text), expected / expected.sum(), atol=1e-4)


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=400) | st.lists(st.sampled_from(["Hi", "there.", "Summarize", "this!", "\n", " "])).map(" ".join)
)
def test_each_segment_is_embedded_as_it_would_be_alone(text):
    """Segments that are the same text (a one-sentence request) are embedded once: the rows must
    be what embedding each segment alone gives, an empty sentence zeros."""
    embed = shared_embedder()
    whole, first, last = task_model.segments(text)
    alone = np.stack([embed([t or " "])[0] for t in (whole, first, last)])
    if not first:
        alone[1:] = 0.0
    assert np.array_equal(task_model.vectors(text, embed), alone)


def test_a_saved_model_loads_as_it_was(tmp_path):
    path = tmp_path / "task_types.npz"
    task_model.save(MODEL, path)
    again = task_model.load(path)
    assert again.classes == MODEL.classes and again.meta == MODEL.meta
    assert np.array_equal(again.weights, MODEL.weights) and np.array_equal(again.bias, MODEL.bias)
    # Quantizing what is served changes nothing: training's rounding is the served one.
    assert np.allclose(task_model.quantized(MODEL.weights), MODEL.weights, atol=1e-6)


def test_weights_for_other_features_are_refused_not_scored(tmp_path):
    stale = tmp_path / "task_types.npz"
    meta = dict(MODEL.meta, features_version=1)
    np.savez(
        stale, weights=MODEL.weights, bias=MODEL.bias, classes=np.array(MODEL.classes), meta=np.array(json.dumps(meta))
    )
    with pytest.raises(ModelFileError, match="make train-classifier"):
        task_model.load(stale)


# Written here for this test (no dataset's text): documents a request may carry, on topics that
# pull toward other types (code, maths, a story, a question), and what is asked of them.
PASSAGES = [
    "The build server restarts every night at two. Last week the Python job that rotates the "
    "logs failed twice because the disk was full, and the on-call engineer had to delete old "
    "archives by hand before the deploy could go on.",
    "Our cooperative grows apples on forty hectares. In 2023 we harvested 310 tonnes, sold 60 "
    "percent to two supermarkets in Utrecht and pressed the rest into juice, which brought in "
    "about 95,000 euros.",
    "Once upon a time a lighthouse keeper named Ilse found a bottle on the rocks. Inside was a "
    "map of the bay drawn by her grandfather, with a cross where the old ferry had sunk.",
    "Why do leaves change colour in autumn? As days shorten, trees stop making chlorophyll, the "
    "green fades, and the yellow and orange pigments that were there all along show through.",
]
ASKS = {
    "summarization": ["Summarize this in two sentences.", "Give me a short summary of the text."],
    "translation": ["Translate this into German.", "Please translate the text to Italian."],
    "extraction": ["Extract every number and date from the text.", "List all the names mentioned, as JSON."],
}


@pytest.mark.parametrize("task", sorted(ASKS))
def test_what_a_request_asks_decides_its_type_not_the_document_it_carries(task):
    # The shipped model labelled such requests by their passage (0-2 of 40 per type in the
    # probe of eval/classifier_passages.py) before it read the ends of a request apart.
    router = default_routes.router()
    got = [
        router.classify(text)
        for ask in ASKS[task]
        for passage in PASSAGES
        for text in (f"{ask}\n\n{passage}", f"{passage}\n\n{ask}")
    ]
    right = sum(hit is not None and hit.task_type == task for hit in got)
    assert right >= 0.9 * len(got), [hit and hit.task_type for hit in got]


def test_short_conversational_turns_are_small_talk():
    # With few words the model leaned on its biases: "hi", "lol" and "bye" were questions (qa).
    turns = ["hello there!", "see ya", "good afternoon", "hey, how's it going", "ok thanks", "hi :)", "night night"]
    got = [default_routes.router().classify(t) for t in turns]
    assert sum(hit is not None and hit.task_type == "chat" for hit in got) >= len(turns) - 1, got


# Written here for these tests (no dataset's text, and personas, frames and puzzles no training
# row uses).
PERSONAS = [
    "You are a retired sea captain telling stories at the harbour bar. Never break character. "
    "What was the worst storm you sailed through?",
    "Play the part of a snooty art critic at a gallery opening. I'm a guest. What do you think of the "
    "blue painting by the door?",
    "For the rest of this conversation, be a cheerful 1950s radio host. Introduce the next song.",
    "I'd like you to become my old chemistry teacher for a while. Stay in that role. Why did I fail the exam?",
    "Answer me as a dragon guarding its hoard would. Why should I not take a single coin?",
    "Be a hard-boiled taxi driver in New York and keep that voice. Which route do you take to JFK at rush hour?",
]
PUZZLES = [
    "A bat and a ball cost 1.10 together, and the bat costs 1.00 more than the ball. How much is the ball? "
    "Explain your reasoning.",
    "Four friends sit in a row. Ines is not at either end, Omar sits right of Ines, and Lea is at the left end. "
    "Where does Kai sit?",
    "If no reptiles have fur and some pets are reptiles, must some pets lack fur? Justify it.",
    "Suppose the wheel had never been invented. How would cities have grown differently? Reason it through.",
    "Roughly how many litres of water does a city of 500,000 people use in a day? Show your estimate step by step.",
    "A man looks at a portrait and says: brothers and sisters I have none, but that man's father is my father's "
    "son. Who is in the portrait?",
    "If it takes five machines five minutes to make five widgets, how long do 100 machines take to make 100? Why?",
    "What if bees vanished tomorrow? Trace the knock-on effects on farming and prices.",
    "Every card with a vowel on one side has an even number on the other. Which cards must you turn to check it: "
    "E, K, 4, 7?",
    "Our website got slower only on Mondays. Think through what could cause that and how you would narrow it down.",
]


def test_a_persona_to_keep_is_small_talk_whatever_it_is_asked():
    # just_eval counts role-play as chat. Before personas were trained on, the question inside
    # decided: none of these six was chat (qa, reasoning, creative); now 4-5 are.
    got = [default_routes.router().classify(t) for t in PERSONAS]
    assert sum(hit is not None and hit.task_type == "chat" for hit in got) >= 4, [hit and hit.task_type for hit in got]


def test_puzzles_estimates_and_what_ifs_are_reasoning():
    # Asked as questions, they went to qa, the largest class, before puzzles were trained on:
    # 3 of these 10 were reasoning, now 6.
    got = [default_routes.router().classify(t) for t in PUZZLES]
    assert sum(hit is not None and hit.task_type == "reasoning" for hit in got) >= 6, [
        hit and hit.task_type for hit in got
    ]
