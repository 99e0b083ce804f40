"""Tier 2 (semantic routes on a packaged embedding model) and adaptive routing from outcomes."""

import random
from collections import Counter

from signalbox.core.compiler import compile_config
from signalbox.extproc.classify import features
from signalbox.extproc.learning import SharedLearning
from signalbox.extproc.runtime import RuntimeTable
from signalbox.extproc.strategies import RequestContext, SelectionState, select
from signalbox.extproc.tiers import classify_request
from tests.factories import backend, model, policy, provider

ROUTES = [
    {
        "name": "coding",
        "taskType": "code",
        "threshold": 0.15,
        "utterances": [
            "write a function that reverses a string",
            "fix the bug in my javascript loop",
            "how do I group rows with pandas",
            "explain this compiler error",
            "implement a linked list class in java",
            "why does my program crash with an exception",
        ],
    },
    {
        "name": "travel",
        "threshold": 0.15,
        "utterances": [
            "book a flight to paris next week",
            "recommend hotels near the colosseum",
            "what should I pack for a beach holiday",
            "cheapest train from berlin to prague",
            "which airport is closest to the city centre",
            "a three day itinerary for vienna",
        ],
    },
    {
        "name": "cooking",
        "threshold": 0.15,
        "utterances": [
            "a quick recipe for vegetable soup",
            "how long should I bake salmon",
            "substitute for eggs in pancakes",
            "how to make fresh pasta dough",
            "what can I cook with potatoes and leeks",
            "how to boil an egg perfectly",
        ],
    },
]
PROVIDERS = [
    provider(
        "cheap", "http://127.0.0.1:1/v1", [model("small", quality=0.5, inputPricePer1M=0.1, outputPricePer1M=0.1)]
    ),
    provider("dear", "http://127.0.0.1:2/v1", [model("large", quality=0.5, inputPricePer1M=1, outputPricePer1M=1)]),
]


def table(**spec):
    spec.setdefault("classification", {"semantic": {"routes": ROUTES}})
    result = compile_config(
        PROVIDERS, [policy("p", ["x"], [backend("cheap", "small"), backend("dear", "large")], strategy="cost", **spec)]
    )
    assert result.ok, result.problems
    return RuntimeTable.from_config(result.config)


def ask(text):
    return features({"model": "x", "messages": [{"role": "user", "content": text}]})


def test_paraphrases_not_in_the_utterances_find_their_route():
    p = table().policies[0]
    cases = {
        "Can you implement binary search in Go for me?": "coding",
        "my python script throws a KeyError, why": "coding",
        "find affordable accommodation in barcelona": "travel",
        "which airline flies direct to tokyo": "travel",
        "how do I cook rice so it is not sticky": "cooking",
        "ideas for a chocolate dessert recipe": "cooking",
    }
    for text, route in cases.items():
        result = classify_request(p, ask(text))
        assert (result.tier, result.class_key) == ("semantic", route), (text, result)
    assert classify_request(p, ask("Fix my Rust borrow checker error")).task_type == "code"


def test_unrelated_requests_keep_the_rules_answer_or_take_the_default_route():
    p = table(classification={"semantic": {"routes": [{**r, "threshold": 0.35} for r in ROUTES]}}).policies[0]
    result = classify_request(p, ask("the stock market closed higher today"))
    assert result.tier != "semantic"
    with_default = table(
        classification={"semantic": {"routes": [{**r, "threshold": 0.35} for r in ROUTES], "defaultRoute": "travel"}}
    ).policies[0]
    assert classify_request(with_default, ask("the stock market closed higher today")).class_key == "travel"


def test_confident_policy_rules_win_over_the_semantic_tier():
    p = table(
        classification={
            "rules": [{"name": "legal", "keywords": ["contract"], "taskType": "extraction"}],
            "semantic": {"routes": ROUTES},
        }
    ).policies[0]
    result = classify_request(p, ask("book a flight, and check the contract terms"))
    assert (result.tier, result.reason) == ("rules", "legal")


