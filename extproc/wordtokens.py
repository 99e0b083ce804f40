"""wordllama's tokenizer, run by SentencePiece: the same token ids as its Hugging Face file.

Why (issue 12): the tokenizer is what the embedding of every classified request starts from,
and the `tokenizers` library held it in 9.2 MB of Rust maps per ext_proc worker (vocabulary,
reverse vocabulary and 61,249 merges), beside 5.3 MB of its library in memory. wordllama's
tokenizer is LLaMA 2's, a byte-fallback BPE that SentencePiece was made for: built from the
same file, SentencePiece holds it in 5.3 MB, its library is a fifth of the size, and it encodes
faster (a request's three segments in 19 against 44 us; `tests/unit/test_wordtokens.py`
checks the ids are the same).

The model made from the file wordllama ships is shipped beside this module (`wordtokens.model`,
with the SHA-256 of the file it was made from and its special tokens in `wordtokens.meta.json`;
`make tokenizer-model` makes both again). Loading checks the installed file's digest against
it and, when equal, reads only the model: parsing the 1.8 MB of JSON and building the model
left a worker 5.5 MB larger than loading the built one (Python's and glibc's heaps keep what the
parse freed, issue 12), and took 60 ms of the first classified request. A file of another
wordllama version is converted as it loads, so the ids are always the installed file's
(`tests/unit/test_wordtokens.py` also checks that the shipped model is the installed file's).

The conversion: each vocabulary piece becomes a SentencePiece piece (`<unk>` unknown, `<s>` and
`</s>` control, `<0xNN>` bytes), scored by the rank of the first merge that makes it (a piece
no merge makes scores 0). SentencePiece's BPE merges the adjacent pair whose result scores
highest, which is the Hugging Face BPE's lowest-ranked merge. The normaliser (prepend "▁",
spaces as "▁") is SentencePiece's dummy prefix and whitespace escaping, extra whitespace kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece
from sentencepiece import sentencepiece_model_pb2 as spm_pb

from signalbox.core.errors import TokenizerFileError

# The normaliser a file must have for the conversion to mean the same thing.
EXPECTED_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ],
}


def model_proto(spec: dict[str, Any]) -> bytes:
    """The SentencePiece model for a Hugging Face tokenizer file's JSON (wordllama's)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback") or spec.get("pre_tokenizer") is not None:
        raise TokenizerFileError("not a byte-fallback BPE without a pre-tokenizer")
    if spec.get("normalizer") != EXPECTED_NORMALIZER:
        raise TokenizerFileError(f"normaliser {spec.get('normalizer')!r} is not LLaMA's")
    rank: dict[str, int] = {}
    for r, merge in enumerate(model["merges"]):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    kinds = spm_pb.ModelProto.SentencePiece
    out = spm_pb.ModelProto()
    vocab: dict[str, int] = model["vocab"]
    for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        added = out.pieces.add()
        added.piece = piece
        if piece == model.get("unk_token"):
            added.type = kinds.UNKNOWN
        elif piece in ("<s>", "</s>"):
            added.type = kinds.CONTROL
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            added.type = kinds.BYTE
        added.score = -float(rank[piece]) if piece in rank else 0.0
    out.trainer_spec.model_type = spm_pb.TrainerSpec.BPE
    out.trainer_spec.byte_fallback = True
    out.trainer_spec.vocab_size = len(vocab)
    out.trainer_spec.unk_id = vocab[model.get("unk_token", "<unk>")]
    out.trainer_spec.bos_id = vocab.get("<s>", -1)
    out.trainer_spec.eos_id = vocab.get("</s>", -1)
    out.trainer_spec.pad_id = -1
    out.normalizer_spec.name = "identity"
    out.normalizer_spec.add_dummy_prefix = True
    out.normalizer_spec.remove_extra_whitespaces = False
    out.normalizer_spec.escape_whitespaces = True
    return out.SerializeToString()


def special_tokens(spec: dict[str, Any]) -> dict[str, int]:
    """Special tokens written in the text itself ("<s>"): the Hugging Face tokenizer matches
    them before anything else and tokenizes the text between them on its own (each part with
    its "▁" prefix), and so does WordTokens."""
    return {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special") and not t.get("normalized")}


# Beside the module's own file (resolved: an editable install links it, and `main` writes the source).
SHIPPED_MODEL = Path(__file__).resolve().with_name("wordtokens.model")
SHIPPED_META = Path(__file__).resolve().with_name("wordtokens.meta.json")


def shipped(
    tokenizer_file: Path, model: Path = SHIPPED_MODEL, meta: Path = SHIPPED_META
) -> tuple[bytes, dict[str, int]] | None:
    """The shipped model and special tokens when they were made from `tokenizer_file` as it
    is (its SHA-256, 2 ms), else None."""
    try:
        made_from = json.loads(meta.read_text(encoding="utf-8"))
        if hashlib.sha256(tokenizer_file.read_bytes()).hexdigest() != made_from["source_sha256"]:
            return None
        return model.read_bytes(), {str(k): int(v) for k, v in made_from["special"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_shipped(tokenizer_file: Path, model: Path = SHIPPED_MODEL, meta: Path = SHIPPED_META) -> None:
    """Make the shipped model and its description from `tokenizer_file`."""
    text = tokenizer_file.read_bytes()
    spec = json.loads(text)
    model.write_bytes(model_proto(spec))
    described = {"source_sha256": hashlib.sha256(text).hexdigest(), "special": special_tokens(spec)}
    meta.write_text(json.dumps(described, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class WordTokens:
    """Token ids of texts, as wordllama's tokenizer gives them (no special tokens added)."""

    def __init__(self, tokenizer_file: Path):
        made = shipped(tokenizer_file)
        if made is None:  # another wordllama's file: converted here
            spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
            made = model_proto(spec), special_tokens(spec)
            del spec
        proto, self.special = made
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(self.special, key=len, reverse=True))) + ")")

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        # One text at a time, on the calling thread: the batch `encode` took 102 us for a
        # request's three segments (a thread pool's start and the wrapper's options), this
        # 19 us, against 44 us for the `tokenizers` batch.
        encode = self.processor.EncodeAsIds
        return [encode(text) if "<" not in text or not self.special else self._with_special(text) for text in texts]

    def _with_special(self, text: str) -> list[int]:
        out: list[int] = []
        for part in self._split.split(text):
            if part in self.special:
                out.append(self.special[part])
            elif part:
                out.extend(self.processor.EncodeAsIds(part))
        return out


def main(argv: list[str] | None = None) -> int:
    """`python -m signalbox.extproc.wordtokens`: the shipped model, from the installed wordllama."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--tokenizer-file", type=Path, help="default: the installed wordllama's")
    args = parser.parse_args(argv)
    from .semantic import TOKENIZER_FILE, wordllama_file

    write_shipped(args.tokenizer_file or wordllama_file(TOKENIZER_FILE))
    print(f"wrote {SHIPPED_MODEL} and {SHIPPED_META}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
