"""The trained task-type classifier every policy gets by default (issue 16).

A linear model over features of the request's last user message, read as three segments: the
whole text, its first sentence and its last sentence. A request often carries a document ("Summarize
the following: <article>", "<email> Translate the above into German"): what it asks is stated
at one end, and over the whole text the document's own words outvote the instruction's. So:

- the segments' embeddings (the semantic tier's: wordllama, 256 dimensions each, L2-normalised),
  for meaning;
- the words and word pairs of the whole text, and of its ends (first and last sentences and
  lines), hashed into
  HASH_BUCKETS buckets per block (present or not), each block scaled to a fixed length so that
  a long document weighs no more than a short request, for the cues an average of word vectors
  blurs ("translate", "tl;dr", "prove").

Trained offline by `make train-classifier` (eval/train_classifier.py, which builds features
with the functions here: one definition for training and serving) and shipped as
`task_types.npz` beside this module: about 330 KB (the word weights int8), read once per process. Per request: one
embedding batch of three segments, a few hundred CRC-32s and one small product.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from signalbox.core.errors import ModelFileError

# The layout of the features (and of the shipped weights); `load` refuses a file of another.
FEATURES_VERSION = 2
# Buckets per word block. 4,096 shared each bucket among several of the words and word pairs
# the training rows hold; 16,384 scored better on the sets nobody here trained on (eval/README.md).
HASH_BUCKETS = 16384
# Each word block's L2 norm: the instruction's lines count double against the whole text.
WHOLE_WORDS_NORM = 1.0
ENDS_WORDS_NORM = 2.0
MAX_CHARS = 2000
# Sentences and lines of the ends are read up to this many characters (a one-line request with
# its document inline keeps its instruction at the start or the end of that line).
LINE_CHARS = 200
MODEL_FILE = Path(__file__).with_name("task_types.npz")
_WORD = re.compile(r"[a-z0-9']+")
# Sentence ends and line breaks: where an instruction usually starts or stops.
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")

Embed = Callable[[Sequence[str]], np.ndarray]


def _lines(text: str) -> list[str]:
    """The first and last non-empty lines (at most LINE_CHARS characters each)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return [lines[0][:LINE_CHARS], lines[-1][-LINE_CHARS:]] if lines else []


def segments(text: str) -> tuple[str, str, str]:
    """The whole text, its first sentence and its last sentence (at most LINE_CHARS
    characters each; a line break ends a sentence too)."""
    pieces = [p for p in _SENTENCE.split(text.strip()) if p.strip()]
    if not pieces:
        return text, "", ""
    return text, pieces[0][:LINE_CHARS], pieces[-1][-LINE_CHARS:]


def _bucket_set(text: str) -> set[int]:
    words = _WORD.findall(text[:MAX_CHARS].lower())
    tokens = set(words)
    tokens.update(f"{a} {b}" for a, b in itertools.pairwise(words))
    return {zlib.crc32(t.encode()) % HASH_BUCKETS for t in tokens}


def _sorted(buckets: set[int]) -> np.ndarray:
    # A request's few dozen buckets: sorted in Python, where numpy's unique cost more than the
    # hashing (five calls a request, on the decided path of every classified request).
    return np.array(sorted(buckets), dtype=np.int64)


def word_buckets(text: str) -> np.ndarray:
    """The hashed buckets of the text's words and adjacent word pairs (each once, ascending)."""
    return _sorted(_bucket_set(text))


def _word_block(buckets: np.ndarray, norm: float) -> tuple[np.ndarray, float]:
    return buckets, (norm / np.sqrt(len(buckets)) if len(buckets) else 0.0)


def word_blocks(text: str) -> list[tuple[np.ndarray, float]]:
    """(buckets, the value each is set to) for the whole text and for its ends: the first and
    last sentences, and the first and last lines (a long line holds more than its sentence)."""
    whole, first, last = segments(text)
    ends = [e for e in (first, last, *_lines(text)) if e]
    union = _sorted(set().union(*(_bucket_set(e) for e in ends)))
    return [_word_block(word_buckets(whole), WHOLE_WORDS_NORM), _word_block(union, ENDS_WORDS_NORM)]


