"""Per-prompt quality: what a backend scored on the prompts most like this one (issue 16).

Class-level learning (`SelectionState.quality`) knows how a backend does on a *class*; on data
where every prompt falls in one class (one task, prompts of varying difficulty) it cannot tell
an easy prompt from a hard one. This memory keeps each observation with its prompt's vector
(the semantic tier's embedding: wordllama, 256 dimensions, L2-normalised) and estimates a
backend's quality on a new prompt as the weighted mean of its scores on the k most similar
prompts it was scored on (weights fall off with the distance from the closest). The estimate
comes with its *evidence* (the neighbours' weighted similarity: at most k, small for a region
never seen), and `SelectionState.expected_quality` blends it with the class-level
figure in proportion, so the class stays the fallback while a region has few observations.

Bounded twice: a ring of `capacity` observations per policy (the oldest are forgotten first),
float32 (a dot product per observation per request: about 0.2 ms for 8,192 on this machine), and
`total` observations across all policies (the oldest of any policy go first). Without the second
bound a worker's memory grew with the number of policies that get feedback (8 MB each at
capacity), not with what it was told to keep: the same number the workers' shared file keeps
(`learning.NEIGHBOUR_ROWS`), so a worker holds no more than that file can give it.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

CAPACITY = 8192
# Observations across every policy of a worker (65,536: 64 MB of vectors).
TOTAL = 65536
K = 16
# Kernel width on cosine similarity: a neighbour 0.1 less similar than the closest counts e^-1
# as much. Prompts of one topic sit within ~0.1 of each other in wordllama's space.
BANDWIDTH = 0.1
# Decisions whose vectors are kept for the feedback that may follow (by decision token).
RECENT = 4096


class _Ring:
    """A policy's observations in arrival order. Slots `[0, filled)` have been written; a slot
    whose observation was forgotten early (the bound across policies) is marked with backend
    -1, which no estimate reads."""

    def __init__(self, dim: int, capacity: int):
        self.vectors = np.zeros((capacity, dim), dtype=np.float32)
        self.backends = np.full(capacity, -1, dtype=np.int32)
        self.scores = np.zeros(capacity, dtype=np.float32)
        self.born = np.zeros(capacity, dtype=np.int64)  # when each arrived, across all policies
        self.ids: dict[str, int] = {}
        self.filled = 0  # slots ever written
        self.size = 0  # observations held
        self.oldest = 0  # the slot of the oldest held
        self.next = 0  # the slot the next observation goes to

    def add(self, vector: np.ndarray, backend: str, score: float, born: int) -> bool:
        """Whether it overwrote the oldest (the ring was full)."""
        index = self.ids.setdefault(backend, len(self.ids))
        capacity = len(self.scores)
        full = self.size == capacity
        if full:
            self.oldest = (self.oldest + 1) % capacity
            self.size -= 1
        self.vectors[self.next] = vector
        self.backends[self.next] = index
        self.scores[self.next] = score
        self.born[self.next] = born
        self.next = (self.next + 1) % capacity
        self.filled = min(self.filled + 1, capacity)
        self.size += 1
        return full

    def oldest_born(self) -> int:
        return int(self.born[self.oldest])

    def forget_oldest(self) -> None:
        self.backends[self.oldest] = -1
        self.oldest = (self.oldest + 1) % len(self.scores)
        self.size -= 1


class Neighbours:
    def __init__(self, capacity: int = CAPACITY, k: int = K, bandwidth: float = BANDWIDTH, total: int = TOTAL):
        self.capacity, self.k, self.bandwidth, self.total = capacity, k, bandwidth, total
        self._rings: dict[str, _Ring] = {}
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        self._arrived = 0  # observations ever added
        self._held = 0
        # (when its oldest arrived, policy): one entry per ring, corrected when met if the ring
        # has since overwritten its oldest.
        self._oldest: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return self._held

    def add(self, policy: str, vector: np.ndarray, backend: str, score: float) -> None:
        """Keep one observation. A vector of another length than the policy's others is left
        out: observations arrive from other replicas too, which may run another embedding."""
        ring = self._rings.get(policy)
        if ring is not None and len(vector) != ring.vectors.shape[1]:
            return
        if ring is None:
            ring = self._rings[policy] = _Ring(len(vector), self.capacity)
            heapq.heappush(self._oldest, (self._arrived, policy))
        if not ring.add(vector, backend, score, self._arrived):
            self._held += 1
        self._arrived += 1
        while self._held > self.total:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        """Forget the oldest observation of any policy."""
        while True:
            born, policy = heapq.heappop(self._oldest)
            ring = self._rings[policy]
            if ring.oldest_born() != born:  # the ring overwrote it meanwhile
                heapq.heappush(self._oldest, (ring.oldest_born(), policy))
                continue
            ring.forget_oldest()
            self._held -= 1
            if ring.size:
                heapq.heappush(self._oldest, (ring.oldest_born(), policy))
            else:
                del self._rings[policy]
            return

    def estimate(self, policy: str, vector: np.ndarray, backends: Iterable[str]) -> dict[str, tuple[float, float]]:
        """Backend id -> (estimated quality, evidence) for the backends observed near `vector`."""
        ring = self._rings.get(policy)
        if ring is None or ring.size == 0 or len(vector) != ring.vectors.shape[1]:
            return {}
        sims = ring.vectors[: ring.filled] @ vector
        owners = ring.backends[: ring.filled]
        out: dict[str, tuple[float, float]] = {}
        for backend in backends:
            index = ring.ids.get(backend)
            if index is None:
                continue
            mine = np.flatnonzero(owners == index)
            if len(mine) == 0:
                continue
            if len(mine) > self.k:
                mine = mine[np.argpartition(sims[mine], -self.k)[-self.k :]]
            near = sims[mine]
            # Relative to the closest: the mean leans on the nearest few. The evidence is how
            # close they are in absolute terms (a region never seen counts for little).
            weights = np.exp((near - near.max()) / self.bandwidth)
            evidence = float(weights @ np.clip(near, 0.0, 1.0))
            if evidence > 0:
                out[backend] = (float(weights @ ring.scores[mine] / weights.sum()), evidence)
        return out

    # ------------------------------------------------------------------ feedback

    def remember(self, token: str, vector: np.ndarray) -> None:
        """The vector of a decision, for the feedback on it that may come (`recall`)."""
        self._recent[token] = vector
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)

    def recall(self, token: str) -> np.ndarray | None:
        return self._recent.get(token)
