"""Task types on questions their own authors labelled: MT-bench and Vicuna-bench (issue 16).

just_eval's labels come from GPT-4, and the folds of `eval/train_classifier.py` score the model
against them. These two benchmarks were labelled by the people who wrote them, one category
per question, in a taxonomy of their own; their files are in lm-sys/FastChat (Apache-2.0),
`fastchat/llm_judge/data/mt_bench/question.jsonl` and `.../vicuna_bench/question.jsonl`
(`question_id`, `category`, `turns`: the first turn is classified). They are not in
../shared/data, so the figures need a FastChat checkout:

    python -m eval.outside_task_types --fastchat PATH/TO/FastChat   (or make eval FASTCHAT=...)

just_eval holds 79 of MT-bench's 80 first turns and 52 of Vicuna-bench's 80, with GPT-4's
labels: the model scored here is trained on every row the shipped one is, except any prompt
either file holds, so it labels questions it never saw.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from signalbox.extproc.semantic import default_embedder

from . import train_classifier as tc

QUESTION_FILES = {
    "mt_bench": Path("fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "vicuna_bench": Path("fastchat/llm_judge/data/vicuna_bench/question.jsonl"),
}
# Each benchmark's categories -> Signalbox's task types. MT-bench's "stem" and "humanities" are
# knowledge questions; Vicuna's "generic", "knowledge" and "common-sense" are how-to and
# knowledge questions (qa), its "fermi" estimates and "counterfactual" what-ifs are reasoning.
CATEGORIES = {
    "mt_bench": {
        "writing": "creative",
        "roleplay": "chat",
        "reasoning": "reasoning",
        "math": "math",
        "coding": "code",
        "extraction": "extraction",
        "stem": "qa",
        "humanities": "qa",
    },
    "vicuna_bench": {
        "generic": "qa",
        "knowledge": "qa",
        "common-sense": "qa",
        "roleplay": "chat",
        "fermi": "reasoning",
        "counterfactual": "reasoning",
        "writing": "creative",
        "coding": "code",
        "math": "math",
    },
}


def questions(path: Path, categories: dict[str, str]) -> list[tuple[str, str]]:
    """(first turn, task type) per question; a category missing from the map is an error."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row["category"] not in categories:
            raise ValueError(f"{path}:{number}: category {row['category']!r} has no task type here")
        out.append((row["turns"][0], categories[row["category"]]))
    return out


def evaluate(data: Path, fastchat: Path, seed: int = 0) -> dict[str, Any]:
    """Per benchmark: macro-F1, accuracy, F1 per type and the commonest confusions, as a policy
    with the defaults classifies (rules, then a model trained without these questions)."""
    sets = {name: questions(fastchat / rel, CATEGORIES[name]) for name, rel in QUESTION_FILES.items()}
    outside = {text.strip() for asked in sets.values() for text, _ in asked}
    labelled = tc.just_eval(data)
    rows = [(t, label) for t, label in labelled if t.strip() not in outside]
    rows += tc.written_and_benchmark_rows(data, seed)
    weights, bias, classes = tc.fit([t for t, _ in rows], [label for _, label in rows], default_embedder())
    label = tc.default_classification(weights, bias, classes)
    report: dict[str, Any] = {"just_eval_prompts_left_out": sum(t.strip() in outside for t, _ in labelled)}
    for name, asked in sets.items():
        gold = [expected for _, expected in asked]
        predicted = [label(text) for text, _ in asked]
        confusions = Counter((g, p) for g, p in zip(gold, predicted, strict=True) if g != p)
        report[name] = {
            "questions": len(asked),
            **tc.scores(gold, predicted),
            "confusions": [f"{g}->{p}: {n}" for (g, p), n in confusions.most_common(8)],
        }
    return report


def describe(report: dict[str, Any]) -> str:
    return "\n".join(
        f"{name} ({r['questions']} questions, labelled by its authors): macro-F1 {r['macro_f1']:.3f}, "
        f"accuracy {r['accuracy']:.3f}; " + ", ".join(f"{k} {v:.2f}" for k, v in r["f1_by_class"].items())
        for name, r in report.items()
        if isinstance(r, dict)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(tc.ROOT.parent / "shared" / "data"))
    parser.add_argument("--fastchat", required=True, help="a checkout of lm-sys/FastChat")
    args = parser.parse_args(argv)
    files = [Path(args.fastchat) / rel for rel in QUESTION_FILES.values()]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        print("no question file at " + ", ".join(missing), file=sys.stderr)
        return 2
    print(describe(evaluate(Path(args.data), Path(args.fastchat))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