def vectors(text: str, embed: Embed) -> np.ndarray:
    """The three segments' embeddings, one row each (an empty sentence embeds as zeros)."""
    whole, first, last = segments(text)
    texts = [whole or " ", first or " ", last or " "]
    # A one-sentence request is its own first and last sentence: embedded once, not three times
    # (most chat turns; the same vectors either way).
    unique = list(dict.fromkeys(texts))
    rows = embed(unique)
    out = rows if len(unique) == 3 else rows[[unique.index(t) for t in texts]]
    if not first:
        out[1:] = 0.0
    return out


def features(segment_vectors: np.ndarray, text: str) -> np.ndarray:
    """Dense features of one request (what the model's weights are laid out against)."""
    dense = segment_vectors.size
    out = np.zeros(dense + 2 * HASH_BUCKETS, dtype=np.float32)
    out[:dense] = segment_vectors.reshape(-1)
    for i, (buckets, value) in enumerate(word_blocks(text)):
        out[dense + i * HASH_BUCKETS + buckets] = value
    return out


@dataclass(frozen=True)
class TaskModel:
    """The weights split as a request reads them: the dense block (segment embeddings) as one
    small float32 matrix, and the word blocks as one row per hashed feature, of which a request
    sums the few dozen rows its words name. Those rows are the bulk of the weights (2 x
    HASH_BUCKETS of them), so they are kept as int8 with one scale per class: 0.3 MB where
    float32 took 1.2 MB in every worker (issue 12's budget). Training scores the weights
    rounded the same way (`quantized`), so what `make eval` measures is what runs."""

    dense: np.ndarray  # classes x dense features, float32
    words: np.ndarray  # word features (both blocks) x classes, int8
    scale: np.ndarray  # per class: what one step of `words` is worth
    bias: np.ndarray
    classes: tuple[str, ...]
    meta: dict

    @classmethod
    def from_weights(cls, weights: np.ndarray, bias: np.ndarray, classes: tuple[str, ...], meta: dict) -> TaskModel:
        """From one classes x features matrix (as trained)."""
        dense = weights.shape[1] - 2 * HASH_BUCKETS
        words = np.asarray(weights[:, dense:], dtype=np.float32)
        scale = np.maximum(np.abs(words).max(axis=1), 1e-12) / 127.0
        return cls(
            dense=np.ascontiguousarray(weights[:, :dense], dtype=np.float32),
            words=np.ascontiguousarray(np.rint(words.T / scale).astype(np.int8)),
            scale=scale.astype(np.float32),
            bias=np.asarray(bias, dtype=np.float32),
            classes=classes,
            meta=meta,
        )

    @property
    def weights(self) -> np.ndarray:
        """The classes x features matrix (float32) this model computes with."""
        return np.hstack([self.dense, (self.words.astype(np.float32) * self.scale).T])

    def probabilities(self, segment_vectors: np.ndarray, text: str) -> np.ndarray:
        logits = self.dense @ segment_vectors.reshape(-1) + self.bias
        for i, (buckets, value) in enumerate(word_blocks(text)):
            if len(buckets):
                logits += value * self.scale * self.words[i * HASH_BUCKETS + buckets].sum(axis=0, dtype=np.int32)
        logits -= logits.max()
        exp = np.exp(logits)
        return exp / exp.sum()

    def predict(self, segment_vectors: np.ndarray, text: str) -> tuple[str, float]:
        p = self.probabilities(segment_vectors, text)
        i = int(np.argmax(p))
        return self.classes[i], float(p[i])


def quantized(weights: np.ndarray) -> np.ndarray:
    """`weights` as a TaskModel made from them computes with them (its word rows in int8)."""
    return TaskModel.from_weights(weights, np.zeros(len(weights)), (), {}).weights


def save(model: TaskModel, path: Path) -> None:
    with path.open("wb") as fh:
        np.savez(
            fh,
            dense=model.dense,
            words=model.words,
            scale=model.scale,
            bias=model.bias,
            classes=np.array(model.classes),
            meta=np.array(json.dumps(model.meta)),
        )


@functools.cache
def load(path: Path = MODEL_FILE) -> TaskModel:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        layout = (meta.get("features_version"), meta.get("hash_buckets"))
        if layout == (FEATURES_VERSION, HASH_BUCKETS):
            return TaskModel(
                dense=data["dense"],
                words=data["words"],
                scale=data["scale"],
                bias=data["bias"],
                classes=tuple(str(c) for c in data["classes"]),
                meta=meta,
            )
    raise ModelFileError(
        f"{path}: weights for features {layout}, this code builds {(FEATURES_VERSION, HASH_BUCKETS)}:"
        " run `make train-classifier`"
    )
