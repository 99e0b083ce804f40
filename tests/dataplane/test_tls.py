"""Providers over TLS through a real Envoy (issue 12's ADS endpoints keep the host name for
SNI and certificate checks): the chain is verified against the configured CA bundle and the
certificate must name the provider's host; a certificate for another name, or from a CA the
gateway does not trust, gets nothing sent."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest
import trustme

from signalbox import gatewayfiles
from tests.dataplane.conftest import Fake, start_gateway
from tests.factories import backend, dump, model, policy, provider

BODY = {"messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """A test CA, a certificate for localhost from it, and one for another name from it."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(folder / "ca.pem")
    for name, names in (("good", ("localhost", "127.0.0.1")), ("other", ("elsewhere.example",))):
        issued = ca.issue_cert(*names)
        issued.private_key_pem.write_to_path(folder / f"{name}.key")
        (folder / f"{name}.pem").write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return {"ca": folder / "ca.pem", "good": folder / "good.pem", "other": folder / "other.pem"}


def tls_arguments(chain: Path) -> tuple[str, ...]:
    return ("--tls-cert", str(chain), "--tls-key", str(chain.with_suffix(".key")))


@pytest.fixture(scope="module")
def tls_fakes(certs):
    trusting = ssl.create_default_context(cafile=str(certs["ca"]))
    lenient = ssl.create_default_context(cafile=str(certs["ca"]))
    lenient.check_hostname = False  # the impostor's name is not 127.0.0.1: only the test's own calls
    fakes = {
        "secure": Fake("secure", *tls_arguments(certs["good"]), context=trusting),
        "impostor": Fake("impostor", *tls_arguments(certs["other"]), context=lenient),
    }
    yield fakes
    for fake in fakes.values():
        fake.stop()


def resources(fakes) -> str:
    def https(fake: Fake) -> str:
        return f"https://localhost:{fake.url.rsplit(':', 1)[1]}/v1"

    return dump(
        provider("secure", https(fakes["secure"]), [model("m")]),
        provider("impostor", https(fakes["impostor"]), [model("m")]),
        policy("compiled", ["secure"], [backend("secure", "m")]),
        policy("decided", ["secure-decided"], [backend("secure", "m")], strategy="cost"),
        policy("impostor", ["impostor"], [backend("impostor", "m")]),
    )


