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
        # Fields asked for by name, answered in a format, over prose that reads like a story or
        # the news (its own words pull towards qa): what extraction requests look like.
        "Identify the {thing} and the {thing2} mentioned in the following sentences. Output JSON.",
        "Read the notes below and fill in: who, what, when and where.",
        "Get the {thing} out of this message and give them to me as a CSV with a header row.",
        "Given the text below, return an object with the fields name, date and amount.",
        "Go through these messages and list each {thing} you find, with the sentence it is in.",
        "Turn the following into a structured record: {thing}, {thing2}, and anything else named.",
        "Which {thing} does the text below mention? Answer with a bullet list only.",
        "Scan the paragraph below and count how many {thing} it contains; list them too.",
        "Pull the key facts (people, places, dates, numbers) out of these lines into a table.",
        "For each sentence below, give the {thing} it mentions, one line per sentence.",
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


def llmrouter_queries(data: Path) -> list[dict]:
    """llmrouter_dcrouter's prompts with their benchmark (`query`, `task_name`; MIT)."""
    path = data / "routing" / "llmrouter_dcrouter" / "default_query_train.jsonl"
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def everyday_sentences(data: Path) -> list[str]:
    """presidio-research's synthetic sentences (MIT): short everyday prose full of names, places,
    numbers and dates, put together as the documents extraction requests are asked over."""
    records = json.loads((data / "pii" / "presidio_synth_pii" / "synth_dataset_v2.json").read_text(encoding="utf-8"))
    return sorted({r["full_text"].strip() for r in records if 30 < len(r["full_text"]) < 300})


def _benchmark_prompts(data: Path) -> tuple[list[str], list[str]]:
    """Long llmrouter_dcrouter prompts of any task, and its human_eval prompts (code)."""
    rows = llmrouter_queries(data)
    long = [r["query"] for r in rows if len(r["query"]) > 250]
    code = [r["query"] for r in rows if r["task_name"] == "human_eval"]
    return long, code


def wrapped(data: Path, seed: int = 5) -> list[tuple[str, str]]:
    """(request, task type) rows: an instruction before (60 %) or after a passage."""
    rng = random.Random(seed)
    long, code = _benchmark_prompts(data)
    passages = reference_paragraphs(0) + long
    sentences = everyday_sentences(data)
    out = []
    for label, phrasings in WRAPS.items():
        for _ in range(PER_CLASS if label in DOCUMENT_TYPES else PER_CLASS // 2):
            instruction = rng.choice(phrasings).format(
                n=rng.randint(2, 5),
                lang=rng.choice(LANGUAGES),
                thing=rng.choice(THINGS),
                thing2=rng.choice(THINGS),
                code_lang=rng.choice(CODE_LANGUAGES),
            )
            if label == "code":
                passage = rng.choice(code)
            elif label == "extraction" and rng.random() < 0.5:
                passage = " ".join(rng.sample(sentences, rng.randint(3, 8)))
            else:
                passage = rng.choice(passages)
            sep = rng.choice(SEPARATORS)
            out.append(
                (f"{instruction}{sep}{passage}" if rng.random() < 0.6 else f"{passage}{sep}{instruction}", label)
            )
    return out


# Role-play: a persona to keep, then the first thing asked of it (just_eval's role-play, which
# Signalbox counts as chat). The persona frames the request; what is asked is any question.
ROLES = [
    "a pirate captain",
    "a medieval blacksmith",
    "a Victorian detective",
    "a travel agent in Lisbon",
    "a stand-up comedian",
    "a grumpy old wizard",
    "a football coach at half-time",
    "a job interviewer at a bank",
    "a kindergarten teacher",
    "an astronaut on the space station",
    "a barista who loves gossip",
    "a noir private eye",
    "a Roman senator",
    "a sarcastic robot butler",
    "a park ranger",
    "a fortune teller",
    "my personal trainer",
    "a cowboy in 1870",
    "a tech support agent",
    "a museum guide",
    "a famous novelist",
    "a wise old tortoise",
    "a news anchor",
    "a hotel concierge",
]
FRAMES = [
    "Pretend you are {role}. Stay in character for the rest of our conversation. First question: {q}",
    "I want you to act as {role}. I will ask you things and you answer as they would, never breaking character. {q}",
    "From now on you are {role}. Do not mention that you are an AI. {q}",
    "Let's play a game: you're {role} and I'm a visitor. {q}",
    "Take on the persona of {role} and reply in their voice. My first message: {q}",
    "You are {role}, talking to me in your own style. {q}",
    "Stay in character as {role} throughout. Don't begin your answers with 'As {role}'. Here's my first question: {q}",
    "Imagine you are {role} and I am interviewing you. {q}",
    "Role-play with me: you are {role}. Answer the way they would. {q}",
    "Speak as {role} would, in the first person. {q}",
    "Be {role} for this chat. Keep the voice, the manners and the slang. {q}",
    "Act as {role}. I'll play a customer who just walked in. {q}",
]
OPENERS = [
    "Tell me about your day.",
    "What do you fear most?",
    "How did you end up in this line of work?",
    "What's the best advice you ever got?",
    "Can you describe where you live?",
    "What would you do with a free afternoon?",
]


def in_character(data: Path, seed: int = 11) -> list[tuple[str, str]]:
    """(request, "chat") rows: a persona frame around an opener or a trivia question
    (llmrouter_dcrouter's natural_qa and trivia_qa, whose own words pull towards qa)."""
    rng = random.Random(seed)
    questions = [r["query"].strip() for r in llmrouter_queries(data) if r["task_name"] in ("natural_qa", "trivia_qa")]
    out = []
    for _ in range(PER_CLASS):
        q = rng.choice(OPENERS) if rng.random() < 0.3 else rng.choice(questions)
        q = q[0].upper() + q[1:] + ("" if q.endswith(("?", ".")) else "?")
        out.append((rng.choice(FRAMES).format(role=rng.choice(ROLES), q=q), "chat"))
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
