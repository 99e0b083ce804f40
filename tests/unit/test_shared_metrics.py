"""The metrics the config multiplies (by policy, backend, consumer) are kept once per gateway in a
shared table (extproc/sharedmetrics.py), not as prometheus_client objects in every worker."""

from __future__ import annotations

import gc
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram

from signalbox.extproc import metrics as metrics_module
from signalbox.extproc.memtrim import release_free_memory
from signalbox.extproc.metrics import Metrics
from signalbox.extproc.sharedmetrics import (
    SCRAPE_WAIT_S,
    SeriesStore,
    SharedCollector,
    SharedCounter,
    SharedHistogram,
)

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LABELS = st.sampled_from(["a", "b", 'q"uote', "back\\slash", "new\nline", "ünï"])


def _samples(registry: CollectorRegistry) -> list[tuple[str, list[tuple[str, str]], float]]:
    return sorted(
        (s.name, sorted(s.labels.items()), round(s.value, 9))
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    )


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(LABELS, LABELS, st.one_of(st.sampled_from(BUCKETS), st.floats(0, 200, allow_nan=False))),
        max_size=40,
    ),
)
def test_the_shared_series_expose_what_prometheus_client_would(observations):
    """Same names, labels, bucket counts, sums and totals as prometheus_client's own counter and
    histogram given the same calls: dashboards and alerts cannot tell them apart."""
    theirs = CollectorRegistry()
    counter = Counter("signalbox_cost_usd", "Spend.", ["policy", "model"], registry=theirs)
    histogram = Histogram("gen_ai_duration_seconds", "Time.", ["policy", "model"], buckets=BUCKETS, registry=theirs)
    ours = CollectorRegistry()
    collector = SharedCollector(SeriesStore())
    ours.register(collector)
    shared_counter = SharedCounter(collector.store, "signalbox_cost_usd", "Spend.", ["policy", "model"])
    shared_histogram = SharedHistogram(
        collector.store, "gen_ai_duration_seconds", "Time.", ["policy", "model"], BUCKETS
    )
    collector.metrics += [shared_counter, shared_histogram]
    for policy, model, value in observations:
        counter.labels(policy, model).inc(value)
        shared_counter.labels(policy, model).inc(value)
        histogram.labels(policy, model).observe(value)
        shared_histogram.labels(policy, model).observe(value)
    assert _samples(ours) == _samples(theirs)


def test_workers_count_into_one_table_and_any_of_them_exposes_the_sum(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics_module.MULTIPROC_ENV, str(tmp_path))
    first, second = Metrics(), Metrics()  # two workers of one gateway
    first.cost.labels("default/p", "openai", "gpt").inc(0.25)
    second.cost.labels("default/p", "openai", "gpt").inc(0.5)
    second.request_duration.labels("gpt", "openai", "openai").observe(0.3)
    second._shared.store.flush()  # the other worker's timer (FLUSH_S)
    exposed = first.exposition().decode()  # the admin worker flushes its own first
    assert 'signalbox_cost_usd_total{model="gpt",policy="default/p",provider="openai"} 0.75' in exposed
    assert 'gen_ai_server_request_duration_seconds_bucket{gen_ai_provider_name="openai",' in exposed
    assert 'gen_ai_server_request_duration_seconds_count{gen_ai_provider_name="openai",' in exposed


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_worker_holds_no_series_of_its_own(tmp_path, monkeypatch):
    """What a request to a (policy, backend) pair costs a worker is not kept per pair: with
    prometheus_client's multiprocess mode it was about 37 KB each (185 MB for these 5,000)."""
    monkeypatch.setenv(metrics_module.MULTIPROC_ENV, str(tmp_path))
    metrics = Metrics()
    gc.collect()
    release_free_memory()
    before = _rss_mb()
    for i in range(5000):
        policy, provider = f"default/r{i:05d}", f"p{i:05d}"
        metrics.requests.labels(policy, provider, "m", "cost", "semantic", "routed").inc()
        metrics.classifications.labels(policy, "semantic", "qa", "simple").inc()
        metrics.request_duration.labels("m", "openai_compatible", provider).observe(0.2)
        metrics.time_to_first_token.labels("m", "openai_compatible", provider).observe(0.05)
        metrics.tokens.labels("input", "m", "openai_compatible", provider, policy).inc(10)
        metrics.tokens.labels("output", "m", "openai_compatible", provider, policy).inc(20)
        metrics.cost.labels(policy, provider, "m").inc(0.001)
    metrics._shared.store.flush()
    gc.collect()
    release_free_memory()
    grown = _rss_mb() - before
    assert grown < 20, f"{grown:.1f} MB for 5,000 (policy, backend) pairs"


