"""Task-type accuracy of the classifier on just_eval (labels written by GPT-4, multi-label).

just_eval's labels are mapped to Signalbox's task types as documented in eval/README.md.
Accuracy counts a prediction right when it matches any of a prompt's mapped labels; macro-F1
is computed on each prompt's first (primary) label over the classes that occur.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from signalbox.core.compiler import compile_config
from signalbox.extproc.classify import features
from signalbox.extproc.runtime import RuntimeTable
from signalbox.extproc.tiers import classify_request

LABEL_MAP = {
    "info-seek": "qa",
    "reasoning": "reasoning",
    "procedure": "qa",
    "writing": "creative",
    "coding": "code",
    "role-play": "chat",
    "math": "math",
}


def default_policy():
    """A policy with no classification settings: what every policy gets by default."""
    provider = {
        "apiVersion": "signalbox.io/v1alpha1",
        "kind": "AIProvider",
        "metadata": {"name": "p"},
        "spec": {"baseUrl": "http://p.invalid/v1", "models": [{"name": "m"}]},
    }
    policy = {
        "apiVersion": "signalbox.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "x"},
        "spec": {"match": {"models": ["x"]}, "backends": [{"provider": "p", "model": "m"}]},
    }
    return RuntimeTable.from_config(compile_config([provider], [policy]).config).policies[0]


def evaluate(path: Path) -> dict[str, Any]:
    records = json.loads(path.read_text())
    policy = default_policy()
    tiers: Counter[str] = Counter()
    gold_any, gold_primary, predicted = [], [], []
    for r in records:
        mapped = [LABEL_MAP[t] for t in r["task_types"] if t in LABEL_MAP]
        if not mapped:
            continue
        body = {"messages": [{"role": "user", "content": r["instruction"]}]}
        result = classify_request(policy, features(body))
        tiers[result.tier] += 1
        predicted.append(result.task_type)
        gold_any.append(set(mapped))
        gold_primary.append(mapped[0])
    accuracy = sum(p in g for p, g in zip(predicted, gold_any, strict=True)) / len(predicted)
    f1s = {}
    for label in sorted(set(gold_primary)):
        tp = sum(p == label and g == label for p, g in zip(predicted, gold_primary, strict=True))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold_primary, strict=True))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold_primary, strict=True))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1s[label] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "records": len(predicted),
        "task_accuracy_any_label": round(accuracy, 4),
        "task_macro_f1": round(sum(f1s.values()) / len(f1s), 4),
        "f1_by_class": {k: round(v, 4) for k, v in f1s.items()},
        "predicted": dict(Counter(predicted)),
        "gold_primary": dict(Counter(gold_primary)),
        "label_map": LABEL_MAP,
        "classifier": "default tiers: built-in rules, then built-in semantic task routes",
        "decided_by_tier": dict(tiers),
    }
