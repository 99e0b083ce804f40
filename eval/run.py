"""`make eval`: classifier and routing figures on ../shared/data, into eval/results/latest.json."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from signalbox import evaluation

from . import outside_task_types, train_classifier
from .convert import PAIRS, llmrouter, strong_weak

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--clusters", type=int, default=24)
    parser.add_argument(
        "--fastchat", help="a checkout of lm-sys/FastChat: also score task types on MT-bench and Vicuna-bench"
    )
    parser.add_argument(
        "--wizardlm", help="a checkout of nlpxucan/WizardLM: also score task types on its Evol-Instruct test set"
    )
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
    outside = None
    checkouts = outside_task_types.given_checkouts(args)
    if checkouts:
        missing = outside_task_types.missing_files(checkouts)
        if missing:
            print("no question file at " + ", ".join(missing), file=sys.stderr)
            return 2
        outside = outside_task_types.evaluate(data, checkouts)
        print(outside_task_types.describe(outside))
    items_path, prices_path = llmrouter(data / "routing" / "llmrouter_dcrouter", RESULTS / "data")
    items, prices = evaluation.load_items(items_path), evaluation.load_prices(prices_path)
    routing = evaluation.evaluate(items, prices, folds=args.folds, clusters=args.clusters)
    by_class = evaluation.evaluate(items, prices, folds=args.folds, clusters=args.clusters, per_prompt=False)
    evaluation.plot(routing, RESULTS / "llmrouter-cost-quality.png")
    print(f"llmrouter_dcrouter ({len(items)} prompts, {args.folds} folds), per prompt and class:")
    print(evaluation.describe(routing))
    print("class-level learning only:")
    print(evaluation.describe(by_class))
    single = single_domain(data / "routing" / "llmrouter_dcrouter", args.folds, args.clusters)
    latest = {
        "task_macro_f1": tasks["macro_f1"],
        "task_accuracy": tasks["accuracy"],
        "cost_saving_at_95": round(routing["cost_saving_at_95"], 4),
        "score_ratio": round(routing["score_ratio"], 4),
        "curve": routing["curve"],
        "just_eval": tasks,
        **({"outside_benchmarks": outside} if outside else {}),
        "llmrouter_dcrouter": routing,
        "llmrouter_dcrouter_class_only": by_class,
        "single_domain_strong_weak": single,
    }
    (RESULTS / "latest.json").write_text(json.dumps(latest, indent=2) + "\n")
    return 0


def single_domain(source: Path, folds: int, clusters: int) -> dict[str, dict]:
    """Per benchmark of PAIRS: the share of the strong model's calls each router avoids at 95 %
    and 100 % of its score (per prompt and class, class only, random, oracle)."""
    out: dict[str, dict] = {}
    print("single-domain strong/weak pairs: strong-model calls avoided at 95% of its score")
    for task, strong, weak in PAIRS:
        items_path, prices_path = strong_weak(source, RESULTS / "data", task, strong, weak)
        items, prices = evaluation.load_items(items_path), evaluation.load_prices(prices_path)
        runs = {
            "per_prompt": evaluation.evaluate(items, prices, folds=folds, clusters=clusters),
            "class_only": evaluation.evaluate(items, prices, folds=folds, clusters=clusters, per_prompt=False),
        }
        curve = runs["per_prompt"]["curve"]
        figures = {
            "signalbox": curve["signalbox"],
            "signalbox_class_only": runs["class_only"]["curve"]["signalbox"],
            "random": curve["random"],
            "oracle": curve["oracle"],
        }
        out[task] = {
            "prompts": len(items),
            "strong": strong,
            "weak": weak,
            "scores": {k: round(v["score"], 4) for k, v in runs["per_prompt"]["baselines"].items()},
            **{name: {key: f[key] for key in ("saving_at_95", "saving_at_100", "auc")} for name, f in figures.items()},
        }

        def fmt(figure: dict) -> str:
            value, (low, high) = figure["value"], figure["ci95"]
            return "never" if value is None else f"{value:.1%} [{low:.1%}, {high:.1%}]"

        print(
            f"  {task} ({len(items)}; {strong} vs {weak}): "
            + ", ".join(f"{name} {fmt(f['saving_at_95'])}" for name, f in figures.items())
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
