"""Task types on questions their own authors labelled: MT-bench, Vicuna-bench and WizardLM's
Evol-Instruct test set (issue 16).

just_eval's labels come from GPT-4, and the folds of `eval/train_classifier.py` score the model
against them. These benchmarks were labelled by the people who wrote them, one category per
question, in a taxonomy of their own:

- lm-sys/FastChat (Apache-2.0): `fastchat/llm_judge/data/mt_bench/question.jsonl` and
  `.../vicuna_bench/question.jsonl` (`category`, `turns`: the first turn is classified);
- nlpxucan/WizardLM (its data CC BY-NC 4.0, read here, never copied):
  `WizardLM/data/WizardLM_testset.jsonl` (`Skill`, `Instruction`), 218 instructions in 29
  skills, collected by its authors as "user-oriented instructions".

They are not in ../shared/data, so the figures need the checkouts:

    python -m eval.outside_task_types --fastchat PATH/TO/FastChat --wizardlm PATH/TO/WizardLM
    (or make eval FASTCHAT=... WIZARDLM=...)

just_eval holds 79 of MT-bench's 80 first turns, 52 of Vicuna-bench's 80 and 1 of WizardLM's,
with GPT-4's labels: the model scored here is trained on every row the shipped one is, except
any prompt these files hold, so it labels questions it never saw.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signalbox.extproc.semantic import default_embedder

from . import train_classifier as tc

# Each benchmark's categories -> Signalbox's task types (None: the category is no one task
# type, and its questions are left out). MT-bench's "stem" and "humanities" are knowledge
# questions; Vicuna's "generic", "knowledge" and "common-sense" are how-to and knowledge
# questions (qa), its "fermi" estimates and "counterfactual" what-ifs are reasoning.
# WizardLM's skills name a discipline for most questions (qa: what they ask is knowledge),
# "Writting" [sic] and "Academic Writing" are writing (creative, as just_eval's "writing" is
# here), "Counterfactual" is reasoning as Vicuna's is; "Complex Format" (any task under format
# constraints), "Multilingual" (questions in other languages, translations among them) and
# "Toxicity" (requests to refuse) are left out.
CATEGORIES: dict[str, dict[str, str | None]] = {
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
    "wizardlm_testset": {
        "Math": "math",
        "Code Generation": "code",
        "Code Debug": "code",
        "Writting": "creative",
        "Academic Writing": "creative",
        "Reasoning": "reasoning",
        "Counterfactual": "reasoning",
        "Roleplay": "chat",
        **dict.fromkeys(
            (
                "Computer Science",
                "Common-Sense",
                "Biology",
                "Technology",
                "Ethics",
                "TruthfulQA",
                "Sport",
                "Law",
                "Medicine",
                "Literature",
                "Entertainment",
                "Art",
                "Music",
                "Economy",
                "Physics",
                "History",
                "Chemistry",
                "Philosophy",
            ),
            "qa",
        ),
        **dict.fromkeys(("Complex Format", "Multilingual", "Toxicity"), None),
    },
}


def _first_turn(row: dict[str, Any]) -> str:
    return row["turns"][0]


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark's questions are in a checkout, and how a row names its question and
    category."""

    checkout: str  # the command-line option naming the checkout
    path: Path
    category_field: str = "category"
    text: Callable[[dict[str, Any]], str] = _first_turn


BENCHMARKS = {
    "mt_bench": Benchmark("fastchat", Path("fastchat/llm_judge/data/mt_bench/question.jsonl")),
    "vicuna_bench": Benchmark("fastchat", Path("fastchat/llm_judge/data/vicuna_bench/question.jsonl")),
    "wizardlm_testset": Benchmark(
        "wizardlm", Path("WizardLM/data/WizardLM_testset.jsonl"), "Skill", lambda row: row["Instruction"]
    ),
}


def questions(
    path: Path,
    categories: dict[str, str | None],
    category_field: str = "category",
    text: Callable[[dict[str, Any]], str] = _first_turn,
) -> list[tuple[str, str]]:
    """(question, task type) per question whose category maps to one; a category missing from
    the map is an error."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        category = row[category_field]
        if category not in categories:
            raise ValueError(f"{path}:{number}: category {category!r} has no task type here")
        task_type = categories[category]
        if task_type is not None:
            out.append((text(row), task_type))
    return out


def benchmark_questions(checkouts: dict[str, Path]) -> dict[str, list[tuple[str, str]]]:
    """Every benchmark whose checkout was given, by name."""
    return {
        name: questions(checkouts[b.checkout] / b.path, CATEGORIES[name], b.category_field, b.text)
        for name, b in BENCHMARKS.items()
        if b.checkout in checkouts
    }


def evaluate(data: Path, checkouts: dict[str, Path], seed: int = 0) -> dict[str, Any]:
    """Per benchmark of the given checkouts (option name -> path): macro-F1, accuracy, F1 per
    type and the commonest confusions, as a policy with the defaults classifies (rules, then a
    model trained without these questions)."""
    sets = benchmark_questions(checkouts)
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
    parser.add_argument("--fastchat", help="a checkout of lm-sys/FastChat (MT-bench, Vicuna-bench)")
    parser.add_argument("--wizardlm", help="a checkout of nlpxucan/WizardLM (its Evol-Instruct test set)")
    args = parser.parse_args(argv)
    checkouts = given_checkouts(args)
    if not checkouts:
        print("name at least one checkout: --fastchat, --wizardlm", file=sys.stderr)
        return 2
    missing = missing_files(checkouts)
    if missing:
        print("no question file at " + ", ".join(missing), file=sys.stderr)
        return 2
    print(describe(evaluate(Path(args.data), checkouts)))
    return 0


def given_checkouts(args: argparse.Namespace) -> dict[str, Path]:
    """The checkouts named on the command line, by option."""
    return {name: Path(getattr(args, name)) for name in ("fastchat", "wizardlm") if getattr(args, name, None)}


def missing_files(checkouts: dict[str, Path]) -> list[str]:
    return [
        str(checkouts[b.checkout] / b.path)
        for b in BENCHMARKS.values()
        if b.checkout in checkouts and not (checkouts[b.checkout] / b.path).exists()
    ]


if __name__ == "__main__":
    sys.exit(main())
