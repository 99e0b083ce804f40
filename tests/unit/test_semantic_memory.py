"""A worker's memory does not grow with the variety of the prompts it classifies.

The embedder's tokenizer (wordllama's BPE, no pre-tokenizer) treats each segment as one word;
with its word cache on, every distinct segment under 256 bytes was kept (up to 10,000, never
evicted): about 11 MB per 2,500 distinct prompts, kept for the life of the worker.
"""

from __future__ import annotations

import random
from pathlib import Path

from signalbox.extproc.semantic import default_embedder

WORDS_TEXT = (
    "how do I write a function that sorts the list of numbers explain why the sky is blue "
    "summarize this article about climate change translate into French hello world what is "
    "the best way to learn maths quickly please give me three ideas for a birthday party"
)
WORDS = WORDS_TEXT.split()


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _prompts(rng: random.Random, count: int) -> list[str]:
    # Distinct (a number each), short enough that a cache would have kept them.
    return [" ".join(rng.choices(WORDS, k=rng.randint(5, 25))) + f" {i}" for i in range(count)]


def test_distinct_prompts_do_not_grow_the_embedders_memory() -> None:
    embed = default_embedder()
    rng = random.Random(7)
    for text in _prompts(rng, 300):  # the rows of these words' tokens are read in, numpy warms
        embed([text])
    before = _rss_mb()
    for text in _prompts(rng, 3000):
        embed([text])
    grown = _rss_mb() - before
    # With the word cache this grew by about 13 MB; without it, by nothing measurable.
    assert grown < 4, f"the embedder kept {grown:.1f} MB for 3,000 distinct prompts"
