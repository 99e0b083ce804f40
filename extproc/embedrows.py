"""The rows of wordllama's embedding matrix a worker reads, in a bounded cache of its own.

Why not the file memory-mapped (as before, issue 12): a mapped page stays in the process's
RSS once read, and on each fault the kernel maps up to 16 neighbouring pages already in the page
cache with it (fault-around). With prompts over a vocabulary like real traffic's (3,000 prompts
over 11,000 words) each worker had 14.5 of the file's 16 MB mapped: a worker's memory grew with
the variety of its traffic, by more than all the rest of what classification holds. Here a
worker keeps at most CACHED_ROWS rows (2 MB), read with `os.preadv` when first needed; the
file's pages stay in the page cache every worker shares (charged to a pod once, and
reclaimable).

The cache is direct-mapped (a row goes to the slot of its id modulo CACHED_ROWS): a lookup is
one vectorised comparison, and LLaMA's BPE ids run roughly from frequent to rare, so the
frequent tokens rarely collide. A miss is one system call of 512 bytes from the page cache
(about a microsecond).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

# Rows a worker keeps: 4,096 x 256 float16 = 2 MB.
CACHED_ROWS = 4096


def tensor_location(path: Path, name: str) -> tuple[int, tuple[int, ...]]:
    """Where float16 tensor `name` of safetensors file `path` starts, and its shape. (The format:
    an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and
    byte range, then the data.)"""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    entry = header[name]
    if entry["dtype"] != "F16":
        raise ValueError(f"{path}: {name} is {entry['dtype']}, expected F16")
    start, _ = entry["data_offsets"]
    return 8 + size + start, tuple(entry["shape"])


class EmbeddingRows:
    """Rows of a 2-D float16 tensor of a safetensors file, by id (`take`)."""

    def __init__(self, path: Path, name: str, cached: int = CACHED_ROWS):
        self._start, shape = tensor_location(path, name)
        if len(shape) != 2:
            raise ValueError(f"{path}: {name} has shape {shape}, expected 2 dimensions")
        self.rows, self.dim = shape
        self._row_bytes = self.dim * 2
        self._file = path.open("rb", buffering=0)
        self._cache = np.zeros((cached, self.dim), dtype="<f2")
        self._tags = np.full(cached, -1, dtype=np.int64)
        # Reads release the GIL: a caller in another thread must not see a slot half written.
        self._lock = threading.Lock()

    def take(self, ids: np.ndarray) -> np.ndarray:
        """The rows of `ids` (clipped to the matrix), float16, one per id, in order."""
        ids = np.clip(np.asarray(ids, dtype=np.int64), 0, self.rows - 1)
        slots = ids % len(self._tags)
        with self._lock:
            out = self._cache[slots]  # a copy: a miss is read into it, then kept
            for k in np.flatnonzero(self._tags[slots] != ids):
                self._read(int(ids[k]), out[k])
                self._cache[slots[k]] = out[k]
                self._tags[slots[k]] = ids[k]
        return out

    def _read(self, row: int, into: np.ndarray) -> None:
        got = os.preadv(self._file.fileno(), [into.data.cast("B")], self._start + row * self._row_bytes)
        if got != self._row_bytes:
            raise OSError(f"{self._file.name}: row {row} is cut short ({got} of {self._row_bytes} bytes)")