@pytest.mark.parametrize("failing", ["BEGIN IMMEDIATE", "executemany", "COMMIT"])
def test_a_flush_that_fails_keeps_its_deltas_for_the_next(failing):
    """Another worker holding the file's lock past the timeout, or a full disk: nothing counted
    is lost, it is written with the next flush."""
    store = SeriesStore()
    counter = SharedCounter(store, "signalbox_feedback", "Feedback.", ["policy"])

    class Failing:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        @property
        def in_transaction(self) -> bool:
            return self.db.in_transaction

        def execute(self, sql, *args):
            if sql == failing:
                raise sqlite3.OperationalError("database is locked")
            return self.db.execute(sql, *args)

        def executemany(self, *args):
            if failing == "executemany":
                raise sqlite3.OperationalError("disk I/O error")
            return self.db.executemany(*args)

    counter.labels("p").inc(2)
    real, store.db = store.db, Failing(store.db)  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError):
        store.flush()
    assert store.read() == {}  # a scrape meanwhile answers with what the table has
    store.db = real
    assert not real.in_transaction
    counter.labels("p").inc(3)
    assert store.read() == {"signalbox_feedback": {("p",): {0: 5.0}}}


def test_a_scrape_sees_what_every_worker_counted_before_it(tmp_path):
    """Read-your-writes across workers, as prometheus_client's shared files gave: a request
    counted by another worker just before a scrape is in that scrape, though that worker's own
    timer would flush it only a minute later. A worker that has stopped is not waited for."""
    script = (
        "import sys, time\n"
        "from signalbox.extproc import sharedmetrics as m\n"
        "m.FLUSH_S = 60\n"
        "store = m.SeriesStore(sys.argv[1])\n"
        "m.SharedCounter(store, 'signalbox_feedback', 'Feedback.', ['policy']).labels('p').inc(7)\n"
        "print('counted', flush=True)\n"
        "time.sleep(60)\n"
    )
    other = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "counted"
        scraper = SeriesStore(tmp_path)
        started = time.monotonic()
        assert scraper.read() == {"signalbox_feedback": {("p",): {0: 7.0}}}
        assert time.monotonic() - started < SCRAPE_WAIT_S  # it answered; nobody timed out
    finally:
        other.kill()
        other.wait()
    started = time.monotonic()
    scraper.read()  # the other worker is gone: nothing to wait for
    assert time.monotonic() - started < SCRAPE_WAIT_S


def test_a_scrape_writes_each_metric_once_a_few_series_at_a_time(tmp_path, monkeypatch):
    """The exposition text is formatted a chunk of series at a time (a large scrape's objects
    are not all alive at once); it says what the families say, each metric described once."""
    from prometheus_client.parser import text_string_to_metric_families

    from signalbox.extproc import sharedmetrics

    monkeypatch.setenv(metrics_module.MULTIPROC_ENV, str(tmp_path))
    monkeypatch.setattr(sharedmetrics, "CHUNK", 3)
    metrics = Metrics()
    for i in range(10):
        metrics.cost.labels(f"default/r{i}", f"p{i}", "m").inc(0.5 + i)
        metrics.request_duration.labels("m", "openai", f"p{i}").observe(0.07 * i)
    text = metrics.exposition().decode()
    for name in ("signalbox_cost_usd_total", "gen_ai_server_request_duration_seconds", "signalbox_feedback_total"):
        assert text.count(f"# TYPE {name} ") == 1, name
    parsed = {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if family.name in ("signalbox_cost_usd", "gen_ai_server_request_duration_seconds")
    }
    whole = {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in metrics._shared.collect()
        for s in family.samples
        if family.name in ("signalbox_cost_usd", "gen_ai_server_request_duration_seconds")
    }
    assert parsed == whole and len(whole) == 10 + 10 * 14  # 10 counters; 12 buckets, count, sum each
