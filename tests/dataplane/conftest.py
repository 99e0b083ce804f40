"""Fixtures for the dataplane tier: real Envoy + ext_proc (via LocalGateway) + fake providers.

Fake providers run as separate processes (`signalbox fake-provider`, port 0) so the test's
synchronous OpenAI client never shares an event loop with them.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from signalbox.local import LocalGateway


class Fake:
    def __init__(self, ident: str, *args: str, context: ssl.SSLContext | None = None):
        """`args`: more of `signalbox fake-provider`'s (its TLS certificate); `context`: how its
        control API is reached then."""
        self.id = ident
        self.context = context
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "signalbox.cli", "fake-provider", "--id", ident, "--port", "0", *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()  # "fake-provider ID listening on http://127.0.0.1:PORT"
        if "listening on" not in line:
            raise RuntimeError(f"fake provider {ident} did not start: {line!r}")
        self.url = line.rsplit(" ", 1)[1].strip()

    def _call(self, path: str, payload: dict | None = None) -> dict:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET")
        with urllib.request.urlopen(req, timeout=5, context=self.context) as r:
            return json.loads(r.read())

    def behave(self, **behaviour) -> None:
        self._call("/_fake/behaviour", behaviour)

    def reset(self) -> None:
        self._call("/_fake/reset", {})

    def requests(self) -> list[dict]:
        return self._call("/_fake/requests")["requests"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)


def running(names: tuple[str, ...]) -> Iterator[dict[str, Fake]]:
    """Fake providers by name for a fixture's lifetime."""
    started = {name: Fake(name) for name in names}
    try:
        yield started
    finally:
        for fake in started.values():
            fake.stop()


def reset_fakes_of(request) -> None:
    """Each test starts with fresh fakes: no behaviour, fault or record left by the last one."""
    if "fakes" in request.fixturenames:
        for fake in request.getfixturevalue("fakes").values():
            fake.reset()


@pytest.fixture(scope="session")
def fakes() -> Iterator[dict[str, Fake]]:
    # flaky1/flaky2 are only ever failing primaries: Envoy's outlier detection ejects a backend
    # after a run of 5xx, and that must not leak into tests that expect alpha..gamma healthy.
    # epsilon speaks Gemini's API in the translation tests.
    yield from running(("alpha", "beta", "gamma", "delta", "epsilon", "flaky1", "flaky2"))


@pytest.fixture(autouse=True)
def _reset_fakes(request):
    reset_fakes_of(request)


# The key the SDK clients below send: the gateway's, never a provider's (tests assert it never
# reaches one).
CLIENT_TOKEN = "client-token-3e1f"


@pytest.fixture(scope="module")
def oai(gateway):
    """The official OpenAI SDK pointed at the module's `gateway`."""
    with openai.OpenAI(base_url=gateway.url, api_key=CLIENT_TOKEN, max_retries=0, timeout=20) as c:
        yield c


@pytest.fixture(scope="module")
def ant(gateway):
    """The official Anthropic SDK pointed at the module's `gateway` (at its root, as Anthropic's
    base URL is)."""
    with anthropic.Anthropic(
        base_url=gateway.url.removesuffix("/v1"), api_key=CLIENT_TOKEN, max_retries=0, timeout=20
    ) as c:
        yield c


def start_gateway(tmp_path: Path, yaml_text: str, **options) -> LocalGateway:
    config = tmp_path / "resources"
    config.mkdir(parents=True, exist_ok=True)
    (config / "resources.yaml").write_text(yaml_text)
    gateway = LocalGateway(paths=[str(config)], port=0, workdir=tmp_path / "work", start_fakes=False, **options)
    try:
        gateway.start()
    except Exception:
        gateway.stop()
        raise
    return gateway


def wait_for(predicate, timeout=10.0) -> bool:
    """Whether `predicate` came true within `timeout` seconds (asked every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def log_entries(path: Path) -> list[dict]:
    """The JSON lines Envoy has finished writing to a log it is still appending to: a last line
    without its newline is half written and left for the next read."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.startswith("{")]


def logged(gateway: LocalGateway, request_ids, event: str = "request", timeout_s: float = 10.0) -> dict[str, dict]:
    """Request id -> its `event` line of the gateway's request log, for each of `request_ids`,
    once all are written (Envoy flushes the file every second); fails after `timeout_s`."""
    wanted, log = set(request_ids), Path(gateway.workdir) / "requests.log"
    deadline = time.monotonic() + timeout_s
    while True:
        found = {
            e["request_id"]: e for e in log_entries(log) if e.get("event") == event and e.get("request_id") in wanted
        }
        if len(found) == len(wanted):
            return found
        assert time.monotonic() < deadline, (sorted(wanted - found.keys()), event)
        time.sleep(0.05)


def logs(gateway: LocalGateway) -> str:
    assert gateway.workdir
    return "\n".join(p.read_text(errors="replace") for p in Path(gateway.workdir).glob("*.log"))
