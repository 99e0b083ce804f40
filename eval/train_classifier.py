"""`make train-classifier`: the task-type classifier shipped in the package (issue 16).

A multinomial logistic regression over the features `signalbox.extproc.task_model` defines
(the semantic tier's embedding, and hashed words and word pairs), trained offline on:

- just_eval's prompts, labelled by GPT-4 (../shared/data/routing/just_eval, MIT), each by its
  first label mapped as eval/README.md says;
- llmrouter_dcrouter's prompts by benchmark (../shared/data/routing/llmrouter_dcrouter, MIT),
  at most PER_TASK of each, mapped to a task type below (0 by default: benchmark prompts,
  multiple-choice and all, lowered just_eval's macro-F1 in the folds, 0.55 -> 0.50 at 80);
- requests written for Signalbox (eval/classifier_seeds.py and the built-in routes'
  utterances) for the types no dataset labels (summarization, extraction, translation, chat)
  and for puzzles, estimates and what-ifs (reasoning, which just_eval labels in 85 prompts);
- instructions written here around passages (eval/classifier_passages.py: extraction asked
  over presidio-research's synthetic everyday sentences too), and personas to keep around
  trivia questions (role-play, which Signalbox counts as chat).

It reports per-class F1 on just_eval in K folds (the model of each fold never saw that fold's
prompts), then fits on everything and writes `extproc/task_types.npz` (weights, biases,
labels, and what it was trained on). Deterministic: same data, same file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from signalbox.extproc import default_routes, task_model
from signalbox.extproc.classify import classified_text
from signalbox.extproc.semantic import default_embedder

from . import classifier_passages
from .classifier_seeds import seeds
from .task_types import LABEL_MAP

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "extproc" / task_model.MODEL_FILE.name  # the source tree (installs copy it)
PER_TASK = 0
# Benchmark -> the task type its prompts ask for.
LLMROUTER_TASKS = {
    "math": "math",
    "gsm8k": "math",
    "agentverse-mgsm": "math",
    "mbpp": "code",
    "human_eval": "code",
    "natural_qa": "qa",
    "trivia_qa": "qa",
    "mmlu": "qa",
    "openbook_qa": "qa",
    "arc_challenge": "qa",
    "gpqa": "reasoning",
    "commonsense_qa": "reasoning",
    "agentverse-logicgrid": "reasoning",
    "commongen": "creative",
}
# Inverse regularisation, chosen in the folds: with the hashed words, C=1 gave macro-F1 0.619,
# C=4 0.608; the embedding alone reached 0.55.
C = 1.0


def just_eval(data: Path) -> list[tuple[str, str]]:
    records = json.loads((data / "routing" / "just_eval" / "tags_list.json").read_text())
    out = []
    for r in records:
        mapped = [LABEL_MAP[t] for t in r["task_types"] if t in LABEL_MAP]
        if mapped:
            out.append((r["instruction"], mapped[0]))
    return out


def llmrouter(data: Path, seed: int) -> list[tuple[str, str]]:
    rows = classifier_passages.llmrouter_queries(data)
    rng = random.Random(seed)
    rng.shuffle(rows)
    taken: Counter[str] = Counter()
    out = []
    for row in rows:
        task = row["task_name"]
        if task in LLMROUTER_TASKS and taken[task] < PER_TASK:
            taken[task] += 1
            out.append((row["query"], LLMROUTER_TASKS[task]))
    return out


def ours() -> list[tuple[str, str]]:
    return seeds() + [(u, task) for task, utterances in default_routes.UTTERANCES.items() for u in utterances]


def written_and_benchmark_rows(data: Path, seed: int) -> list[tuple[str, str]]:
    """Every training row that is not a just_eval prompt: benchmark prompts (PER_TASK), requests
    written here, instructions around passages, and personas to keep."""
    return llmrouter(data, seed) + ours() + classifier_passages.wrapped(data) + classifier_passages.in_character(data)


def matrix(texts: list[str], embed) -> np.ndarray:
    """Features of requests as the tier sees them (`classified_text`: each end of a long one)."""
    read = [classified_text(t) for t in texts]
    return np.stack([task_model.features(task_model.vectors(t, embed), t) for t in read])


def fit(texts: list[str], labels: list[str], embed) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.linear_model import LogisticRegression

    classes = sorted(set(labels))
    model = LogisticRegression(C=C, class_weight="balanced", max_iter=3000)
    model.fit(matrix(texts, embed), labels)
    assert list(model.classes_) == classes
    # Rounded as they are stored and served (task_model.TaskModel), so that what is scored here
    # is what runs.
    return task_model.quantized(model.coef_), model.intercept_.astype(np.float32), classes


def predict(weights: np.ndarray, bias: np.ndarray, classes: list[str], texts: list[str], embed) -> list[str]:
    return [classes[i] for i in np.argmax(matrix(texts, embed) @ weights.T + bias, axis=1)]


def f1_by_class(gold: list[str], predicted: list[str]) -> dict[str, float]:
    out = {}
    for label in sorted(set(gold)):
        tp = sum(g == p == label for g, p in zip(gold, predicted, strict=True))
        fp = sum(p == label != g for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == label != p for g, p in zip(gold, predicted, strict=True))
        out[label] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return out


def default_classification(weights: np.ndarray, bias: np.ndarray, classes: list[str]):
    """What a policy with the defaults runs (built-in rules, then this model as its semantic
    tier), as a function of the prompt: the figure routing depends on."""
    from signalbox.extproc.classify import DEFAULT_RULES, features
    from signalbox.extproc.tiers import classify_tiers

    router = default_routes.TaskTypeRouter(task_model.TaskModel.from_weights(weights, bias, tuple(classes), {}))

    def label(text: str) -> str:
        body = {"messages": [{"role": "user", "content": text}]}
        return classify_tiers(features(body), DEFAULT_RULES, router, default_routes.MIN_RULES_CONFIDENCE).task_type

    return label


def scores(gold: list[str], predicted: list[str]) -> dict[str, Any]:
    by_class = f1_by_class(gold, predicted)
    return {
        "macro_f1": round(sum(by_class.values()) / len(by_class), 4),
        "accuracy": round(sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(gold), 4),
        "f1_by_class": {k: round(v, 4) for k, v in by_class.items()},
    }


def cross_validate(data: Path, folds: int, seed: int) -> dict[str, Any]:
    """Per-class F1 on just_eval, each fold predicted by a model trained without it: as policies
    classify (rules, then the model; the headline figures) and by the model alone."""
    embed = default_embedder()
    labelled = just_eval(data)
    rng = random.Random(seed)
    order = list(range(len(labelled)))
    rng.shuffle(order)
    extra = written_and_benchmark_rows(data, seed)
    probe = classifier_passages.probe()
    gold, predicted, by_model = [], [], []
    probe_gold, probe_predicted = [], []
    for f in range(folds):
        held = set(order[f::folds])
        train = [labelled[i] for i in range(len(labelled)) if i not in held] + extra
        weights, bias, classes = fit([t for t, _ in train], [label for _, label in train], embed)
        test = [labelled[i] for i in sorted(held)]
        gold += [label for _, label in test]
        by_model += predict(weights, bias, classes, [t for t, _ in test], embed)
        label = default_classification(weights, bias, classes)
        predicted += [label(t) for t, _ in test]
        probe_gold += [expected for _, expected in probe]
        probe_predicted += [label(t) for t, _ in probe]
    return {
        "folds": folds,
        "records": len(gold),
        **scores(gold, predicted),
        "model_alone": scores(gold, by_model),
        # Requests carrying a document, unseen phrasings and passages (eval/classifier_passages.py),
        # labelled by each fold's model: right of total, per type.
        "document_probe": {
            label: [
                sum(g == p == label for g, p in zip(probe_gold, probe_predicted, strict=True)),
                probe_gold.count(label),
            ]
            for label in classifier_passages.PROBE
        },
    }


def train(data: Path, seed: int, output: Path) -> dict[str, Any]:
    embed = default_embedder()
    rows = just_eval(data) + written_and_benchmark_rows(data, seed)
    texts, labels = [t for t, _ in rows], [label for _, label in rows]
    weights, bias, classes = fit(texts, labels, embed)
    digest = hashlib.sha256("\n".join(f"{label}\t{t}" for t, label in rows).encode()).hexdigest()
    meta = {
        "features_version": task_model.FEATURES_VERSION,
        "model": "multinomial logistic regression: wordllama l2_supercat 256-d embeddings of the text, its first"
        " and its last sentence + hashed words of the text and of its ends",
        "hash_buckets": task_model.HASH_BUCKETS,
        "C": C,
        "training_rows": len(rows),
        "by_source": {
            "just_eval": len(just_eval(data)),
            "llmrouter_dcrouter": len(llmrouter(data, seed)),
            "signalbox_seeds": len(ours()),
            "signalbox_wrapped_passages": len(classifier_passages.wrapped(data)),
            "signalbox_in_character": len(classifier_passages.in_character(data)),
        },
        "training_data_sha256": digest,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    task_model.save(task_model.TaskModel.from_weights(weights, bias, tuple(classes), meta), output)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(OUTPUT))
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not data.exists():
        print(f"no data at {data}: pass --data PATH to shared/data", file=sys.stderr)
        return 2
    report = cross_validate(data, args.folds, args.seed)
    alone = report["model_alone"]
    print(
        f"just_eval task types, {report['folds']} folds, as a policy classifies: macro-F1 {report['macro_f1']},"
        f" accuracy {report['accuracy']} (the model alone: {alone['macro_f1']}, {alone['accuracy']})"
    )
    print("  " + ", ".join(f"{k} {v}" for k, v in report["f1_by_class"].items()))
    print(
        "requests carrying a document (unseen phrasings and passages), right: "
        + ", ".join(f"{k} {right}/{total}" for k, (right, total) in report["document_probe"].items())
    )
    meta = train(data, args.seed, Path(args.output))
    print(f"wrote {args.output} ({meta['training_rows']} training rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
