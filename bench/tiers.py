"""Per-request cost of each classification tier (medians, one run): `make bench`.

Prompts are built here (short chat, a paragraph, a long document), so the figures do not depend
on any dataset. Writes bench/results/tiers.json.
"""

from __future__ import annotations

# isort: off
import signalbox.processenv  # noqa: F401 - a worker's thread settings (signalbox.cli), before numpy
# isort: on

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from signalbox.extproc import body, default_routes
from signalbox.extproc.classify import DEFAULT_RULES, classify, features
from signalbox.extproc.neighbours import Neighbours
from signalbox.extproc.semantic import RecentEmbeddings, prompt_vector, shared_embedder

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "hi!",
    "Write a Python function that merges two sorted lists and explain its complexity.",
    "Summarize the following meeting notes for the leadership team. " + "The team discussed the roadmap. " * 40,
    "Translate this paragraph into German: " + "The weather was mild and the markets were busy. " * 10,
    "Prove that the square root of two is irrational, step by step.",
    " ".join(["Our quarterly report covers revenue, costs, hiring and risks."] * 300),
]


def timed(fn, reps: int) -> float:
    samples = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return statistics.median(samples)


def main() -> int:
    bodies = [{"messages": [{"role": "user", "content": p}]} for p in PROMPTS]
    feats = [features(b) for b in bodies]
    router = default_routes.router()
    router.classify("warm up")
    raw = [json.dumps({"model": "auto", **b}).encode() for b in bodies]
    parse_only = statistics.median(timed(lambda r=r: json.loads(r), 2000) for r in raw)
    checked = statistics.median(timed(lambda r=r: body.parse(r), 2000) for r in raw)
    rules = statistics.median(timed(lambda f=f: classify(f, DEFAULT_RULES), 2000) for f in feats)
    # Each call as a request's first: the process's embedder remembers the prompt in hand
    # (semantic.RecentEmbeddings), and a prompt repeated 500 times is not what a tier sees.
    recent = shared_embedder()
    assert isinstance(recent, RecentEmbeddings)

    def first(fn):
        recent.rows.clear()
        return fn()

    semantic = statistics.median(timed(lambda f=f: first(lambda: router.classify(f.text)), 500) for f in feats)
    # Per-prompt learning (learning.perPrompt): the prompt's vector and a full memory's estimate.
    memory = Neighbours()
    rng = np.random.default_rng(0)
    for i in range(memory.capacity):
        vector = rng.normal(size=256).astype(np.float32)
        memory.add("bench", vector / np.linalg.norm(vector), f"b{i % 4}", float(i % 2))
    backends = [f"b{j}" for j in range(4)]
    per_prompt = statistics.median(
        timed(lambda f=f: first(lambda: memory.estimate("bench", prompt_vector(f.text), backends)), 300) for f in feats
    )
    report = {
        "rules_tier_median_ms": round(rules, 4),
        "semantic_tier_median_ms": round(semantic, 4),
        "per_prompt_learning_median_ms": round(per_prompt, 4),
        "per_prompt_memory": "8,192 observations, 4 backends",
        # What checking a client's body costs beyond parsing it (extproc/body.py).
        "body_parse_median_ms": round(parse_only, 4),
        "body_parse_and_check_median_ms": round(checked, 4),
        "targets_ms": {"rules": 0.1, "semantic": 5.0},
        "prompts": len(PROMPTS),
        "semantic_model": (
            "trained task-type model (extproc/task_types.npz): wordllama 256d embeddings of the text,"
            " its first and last lines + hashed words"
        ),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tiers.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
