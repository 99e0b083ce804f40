"""eval-routing and classify, on small data made here (not the shared datasets)."""

import json
import random

from signalbox import evaluation
from signalbox.cli import main as cli_main

CODE = [
    "write a {} function in {}",
    "fix the {} bug in my {} code",
    "how do I implement a {} in {}",
    "my {} program crashes with a {} error",
]
CODE_WORDS = (["sorting", "parser", "cache", "queue", "regex", "tree"], ["python", "rust", "java", "go", "c++"])
TRAVEL = [
    "book a {} trip to {}",
    "best {} hotels in {}",
    "what to pack for a {} holiday in {}",
    "cheap {} flights to {}",
]
TRAVEL_WORDS = (["weekend", "family", "beach", "skiing", "city"], ["lisbon", "tokyo", "rome", "oslo", "lima"])


def dataset(n=240, seed=3):
    rng = random.Random(seed)
    items = []
    for i in range(n):
        if i % 2:
            text = rng.choice(CODE).format(rng.choice(CODE_WORDS[0]), rng.choice(CODE_WORDS[1]))
            scores = {"coder": 0.9, "traveler": 0.1, "big": 0.8}
        else:
            text = rng.choice(TRAVEL).format(rng.choice(TRAVEL_WORDS[0]), rng.choice(TRAVEL_WORDS[1]))
            scores = {"coder": 0.1, "traveler": 0.9, "big": 0.8}
        items.append(evaluation.Item(text, scores))
    return items


PRICES = {"coder": (0.1, 0.1), "traveler": (0.1, 0.1), "big": (1.0, 1.0)}


def test_routing_learns_which_cheap_model_serves_each_class():
    report = evaluation.evaluate(dataset(), PRICES, folds=2, clusters=4, tolerances=(0.0, 0.1, 1.0))
    assert report["best_single_models"] == ["big"]
    assert report["baselines"]["oracle"]["score"] > 0.85
    assert report["cost_saving_at_95"] > 0.8  # cheap specialists instead of the big model
    assert report["score_ratio"] > 1.05  # and better answers than it gives
    assert report["sweep"][-1]["cost_saving"] >= report["sweep"][0]["cost_saving"]


def test_eval_routing_command_writes_report_and_plot(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": it.prompt, "scores": it.scores}) + "\n" for it in dataset(120)))
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({m: {"input": p[0], "output": p[1]} for m, p in PRICES.items()}))
    out, png = tmp_path / "report.json", tmp_path / "curve.png"
    assert (
        cli_main(
            [
                "eval-routing",
                "--data",
                str(data),
                "--prices",
                str(prices),
                "--folds",
                "2",
                "--clusters",
                "4",
                "--output",
                str(out),
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    assert "cost saving at >=95% of its score" in capsys.readouterr().out
    assert json.loads(out.read_text())["cost_saving_at_95"] > 0.5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_dataset_lines_are_named(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "x", "scores": {"a": 1}}\n{"text": "y"}\n')
    try:
        evaluation.load_items(data)
    except ValueError as exc:
        assert "bad.jsonl:2" in str(exc)
    else:
        raise AssertionError("expected a ValueError")


def test_classify_command_uses_the_live_decision(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Write a Python function that parses dates"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "good morning!"}]})
        + "\n"
    )
    out = tmp_path / "decisions.jsonl"
    assert (
        cli_main(
            [
                "classify",
                "-f",
                str(root / "examples" / "quickstart"),
                "--model",
                "by-task",
                "--input",
                str(prompts),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    code, chat = (json.loads(line) for line in out.read_text().splitlines())
    assert (code["task_type"], code["backend"], code["tier"]) == ("code", "default/smart-local/large", "semantic")
    assert (chat["task_type"], chat["backend"]) == ("chat", "default/fast-local/small")
    assert set(code) >= {"class", "complexity", "confidence", "reason", "policy"}


EASY = ["add {} and {}", "what is {} plus {}", "sum {} with {}", "{} + {} equals what"]
HARD = [
    "prove the {} conjecture for all {} dimensional manifolds",
    "derive a closed form for the {} integral over {} variables",
    "show that the {} operator is self adjoint on {} spaces",
]


def single_domain(n=240, seed=5):
    """One task (arithmetic and proofs in one class): the weak model is right on the easy half
    only; the strong one on both."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        if i % 2:
            text = rng.choice(EASY).format(rng.randint(2, 99), rng.randint(2, 99))
            scores = {"weak": 1.0, "strong": 1.0}
        else:
            text = rng.choice(HARD).format(rng.choice(["hodge", "riemann", "yang"]), rng.randint(2, 9))
            scores = {"weak": 0.0, "strong": 1.0}
        items.append(evaluation.Item(text, scores))
    return items


def test_per_prompt_learning_tells_easy_from_hard_prompts_of_one_class():
    prices = {"weak": (0.1, 0.1), "strong": (1.0, 1.0)}
    tolerances = (0.0, 0.25, 1.0)
    by_prompt = evaluation.evaluate(single_domain(), prices, folds=2, clusters=1, tolerances=tolerances)
    by_class = evaluation.evaluate(
        single_domain(), prices, folds=2, clusters=1, tolerances=tolerances, per_prompt=False
    )
    # Per prompt: the strong model's score at most of the possible saving (0.45: the easy half
    # on the weak model at a tenth of the price).
    assert by_prompt["curve"]["signalbox"]["saving_at_100"]["value"] > 0.3
    # Per class: one class, one answer for every prompt; no saving without losing the hard half.
    assert (by_class["curve"]["signalbox"]["saving_at_100"]["value"] or 0.0) < 0.05


def test_a_fixed_split_from_train_and_test_files(tmp_path, capsys):
    items = dataset(160)
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    for path, part in ((train, items[:120]), (test, items[120:])):
        path.write_text("".join(json.dumps({"prompt": it.prompt, "scores": it.scores}) + "\n" for it in part))
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({m: {"input": p[0], "output": p[1]} for m, p in PRICES.items()}))
    out = tmp_path / "report.json"
    argv = ["eval-routing", "--train", str(train), "--test", str(test), "--prices", str(prices)]
    assert cli_main([*argv, "--clusters", "4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "40 held-out prompts" in printed and "signalbox AUC" in printed and "random" in printed
    report = json.loads(out.read_text())
    assert report["folds"] == 1 and report["prompts"] == 40
    assert cli_main([*argv[:3], "--prices", str(prices)]) == 2  # --train without --test
