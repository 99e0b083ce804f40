"""Classification tier 2: embedding similarity to a policy's example utterances.

The embedding model ships inside a package (wordllama's static token embeddings, 256 dims) and
loads offline from the package's own folder, once per process. Utterances are embedded once per
config load; a request's text is embedded once and compared with every utterance in one matrix
product. A route's score is its best-matching utterance (paraphrases of any example join it).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from signalbox.api.v1alpha1 import config_pb2 as pb

from .memtrim import release_free_memory

# Long prompts are judged by their beginning: what a request is about is stated early, and the
# cost of embedding stays bounded.
MAX_CHARS = 2000


class Embedder(Protocol):
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised row per text."""
        ...


# wordllama's shipped model: its weights (float16) and tokenizer, read from the package's folder.
WEIGHTS_FILE = "weights/l2_supercat_256.safetensors"
TOKENIZER_FILE = "tokenizers/l2_supercat_tokenizer_config.json"
EMBED_BATCH = 64


@functools.cache
def shared_embedder() -> Embedder:
    """One embedder per process (its rows and tokenizer loaded once), remembering the texts of
    the request in hand: the task-type tier, per-prompt learning and a rollout's shadow
    decision each embed the same prompt, and it is embedded once."""
    return RecentEmbeddings(default_embedder())


class RecentEmbeddings:
    """An embedder that keeps the rows of the last RECENT distinct texts it embedded, for calls
    of a request's few segments (at most SMALL_CALL texts; a config's utterances go straight
    through). Keyed by what the embedder reads of a text (its first MAX_CHARS characters), so a
    row served again is the row embedding would give; bounded, so at most RECENT x MAX_CHARS
    characters of prompts are held. A lock: tables are built in a thread beside the requests."""

    RECENT = 8
    SMALL_CALL = 4

    def __init__(self, embed: Embedder):
        self.embed = embed
        self.rows: dict[str, np.ndarray] = {}
        self.lock = threading.Lock()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts or len(texts) > self.SMALL_CALL:
            return self.embed(texts)
        keys = [t[:MAX_CHARS] for t in texts]
        with self.lock:
            found = [self.rows.get(k) for k in keys]
        missing = list(dict.fromkeys(k for k, row in zip(keys, found, strict=True) if row is None))
        if missing:
            computed = self.embed(missing)
            # Copies are kept: callers may write to the rows they are given.
            fresh = dict(zip(missing, computed.copy(), strict=True))
            with self.lock:
                for key, row in fresh.items():
                    self.rows.pop(key, None)
                    self.rows[key] = row
                while len(self.rows) > self.RECENT:
                    del self.rows[next(iter(self.rows))]
            if len(missing) == len(keys):  # the usual call: every text new and distinct
                return computed
        else:
            fresh = {}
        # A new array: the kept rows are never handed out.
        return np.stack([fresh[k] if row is None else row for k, row in zip(keys, found, strict=True)])


def prompt_vector(text: str) -> np.ndarray:
    """A request's vector for per-prompt learning (`neighbours`)."""
    return shared_embedder()([text])[0]


def wordllama_file(relative: str) -> Path:
    """A file the installed wordllama package ships (located, not imported: see below)."""
    import importlib.util

    spec = importlib.util.find_spec("wordllama")
    assert spec is not None and spec.submodule_search_locations, "wordllama is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / relative


