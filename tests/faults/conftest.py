"""Fixtures of the fault tier: one real gateway (Envoy + ext_proc) in front of fake providers
that misbehave on command (`signalbox.fakeprovider.Fault`), and the scorecard each case adds
its measured result to (`python -m tests.faults.scorecard` renders it into the README)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.dataplane.conftest import Fake, reset_fakes_of, running

# Where the tier writes its measured rows when asked (make faults-scorecard sets it).
SCORECARD_ENV = "SIGNALBOX_FAULTS_SCORECARD"
_rows: dict[str, dict] = {}


@pytest.fixture(scope="session")
def fakes() -> Iterator[dict[str, Fake]]:
    # "brittle" only ever fails: Envoy ejects it, which must not touch the other cases' primary.
    for started in running(("primary", "second", "brittle")):
        for fake in started.values():
            warm(fake)
        yield started


def warm(fake: Fake) -> None:
    """Wait until the fake checks Anthropic requests at full speed: it reads the SDKs' type
    models in the background after it starts (about 1.2 s, more on a busy machine), and a
    request that needs them meanwhile waits. In this tier that wait looked like a provider
    silent past a deadline (a continuation on an Anthropic backend failed this way)."""
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "warm-up"}
    httpx.post(f"{fake.url}/v1/messages", json=body, headers=headers, timeout=60).raise_for_status()
    fake.reset()


@pytest.fixture(autouse=True)
def _reset_fakes(request):
    reset_fakes_of(request)


@pytest.fixture
def scorecard(request):
    """`scorecard(case, expected, measured)`: one row, marked passed or failed with its test."""

    def record(case: str, expected: str, measured: str) -> None:
        _rows[request.node.nodeid] = {"case": case, "expected": expected, "measured": measured}

    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and item.nodeid in _rows:
        _rows[item.nodeid]["passed"] = report.passed


def pytest_sessionfinish(session):
    path = os.environ.get(SCORECARD_ENV)
    if path and _rows:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(list(_rows.values()), indent=1))