def ask(gateway, alias: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/chat/completions", json={**BODY, "model": alias}, timeout=20)


def test_a_tls_provider_is_reached_with_its_name_and_a_verified_certificate(tls_fakes, certs, tmp_path):
    gateway = start_gateway(tmp_path, resources(tls_fakes), upstream_ca_file=str(certs["ca"]))
    try:
        for alias in ("secure", "secure-decided"):
            r = ask(gateway, alias)
            assert r.status_code == 200, r.text
            assert r.headers["x-signalbox-provider"] == "secure"
        seen = tls_fakes["secure"].requests()
        assert len(seen) == 2
        port = tls_fakes["secure"].url.rsplit(":", 1)[1]
        assert {s["headers"].get("Host") for s in seen} == {f"localhost:{port}"}
        # A certificate from the trusted CA for another name: nothing is sent to that server.
        r = ask(gateway, "impostor")
        assert r.status_code >= 500 and r.json()["error"]
        assert tls_fakes["impostor"].requests() == []
    finally:
        gateway.stop()


def test_a_certificate_from_a_ca_the_gateway_does_not_trust_gets_nothing(tls_fakes, tmp_path):
    tls_fakes["secure"].reset()
    gateway = start_gateway(tmp_path, resources(tls_fakes))  # the system's CAs only
    try:
        r = ask(gateway, "secure")
        assert r.status_code >= 500 and r.json()["error"]
        assert tls_fakes["secure"].requests() == []
    finally:
        gateway.stop()


@pytest.mark.parametrize("failure_mode", ["closed", "open"])
def test_the_backends_of_one_tls_endpoint_share_one_tls_context(tls_fakes, certs, tmp_path, failure_mode):
    """Three models of one provider and a second provider on the same host reach it through
    one origin (envoygen.origins): Envoy holds one TLS context for them, where it held one per
    backend (about 290 KB each with the system CA bundle), and each request, streamed or not,
    still arrives with the provider's name and its own model."""
    tls_fakes["secure"].reset()
    url = f"https://localhost:{tls_fakes['secure'].url.rsplit(':', 1)[1]}/v1"
    resources = dump(
        provider("one", url, [model("m1"), model("m2"), model("m3")]),
        provider("two", url, [model("m1")]),
        *(
            policy(f"p-{p}-{m}", [f"{p}-{m}"], [backend(p, m)])
            for p, m in (("one", "m1"), ("one", "m2"), ("one", "m3"), ("two", "m1"))
        ),
    )
    # Failing open, the backends' endpoints are in their clusters; else they come over ADS.
    gateway = start_gateway(tmp_path, resources, upstream_ca_file=str(certs["ca"]), failure_mode=failure_mode)
    try:
        for alias in ("one-m1", "one-m2", "one-m3", "two-m1"):
            assert ask(gateway, alias).status_code == 200
        with httpx.stream(
            "POST", f"{gateway.url}/chat/completions", json={**BODY, "model": "one-m2", "stream": True}, timeout=20
        ) as streamed:
            assert streamed.status_code == 200
            assert "data: [DONE]" in "".join(streamed.iter_text())
        seen = tls_fakes["secure"].requests()
        assert sorted(s["body"]["model"] for s in seen) == ["m1", "m1", "m2", "m2", "m3"]
        contexts = httpx.get(f"http://127.0.0.1:{gateway.admin_port}/certs", timeout=10).json()["certificates"]
        trusting = [c for c in contexts if any(ca["path"] == str(certs["ca"]) for ca in c.get("ca_cert", []))]
        assert len(trusting) == 1, contexts
    finally:
        gateway.stop()


def test_a_tls_endpoint_that_cannot_be_reached_fails_over_to_the_next_backend(tls_fakes, certs, tmp_path):
    """The origin's failed connect reaches the backend as a reset before any response: the
    chain goes on to its next backend, as it did when the backend's own cluster failed to
    connect."""
    tls_fakes["secure"].reset()
    with socket.socket() as placeholder:  # a port nothing listens on
        placeholder.bind(("127.0.0.1", 0))
        closed = placeholder.getsockname()[1]
    url = f"https://localhost:{tls_fakes['secure'].url.rsplit(':', 1)[1]}/v1"
    resources = dump(
        provider("down", f"https://localhost:{closed}/v1", [model("m")]),
        provider("up", url, [model("m")]),
        policy("chain", ["chain"], [backend("down", "m"), backend("up", "m", priority=1)], strategy="failover"),
    )
    gateway = start_gateway(tmp_path, resources, upstream_ca_file=str(certs["ca"]))
    try:
        r = ask(gateway, "chain")
        assert r.status_code == 200, r.text
        assert r.headers["x-signalbox-provider"] == "up"
        assert len(tls_fakes["secure"].requests()) == 1
    finally:
        gateway.stop()


def test_a_tls_provider_moved_to_another_endpoint_is_reached_there(tls_fakes, certs, tmp_path):
    """A provider's new port is a new origin: its listener and TLS cluster arrive, its backends'
    endpoints (over ADS) move to it, and requests reach the new server, verified as before,
    with nothing sent to the old one after the move."""
    moved = Fake("moved", *tls_arguments(certs["good"]), context=ssl.create_default_context(cafile=str(certs["ca"])))
    tls_fakes["secure"].reset()

    def resources(fake: Fake) -> str:
        url = f"https://localhost:{fake.url.rsplit(':', 1)[1]}/v1"
        return dump(
            provider("p", url, [model("m1"), model("m2")]),
            policy("one", ["one"], [backend("p", "m1"), backend("p", "m2", priority=1)], strategy="failover"),
        )

    gateway = start_gateway(tmp_path, resources(tls_fakes["secure"]), upstream_ca_file=str(certs["ca"]))
    try:
        assert ask(gateway, "one").status_code == 200
        assert len(tls_fakes["secure"].requests()) == 1
        (Path(gateway.paths[0]) / "resources.yaml").write_text(resources(moved))
        assert gateway.apply().ok
        deadline = time.monotonic() + 10
        while not moved.requests() and time.monotonic() < deadline:
            assert ask(gateway, "one").status_code == 200  # served throughout, by one or the other
        assert moved.requests(), "no request reached the provider's new endpoint"
        before = len(tls_fakes["secure"].requests())
        for _ in range(5):
            assert ask(gateway, "one").status_code == 200
        assert len(tls_fakes["secure"].requests()) == before
        assert [r["body"]["model"] for r in moved.requests()][-5:] == ["m1"] * 5
        # The old endpoint's origin is gone from what Envoy reads; the new one's is there.
        listeners = gatewayfiles.read_envoy_file(gateway.workdir / gatewayfiles.ENVOY_DIR, "lds.json")["resources"]
        (origin,) = [item["name"] for item in listeners if "internal_listener" in item]
        assert f".{moved.url.rsplit(':', 1)[1]}." in origin
    finally:
        gateway.stop()
        moved.stop()