def default_embedder() -> Embedder:
    """wordllama's embedding (token vectors averaged over the text, then L2-normalised), read
    straight from the files the package ships rather than through `wordllama.WordLlama`: its
    import pulls in requests, pydantic and its trainers (about 30 MB per ext_proc worker), and
    it keeps a float32 copy of the 32,000 x 256 matrix (32 MB). The float16 rows a request
    needs are read from the file instead (`embedrows`: at most 2 MB of them kept) and widened
    to float32 after the lookup, which gives the same numbers (float16 → float32 is exact)."""
    from .embedrows import EmbeddingRows
    from .wordtokens import WordTokens

    weights = EmbeddingRows(wordllama_file(WEIGHTS_FILE), "embedding.weight")
    # wordllama's own tokenizer file, run by SentencePiece (wordtokens: the same ids, half the
    # memory of the `tokenizers` library's copy, and no word cache to grow: the Hugging Face
    # one kept every distinct segment under 256 bytes, about 50 MB over 15,000 prompts,
    # tests/unit/test_semantic_memory.py).
    tokenizer = WordTokens(wordllama_file(TOKENIZER_FILE))
    # What loading freed (the tokenizer's JSON, when it is converted here) stays in glibc's
    # heap otherwise: given back, a worker that classifies is that much smaller (memtrim).
    release_free_memory()

    def batch(texts: Sequence[str]) -> np.ndarray:
        encoded = tokenizer([t[:MAX_CHARS] for t in texts])
        # Each text's own token rows, summed as float32 (float16 -> float32 is exact, and the
        # rows are added in the same order): the padded batch as float32 with its masked copy
        # was several MB for a long prompt, and glibc kept the heap those copies had grown
        # (a worker about 8 MB larger after its first thousand prompts, bench/README.md).
        sums = np.zeros((len(encoded), weights.dim), dtype=np.float32)
        counts = np.ones((len(encoded), 1), dtype=np.float32)
        for row, token_ids in enumerate(encoded):
            ids = np.asarray(token_ids, dtype=np.int32)
            if len(ids):
                sums[row] = weights.take(ids).sum(axis=0, dtype=np.float32)
                counts[row] = len(ids)
        pooled = sums / counts
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled

    def embed(texts: Sequence[str]) -> np.ndarray:
        # In batches (each padded to its longest text), so a config's utterances never make
        # one array of every utterance times the longest.
        parts = [batch(texts[i : i + EMBED_BATCH]) for i in range(0, len(texts), EMBED_BATCH)]
        return np.concatenate(parts) if parts else np.zeros((0, weights.dim), dtype=np.float32)

    return embed


class Classifier(Protocol):
    """What the semantic tier asks: a policy's own routes (SemanticRouter) or the built-in
    task-type model (default_routes.TaskTypeRouter)."""

    def classify(self, text: str) -> RouteHit | None: ...


@dataclass(frozen=True, slots=True)
class RouteHit:
    name: str
    task_type: str
    complexity: str
    similarity: float
    # A policy's own route is the class learning is kept by; the built-in task-type model's
    # answer is not (its class is "task/complexity", as when a rule decides).
    is_class: bool = True


class SemanticRouter:
    def __init__(self, routes: Sequence[pb.SemanticRoute], default_route: str = "", embedder: Embedder | None = None):
        # The process's one embedder: each one loads wordllama's tokenizer (about 10 MB and
        # 60 ms), which every policy with routes of its own used to do again.
        self.embed = embedder or shared_embedder()
        texts = [u for r in routes for u in r.utterances]
        # Utterances are grouped by route, so per-route maxima are one reduceat over the scores.
        self.starts = np.cumsum([0] + [len(r.utterances) for r in routes[:-1]])
        self.matrix = self.embed(texts)
        self.thresholds = np.array([r.threshold for r in routes], dtype=np.float32)
        # What a hit names, not the routes' messages: a part of the config message keeps all of
        # it in memory, and a policy's router outlives its config when the next table reuses it.
        self.routes = [RouteHit(r.name, r.task_type, r.complexity, 0.0) for r in routes]
        self.default = next((r for r in self.routes if r.name == default_route), None)

    def classify(self, text: str) -> RouteHit | None:
        """The most similar route above its threshold, else the default route, else None."""
        if not text.strip():
            return self._hit(self.default, 0.0) if self.default else None
        scores = self.matrix @ self.embed([text])[0]
        best_per_route = np.maximum.reduceat(scores, self.starts)
        margin = best_per_route - self.thresholds
        i = int(np.argmax(np.where(margin >= 0, best_per_route, -np.inf)))
        if margin[i] >= 0:
            return self._hit(self.routes[i], float(best_per_route[i]))
        return self._hit(self.default, float(best_per_route.max())) if self.default else None

    @staticmethod
    def _hit(route: RouteHit, similarity: float) -> RouteHit:
        return RouteHit(route.name, route.task_type, route.complexity, similarity, route.is_class)
