"""The embedding rows a worker reads (extproc/embedrows.py): the file's own rows, whatever the
ids a request's tokens give, and a worker's memory bounded whatever the variety of its traffic.
Token ids come from client text: hypothesis."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from signalbox.extproc import semantic
from signalbox.extproc.embedrows import CACHED_ROWS, EmbeddingRows, tensor_location

NAME = "embedding.weight"


@functools.cache
def weights_file() -> Path:
    return semantic.wordllama_file(semantic.WEIGHTS_FILE)


@functools.cache
def reference() -> np.ndarray:
    # Read whole (not mapped: the test below checks that nothing maps the file).
    start, shape = tensor_location(weights_file(), NAME)
    return np.fromfile(weights_file(), dtype="<f2", count=shape[0] * shape[1], offset=start).reshape(shape)


@functools.cache
def small() -> EmbeddingRows:
    # Eight slots: every few ids collide, within a call and across calls.
    return EmbeddingRows(weights_file(), NAME, cached=8)


@settings(max_examples=300, deadline=None)
@given(calls=st.lists(st.lists(st.integers(-5, 40_000), max_size=40), min_size=1, max_size=5))
def test_rows_are_the_files_whatever_the_ids_and_however_they_collide(calls):
    rows = reference()
    for ids in calls:
        got = small().take(np.array(ids, dtype=np.int64))
        want = rows[np.clip(np.array(ids, dtype=np.int64), 0, rows.shape[0] - 1)]
        assert got.shape == (len(ids), rows.shape[1]) and got.dtype == np.float16
        assert np.array_equal(got, want)


def _mapped(path: Path) -> bool:
    return any(line.rstrip().endswith(str(path)) for line in Path("/proc/self/maps").read_text().splitlines())


def test_reading_every_row_maps_nothing_and_keeps_at_most_the_cache():
    # Mapped, a worker kept every page it had read (and its neighbours): 14.5 of the file's
    # 16 MB after 3,000 prompts over a broad vocabulary, in every worker's RSS.
    table = EmbeddingRows(weights_file(), NAME)
    ids = np.arange(table.rows)
    for chunk in np.array_split(ids, 64):
        assert np.array_equal(table.take(chunk), reference()[chunk])
    assert table._cache.nbytes == CACHED_ROWS * table.dim * 2 <= 2 * 1024 * 1024
    # And the embedder every classified request goes through reads its rows so.
    semantic.default_embedder()([f"a request of its own words {i} λ 你好" for i in range(50)])
    assert not _mapped(weights_file().resolve())


def test_threads_reading_at_once_each_get_their_own_rows():
    table = EmbeddingRows(weights_file(), NAME, cached=16)
    batches = [np.random.default_rng(seed).integers(0, table.rows, 64) for seed in range(200)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(table.take, batches))
    for ids, rows in zip(batches, got, strict=True):
        assert np.array_equal(rows, reference()[ids])
