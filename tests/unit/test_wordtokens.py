"""wordllama's tokenizer run by SentencePiece (extproc/wordtokens.py) gives the token ids its
Hugging Face file gives under `tokenizers`: the embeddings, the classifier's weights and the
semantic routes were all made with those. Client text is anything: hypothesis."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from signalbox.core.errors import TokenizerFileError
from signalbox.extproc import semantic, wordtokens
from signalbox.extproc.wordtokens import WordTokens, model_proto, special_tokens


@functools.cache
def tokenizer_file() -> Path:
    return semantic.wordllama_file(semantic.TOKENIZER_FILE)


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


def test_the_shipped_model_is_the_one_the_installed_tokenizer_file_makes():
    # Loaded instead of converting the file when the file is the one it was made from; after a
    # wordllama upgrade this fails until `make tokenizer-model` makes it again (the gateway
    # meanwhile converts the new file as it loads: the next test).
    spec = json.loads(tokenizer_file().read_text())
    made = wordtokens.shipped(tokenizer_file())
    assert made is not None, "the shipped model was made from another file: run `make tokenizer-model`"
    assert made == (model_proto(spec), special_tokens(spec))


def test_the_installed_file_is_read_as_the_shipped_model_and_another_one_converted(tmp_path, monkeypatch):
    converted: list[int] = []
    convert = wordtokens.model_proto
    monkeypatch.setattr(wordtokens, "model_proto", lambda spec: converted.append(1) or convert(spec))
    WordTokens(tokenizer_file())
    assert converted == []  # the shipped model: no JSON parsed, none converted
    # The same tokenizer written otherwise (another wordllama's file, as far as a digest knows).
    other = tmp_path / "tokenizer.json"
    other.write_text(json.dumps(json.loads(tokenizer_file().read_text()), indent=1))
    texts = ["Summarize this <s> article", "def f(x):\n    return x ** 2  # é 你 🙂"]
    assert WordTokens(other)(texts) == reference_ids(texts)
    assert converted == [1]
    # A shipped description that cannot be read is the same as none.
    (tmp_path / "meta.json").write_text("{not json")
    assert wordtokens.shipped(tokenizer_file(), meta=tmp_path / "meta.json") is None
