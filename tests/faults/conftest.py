"""Fixtures of the fault tier: one real gateway (Envoy + ext_proc) in front of fake providers
that misbehave on command (`signalbox.fakeprovider.Fault`), and the scorecard each case adds
its measured result to (`python -m tests.faults.scorecard` renders it into the README)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dataplane.conftest import Fake, reset_fakes_of, running

# Where the tier writes its measured rows when asked (make faults-scorecard sets it).
SCORECARD_ENV = "SIGNALBOX_FAULTS_SCORECARD"
_rows: dict[str, dict] = {}


@pytest.fixture(scope="session")
def fakes() -> Iterator[dict[str, Fake]]:
    # "brittle" only ever fails: Envoy ejects it, which must not touch the other cases' primary.
    yield from running(("primary", "second", "brittle"))


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
