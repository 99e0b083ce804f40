"""The trained task-type classifier every policy gets by default (issue 16).

A linear model over two kinds of features of the request's last user message:

- its embedding (the semantic tier's: wordllama, 256 dimensions, L2-normalised), for meaning;
- the words and word pairs it contains, hashed into HASH_BUCKETS buckets (present or not, times
  WORD_SCALE), for the cues an average of word vectors blurs ("translate", "tl;dr", "prove").

Trained offline by `make train-classifier` (eval/train_classifier.py, which builds features
with the functions here: one definition for training and serving) and shipped as
`task_types.npz` beside this module: about 160 KB, read once per process. Per request: one
embedding (shared with per-prompt learning), a few hundred CRC-32s and one small product.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HASH_BUCKETS = 4096
WORD_SCALE = 0.3
MAX_CHARS = 2000
MODEL_FILE = Path(__file__).with_name("task_types.npz")
_WORD = re.compile(r"[a-z0-9']+")


def word_buckets(text: str) -> np.ndarray:
    """The hashed buckets of the text's words and adjacent word pairs (each once)."""
    words = _WORD.findall(text[:MAX_CHARS].lower())
    tokens = set(words) | {f"{a} {b}" for a, b in itertools.pairwise(words)}
    return np.unique(np.fromiter((zlib.crc32(t.encode()) % HASH_BUCKETS for t in tokens), dtype=np.int64))


def features(vector: np.ndarray, text: str) -> np.ndarray:
    """Dense features of one request (what the model's weights are laid out against)."""
    out = np.zeros(len(vector) + HASH_BUCKETS, dtype=np.float32)
    out[: len(vector)] = vector
    out[len(vector) + word_buckets(text)] = WORD_SCALE
    return out


@dataclass(frozen=True)
class TaskModel:
    weights: np.ndarray  # classes x features
    bias: np.ndarray
    classes: tuple[str, ...]
    meta: dict

    def probabilities(self, vector: np.ndarray, text: str) -> np.ndarray:
        dim = len(vector)
        logits = self.weights[:, :dim] @ vector + self.bias
        buckets = word_buckets(text)
        if len(buckets):
            logits += WORD_SCALE * self.weights[:, dim + buckets].sum(axis=1)
        logits -= logits.max()
        exp = np.exp(logits)
        return exp / exp.sum()

    def predict(self, vector: np.ndarray, text: str) -> tuple[str, float]:
        p = self.probabilities(vector, text)
        i = int(np.argmax(p))
        return self.classes[i], float(p[i])


@functools.cache
def load(path: Path = MODEL_FILE) -> TaskModel:
    with np.load(path, allow_pickle=False) as data:
        return TaskModel(
            weights=data["weights"].astype(np.float32),
            bias=data["bias"].astype(np.float32),
            classes=tuple(str(c) for c in data["classes"]),
            meta=json.loads(str(data["meta"])),
        )
