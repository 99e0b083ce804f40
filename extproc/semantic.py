"""Classification tier 2: embedding similarity to a policy's example utterances.

The embedding model ships inside a package (wordllama's static token embeddings, 256 dims) and
loads offline from the package's own folder, once per process. Utterances are embedded once per
config load; a request's text is embedded once and compared with every utterance in one matrix
product. A route's score is its best-matching utterance (paraphrases of any example join it).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from signalbox.api.v1alpha1 import config_pb2 as pb

# Long prompts are judged by their beginning: what a request is about is stated early, and the
# cost of embedding stays bounded.
MAX_CHARS = 2000


class Embedder(Protocol):
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised row per text."""
        ...


@functools.cache
def default_embedder() -> Embedder:
    import wordllama

    model = wordllama.WordLlama.load(cache_dir=os.path.dirname(wordllama.__file__), disable_download=True)

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(model.embed([t[:MAX_CHARS] for t in texts], norm=True), dtype=np.float32)

    return embed


@dataclass(frozen=True, slots=True)
class RouteHit:
    name: str
    task_type: str
    complexity: str
    similarity: float


class SemanticRouter:
    def __init__(self, routes: Sequence[pb.SemanticRoute], default_route: str = "", embedder: Embedder | None = None):
        self.embed = embedder or default_embedder()
        self.routes = list(routes)
        texts = [u for r in self.routes for u in r.utterances]
        # Utterances are grouped by route, so per-route maxima are one reduceat over the scores.
        self.starts = np.cumsum([0] + [len(r.utterances) for r in self.routes[:-1]])
        self.matrix = self.embed(texts)
        self.thresholds = np.array([r.threshold for r in self.routes], dtype=np.float32)
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
    def _hit(route: pb.SemanticRoute, similarity: float) -> RouteHit:
        return RouteHit(route.name, route.task_type, route.complexity, similarity)
