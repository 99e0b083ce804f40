"""`make eval`: classifier and routing figures on ../shared/data, into eval/results/latest.json."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from signalbox import evaluation

from . import task_types
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
    tasks = task_types.evaluate(data / "routing" / "just_eval" / "tags_list.json")
    print(
        f"just_eval task types ({tasks['records']} prompts): accuracy {tasks['task_accuracy_any_label']:.3f}, "
        f"macro-F1 {tasks['task_macro_f1']:.3f}"
    )
    items_path, prices_path = llmrouter(data / "routing" / "llmrouter_dcrouter", RESULTS / "data")
    items, prices = evaluation.load_items(items_path), evaluation.load_prices(prices_path)
    routing = evaluation.evaluate(items, prices, folds=args.folds, clusters=args.clusters)
    evaluation.plot(routing, RESULTS / "llmrouter-cost-quality.png")
    best = routing["baselines"]["best_single"]
    print(
        f"llmrouter_dcrouter ({len(items)} prompts, {args.folds} folds): best single model score {best['score']:.3f}; "
        f"cost saving at >=95% of it: {routing['cost_saving_at_95']:.1%} (score ratio {routing['score_ratio']:.3f})"
    )
    latest = {
        "task_macro_f1": tasks["task_macro_f1"],
        "task_accuracy": tasks["task_accuracy_any_label"],
        "cost_saving_at_95": round(routing["cost_saving_at_95"], 4),
        "score_ratio": round(routing["score_ratio"], 4),
        "just_eval": tasks,
        "llmrouter_dcrouter": routing,
    }
    (RESULTS / "latest.json").write_text(json.dumps(latest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
