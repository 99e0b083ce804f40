"""wordllama's tokenizer run by SentencePiece (extproc/wordtokens.py) gives the token ids its
Hugging Face file gives under `tokenizers`: the embeddings, the classifier's weights and the
semantic routes were all made with those. Client text is anything: hypothesis."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from signalbox.core.errors import TokenizerFileError
from signalbox.extproc import semantic
from signalbox.extproc.wordtokens import WordTokens, model_proto


@functools.cache
def tokenizer_file() -> Path:
    spec = importlib.util.find_spec("wordllama")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / semantic.TOKENIZER_FILE


@functools.cache
def both() -> tuple[Tokenizer, WordTokens]:
    reference = Tokenizer.from_file(str(tokenizer_file()))
    reference.no_padding()
    reference.no_truncation()
    return reference, WordTokens(tokenizer_file())


def reference_ids(texts: list[str]) -> list[list[int]]:
    return [e.ids for e in both()[0].encode_batch(texts, add_special_tokens=False)]


# Whitespace runs, indentation and newlines (where the two BPEs' merge orders could part), words,
# punctuation, digits, and any Unicode (byte fallback for what the vocabulary lacks).
PIECES = st.sampled_from(
    [
        " ",
        "  ",
        "   ",
        "\n",
        "\t",
        "\n    ",
        "the",
        "The",
        "ing",
        "::",
        '"""',
        "2024",
        "é",
        "日本",
        "🦙",
        "<s>",
        "</s>",
        "<unk>",
        "<",
    ]
)
TEXTS = st.lists(PIECES | st.text(max_size=12), max_size=30).map("".join)


@settings(max_examples=400, deadline=None)
@given(texts=st.lists(TEXTS, min_size=1, max_size=4))
def test_sentencepiece_gives_the_ids_the_hugging_face_tokenizer_gives(texts):
    assert both()[1](texts) == reference_ids(texts)


def test_the_same_ids_for_requests_as_people_write_them():
    texts = [
        "",
        " ",
        "hi!",
        "Write a Python function to parse CSV files.\n\n```python\ndef parse(path):\n    return []\n```",
        "Summarize the following:  The council met on Tuesday.   Residents spoke in favour.",
        "Traduis en français : « Où est la gare ? »",
        "\u3053\u3093\u306b\u3061\u306f\uff0c \U0001f642",  # Japanese and an emoji
        "\x00\x01\x7f control characters",
        "special tokens typed in: a <s> b</s><unk>",
    ]
    assert both()[1](texts) == reference_ids(texts)


def test_a_tokenizer_file_of_another_kind_is_refused_not_misread():
    spec = json.loads(tokenizer_file().read_text())
    with pytest.raises(TokenizerFileError):
        model_proto({**spec, "pre_tokenizer": {"type": "Whitespace"}})
    with pytest.raises(TokenizerFileError):
        model_proto({**spec, "normalizer": {"type": "NFC"}})