def run(t, state, text, outcome, n):
    p = t.policies[0]
    chosen = []
    for _ in range(n):
        f = ask(text)
        cls = classify_request(p, f)
        sel = select(p, RequestContext(f, cls, ""), state)
        chosen.append(sel.choice.backend.id)
        state.observe_quality(p.name, cls.class_key, sel.choice.backend.id, outcome[sel.choice.backend.id])
    return chosen


def test_learning_moves_a_class_to_the_backend_with_better_outcomes_within_bounded_requests():
    t = table(learning={"enabled": True, "explorationRate": 0.1, "priorWeight": 2}, cost={"qualityTolerance": 0.05})
    state = SelectionState(rng=random.Random(7))
    outcome = {"default/cheap/small": 0.2, "default/dear/large": 0.9}
    chosen = run(t, state, "write a sorting function in python", outcome, 60)
    assert chosen[0] == "default/cheap/small"  # equal declared quality: cheaper first
    assert Counter(chosen[-20:])["default/dear/large"] >= 16, Counter(chosen[-20:])
    # Another class learns separately: there the cheap backend is as good and stays chosen.
    travel = run(t, state, "book a flight to lisbon", {"default/cheap/small": 0.9, "default/dear/large": 0.9}, 30)
    assert Counter(travel[-10:])["default/cheap/small"] >= 8


def test_learning_survives_a_config_reload():
    spec = {"learning": {"enabled": True, "explorationRate": 0.0}, "cost": {"qualityTolerance": 0.05}}
    state = SelectionState(rng=random.Random(1))
    run(table(**spec), state, "write a sorting function", {"default/cheap/small": 0.0, "default/dear/large": 1.0}, 20)
    reloaded = table(**spec)  # a new generation of the same policy
    assert run(
        reloaded, state, "write a sorting function", {"default/cheap/small": 0.0, "default/dear/large": 1.0}, 1
    ) == ["default/dear/large"]


def test_without_learning_declared_quality_decides():
    t = table(cost={"qualityTolerance": 0.05})
    state = SelectionState()
    run(t, state, "write a sorting function", {"default/cheap/small": 0.0, "default/dear/large": 1.0}, 10)
    assert run(t, state, "write a sorting function", {}, 0) == []
    f = ask("write a sorting function")
    assert (
        select(t.policies[0], RequestContext(f, classify_request(t.policies[0], f), ""), state).choice.backend.id
        == "default/cheap/small"
    )


def test_workers_sharing_a_learning_file_learn_from_each_others_feedback(tmp_path):
    """Feedback that reached one ext_proc worker moves the choice of another (shared SQLite)."""
    t = table(learning={"enabled": True, "explorationRate": 0.0, "priorWeight": 2}, cost={"qualityTolerance": 0.05})
    p = t.policies[0]
    one = SelectionState(shared=SharedLearning(tmp_path / "learning.db"))
    other = SelectionState(shared=SharedLearning(tmp_path / "learning.db"))
    f = ask("write a sorting function in python")
    request = RequestContext(f, classify_request(p, f), "")
    assert select(p, request, other).choice.backend.id == "default/cheap/small"
    for _ in range(5):
        one.observe_quality(p.name, request.classification.class_key, "default/cheap/small", 0.0)
    assert select(p, request, other).choice.backend.id == "default/dear/large"
    explained = other.snapshot()  # a dry run's copy: the learning, not the file
    assert explained.shared is None and explained.quality == other.quality


def test_the_lean_embedder_gives_wordllamas_numbers():
    """The semantic tier reads wordllama's files directly (30+ MB less per ext_proc worker);
    it must embed exactly as wordllama does, or every threshold and eval figure would drift."""
    import os

    import numpy as np
    import wordllama

    from signalbox.extproc.semantic import MAX_CHARS, default_embedder

    texts = ["hi!", "Write a function that reverses a linked list", "résumé " * 400, "🙂 中文 mixed", "x" * 5000]
    texts += [f"sentence number {i} about topic {i % 7}" for i in range(150)]  # more than one batch
    ours = default_embedder()(texts)
    model = wordllama.WordLlama.load(cache_dir=os.path.dirname(wordllama.__file__), disable_download=True)
    theirs = np.asarray(model.embed([t[:MAX_CHARS] for t in texts], norm=True), dtype=np.float32)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (len(texts), 256)
    assert np.array_equal(ours, theirs)
