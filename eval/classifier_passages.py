"""Requests that carry a document: an instruction before or after a passage (issue 16).

Everyday requests often paste what they are about ("Summarize the following: <article>",
"<email> Translate the above into German"). Trained only on short requests, the task-type
model labelled such a request by its passage: 0-2 of 40 per class of the probe below were
right. Two sets are built here, from disjoint phrasings and disjoint passages:

- `wrapped()`: training rows. Instructions written here for the types that act on a document
  (summarization, translation, extraction; fewer for code and creative rewriting), each put
  before or after a passage: paragraphs of half of the Python reference's topics (the standard
  library's `pydoc_data`, PSF licence), benchmark prompts of llmrouter_dcrouter over 250
  characters (MIT; human_eval's for code), whatever their own task, so the instruction has to
  outweigh them.
- `probe()`: evaluation rows, never trained on. Other phrasings, written here too, around
  paragraphs of the other half of the reference's topics.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

LANGUAGES = [
    "French",
    "German",
    "Spanish",
    "Japanese",
    "Italian",
    "Portuguese",
    "Dutch",
    "Korean",
    "Polish",
    "Chinese",
    "Russian",
    "Arabic",
    "Turkish",
    "Swedish",
    "Hindi",
]
THINGS = [
    "names",
    "dates",
    "numbers",
    "people",
    "places",
    "organisations",
    "key terms",
    "email addresses",
    "prices",
    "technical terms",
    "product names",
    "quantities",
]
CODE_LANGUAGES = ["Go", "Rust", "Java", "JavaScript", "C++"]
# Types that act on a document get PER_CLASS rows; the others half as many.
DOCUMENT_TYPES = ("summarization", "translation", "extraction")
PER_CLASS = 150
WRAPS: dict[str, list[str]] = {
    "summarization": [
        "Summarize the following text.",
        "Summarize this in {n} sentences:",
        "TL;DR:",
        "Give me a short summary of the text below.",
        "What are the main points of this passage?",
        "Condense the following into one paragraph.",
        "Write a one-line summary of the above.",
        "Can you shorten this for me?",
        "Briefly recap the following.",
        "Write an abstract for this.",
        "Give me the key takeaways from this.",
        "Summarise the text above in plain language.",
        "Make this much shorter, keep only what matters:",
        "Write a short synopsis of the following.",
        "Sum up this passage in {n} bullet points.",
    ],
    "translation": [
        "Translate the following into {lang}.",
        "Translate to {lang}:",
        "Please translate this text from English to {lang}.",
        "Can you put the above into {lang}?",
        "{lang} translation, please:",
        "Translate this paragraph into {lang}, keeping the tone.",
        "Render the following in {lang}.",
        "I need this in {lang}:",
        "Translate the text above to {lang}.",
        "Convert this English text into {lang}.",
    ],
    "extraction": [
        "Extract all the {thing} from the text below.",
        "List every {thing} mentioned in the following.",
        "From the passage, pull out the {thing} as JSON.",
        "Identify the {thing} in this text.",
        "Return the {thing} found above, one per line.",
        "Make a table of the {thing} in this text.",
        "Find all {thing} in the following and output a list.",
        "Pick out the {thing} from the text above; nothing else.",
    ],
    "creative": [
        "Rewrite the following as a poem.",
        "Turn this into a short story.",
        "Retell this as a fairy tale for children.",
        "Write song lyrics inspired by the text below.",
        "Rewrite the above as a limerick.",
        "Make this into a dramatic monologue.",
    ],
    "code": [
        "Explain what this code does.",
        "Find the bug in this function.",
        "Add type hints and docstrings to this code.",
        "Rewrite this in {code_lang}.",
        "Write unit tests for the following function.",
        "Optimise this code:",
        "Complete this function.",
    ],
}
SEPARATORS = ["\n\n", "\n", " ", "\n\n---\n", ": "]
# Evaluation only: phrasings no training row uses.
PROBE: dict[str, list[str]] = {
    "summarization": [
        "Can you boil this down to two sentences?\n\n{p}",
        "{p}\n\nGive me the gist of the above.",
        "Please write a brief overview of the following text:\n{p}",
        "{p}\n\nSum this up for my manager in a few lines.",
    ],
    "translation": [
        "Put this into Spanish:\n\n{p}",
        "{p}\n\nCan you render the above in German?",
        "Translate to French please: {p}",
        "How would this read in Japanese?\n{p}",
    ],
    "extraction": [
        "From the text below, list every person and place named.\n\n{p}",
        "{p}\n\nPull out all the numbers mentioned above as a JSON array.",
        "Which organisations are mentioned in this passage? Return them as a bullet list.\n{p}",
        "{p}\n\nReturn a table of the dates and events in the text above.",
    ],
}
PROBE_PASSAGES = 10


def reference_paragraphs(half: int) -> list[str]:
    """Prose paragraphs of every other topic of the Python reference (half 0 or 1)."""
    from pydoc_data.topics import topics

    out = []
    for i, key in enumerate(sorted(topics)):
        if i % 2 != half:
            continue
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            text = paragraph.strip()
            if 200 < len(text) < 1500 and not text.startswith(("*", "   ")):
                out.append(text)
    return out


def _benchmark_prompts(data: Path) -> tuple[list[str], list[str]]:
    """Long llmrouter_dcrouter prompts of any task, and its human_eval prompts (code)."""
    rows = [
        json.loads(line)
        for line in (data / "routing" / "llmrouter_dcrouter" / "default_query_train.jsonl").open(encoding="utf-8")
    ]
    long = [r["query"] for r in rows if len(r["query"]) > 250]
    code = [r["query"] for r in rows if r["task_name"] == "human_eval"]
    return long, code


def wrapped(data: Path, seed: int = 5) -> list[tuple[str, str]]:
    """(request, task type) rows: an instruction before (60 %) or after a passage."""
    rng = random.Random(seed)
    long, code = _benchmark_prompts(data)
    passages = reference_paragraphs(0) + long
    out = []
    for label, phrasings in WRAPS.items():
        for _ in range(PER_CLASS if label in DOCUMENT_TYPES else PER_CLASS // 2):
            instruction = rng.choice(phrasings).format(
                n=rng.randint(2, 5),
                lang=rng.choice(LANGUAGES),
                thing=rng.choice(THINGS),
                code_lang=rng.choice(CODE_LANGUAGES),
            )
            passage = rng.choice(code if label == "code" else passages)
            sep = rng.choice(SEPARATORS)
            out.append(
                (f"{instruction}{sep}{passage}" if rng.random() < 0.6 else f"{passage}{sep}{instruction}", label)
            )
    return out


def probe(seed: int = 3) -> list[tuple[str, str]]:
    """(request, task type) rows for evaluation: PROBE's phrasings around unseen paragraphs."""
    rng = random.Random(seed)
    paragraphs = reference_paragraphs(1)
    return [
        (phrasing.format(p=p), label)
        for label, phrasings in PROBE.items()
        for phrasing in phrasings
        for p in rng.sample(paragraphs, PROBE_PASSAGES)
    ]
