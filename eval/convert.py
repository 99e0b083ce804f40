"""Converts ../shared/data/routing/llmrouter_dcrouter into eval-routing's documented format."""

from __future__ import annotations

import json
from pathlib import Path


def llmrouter(source: Path, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    records = json.loads((source / "train.json").read_text())
    data = out_dir / "llmrouter.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["question"], "scores": r["scores"]}) + "\n" for r in records))
    catalogue = json.loads((source / "default_llm.json").read_text())
    models = set(records[0]["scores"])
    prices = out_dir / "llmrouter-prices.json"
    prices.write_text(
        json.dumps(
            {m: {"input": catalogue[m]["input_price"], "output": catalogue[m]["output_price"]} for m in sorted(models)},
            indent=1,
        )
    )
    return data, prices


# Single-domain strong/weak pairs (issue 16): one benchmark of llmrouter_dcrouter each, its best
# model against a cheap 7-9B model that trails it by 15 points or more (random routing saves
# under a third of the strong model's calls at 95 % of its score on each).
PAIRS: list[tuple[str, str, str]] = [
    ("math", "llama-3.3-nemotron-super-49b-v1", "llama-3.1-8b-instruct"),
    ("gsm8k", "llama-3.1-nemotron-51b-instruct", "mistral-7b-instruct-v0.3"),
    ("mmlu", "llama-3.1-nemotron-51b-instruct", "llama-3.1-8b-instruct"),
    ("mbpp", "llama-3.3-nemotron-super-49b-v1", "codegemma-7b"),
    ("arc_challenge", "llama-3.1-nemotron-51b-instruct", "mistral-7b-instruct-v0.3"),
]


def benchmark_records(source: Path, task: str) -> list[dict]:
    """The scored records (train.json: `question`, `scores`) of one benchmark, as
    default_query_train.jsonl labels their prompts."""
    tasks = {}
    with (source / "default_query_train.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            tasks[row["query"]] = row["task_name"]
    return [r for r in json.loads((source / "train.json").read_text()) if tasks.get(r["question"]) == task]


def strong_weak(source: Path, out_dir: Path, task: str, strong: str, weak: str) -> tuple[Path, Path]:
    """One benchmark's prompts with the pair's scores, priced so that cost counts strong-model
    calls (strong: 1 per answer, weak: 0): eval-routing's saving is then the share of the
    strong model's calls a router avoids."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"{task}-strong-weak.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": r["question"], "scores": {m: r["scores"][m] for m in (strong, weak)}}) + "\n"
            for r in benchmark_records(source, task)
        )
    )
    prices = out_dir / f"{task}-strong-weak-prices.json"
    prices.write_text(json.dumps({strong: {"input": 0, "output": 1}, weak: {"input": 0, "output": 0}}, indent=1))
    return data, prices
