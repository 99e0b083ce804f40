"""`make eval`: classifier and routing figures on ../shared/data, into eval/results/latest.json."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from signalbox import evaluation

from . import train_classifier
from .convert import llmrouter

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--clusters", type=int, default=24)
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not data.exists():
        print(f"no data at {data}: pass --data PATH to shared/data", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    # The shipped task-type classifier is trained on just_eval too: its figures come from folds
    # whose models never saw the prompts they label (eval/train_classifier.py).
    tasks = train_classifier.cross_validate(data, args.folds, 0)
    print(
        f"just_eval task types ({tasks['records']} prompts, {tasks['folds']} folds): "
        f"macro-F1 {tasks['macro_f1']:.3f}, accuracy {tasks['accuracy']:.3f}; "
        + ", ".join(f"{k} {v:.2f}" for k, v in tasks["f1_by_class"].items())
    )
    items_path, prices_path = llmrouter(data / "routing" / "llmrouter_dcrouter", RESULTS / "data")
    items, prices = evaluation.load_items(items_path), evaluation.load_prices(prices_path)
    routing = evaluation.evaluate(items, prices, folds=args.folds, clusters=args.clusters)
    by_class = evaluation.evaluate(items, prices, folds=args.folds, clusters=args.clusters, per_prompt=False)
    evaluation.plot(routing, RESULTS / "llmrouter-cost-quality.png")
    print(f"llmrouter_dcrouter ({len(items)} prompts, {args.folds} folds), per prompt and class:")
    print(evaluation.describe(routing))
    print("class-level learning only:")
    print(evaluation.describe(by_class))
    latest = {
        "task_macro_f1": tasks["macro_f1"],
        "task_accuracy": tasks["accuracy"],
        "cost_saving_at_95": round(routing["cost_saving_at_95"], 4),
        "score_ratio": round(routing["score_ratio"], 4),
        "curve": routing["curve"],
        "just_eval": tasks,
        "llmrouter_dcrouter": routing,
        "llmrouter_dcrouter_class_only": by_class,
    }
    (RESULTS / "latest.json").write_text(json.dumps(latest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
