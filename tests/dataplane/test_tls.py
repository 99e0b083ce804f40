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
from signalbox.core import envoygen
from signalbox.core.envoygen.endpoints import ORIGIN_MIN_BACKENDS
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


def trusting(gateway, ca: Path) -> int:
    """How many TLS contexts Envoy holds that trust `ca`: one per TLS cluster verifying with it."""
    contexts = httpx.get(f"http://127.0.0.1:{gateway.admin_port}/certs", timeout=10).json()["certificates"]
    return sum(any(c["path"] == str(ca) for c in context.get("ca_cert", [])) for context in contexts)


def https(fake: Fake) -> str:
    return f"https://localhost:{fake.url.rsplit(':', 1)[1]}/v1"


MODELS = [f"m{i}" for i in range(ORIGIN_MIN_BACKENDS)]


@pytest.mark.parametrize("failure_mode", ["closed", "open"])
def test_the_many_backends_of_one_tls_endpoint_share_one_tls_context(tls_fakes, certs, tmp_path, failure_mode):
    """The models of one provider and a second provider on the same host, ORIGIN_MIN_BACKENDS
    backends in all, reach it through one origin (envoygen.origins): Envoy holds one TLS context
    for them, where it held one per backend (about 265 KB each with the system CA bundle), and
    each request, streamed or not, still arrives verified and with its own model."""
    tls_fakes["secure"].reset()
    url = https(tls_fakes["secure"])
    resources = dump(
        provider("one", url, [model(m) for m in MODELS[:-1]]),
        provider("two", url, [model("m0")]),
        *(
            policy(f"p-{p}-{m}", [f"{p}-{m}"], [backend(p, m)])
            for p, m in (("one", "m0"), ("one", "m1"), ("two", "m0"))
        ),
    )
    # Failing open, the backends' endpoints are in their clusters; else they come over ADS.
    gateway = start_gateway(tmp_path, resources, upstream_ca_file=str(certs["ca"]), failure_mode=failure_mode)
    try:
        for alias in ("one-m0", "one-m1", "two-m0"):
            assert ask(gateway, alias).status_code == 200
        with httpx.stream(
            "POST", f"{gateway.url}/chat/completions", json={**BODY, "model": "one-m1", "stream": True}, timeout=20
        ) as streamed:
            assert streamed.status_code == 200
            assert "data: [DONE]" in "".join(streamed.iter_text())
        seen = tls_fakes["secure"].requests()
        assert sorted(s["body"]["model"] for s in seen) == ["m0", "m0", "m1", "m1"]
        assert trusting(gateway, certs["ca"]) == 1
    finally:
        gateway.stop()


def test_a_tls_endpoint_that_cannot_be_reached_fails_over_to_the_next_backend(tls_fakes, certs, tmp_path):
    """A connect that fails, at a backend's own TLS cluster or at its origin's (which reaches
    the backend as a reset before any response), sends the chain on to its next backend."""
    tls_fakes["secure"].reset()
    with socket.socket() as placeholder:  # a port nothing listens on
        placeholder.bind(("127.0.0.1", 0))
        closed = placeholder.getsockname()[1]
    resources = dump(
        provider("down", f"https://localhost:{closed}/v1", [model(m) for m in MODELS]),  # through its origin
        provider("lone", f"https://localhost:{closed}/v1", [model("m")], connectTimeoutMs=1000),  # its own TLS
        provider("up", https(tls_fakes["secure"]), [model("m")]),
        policy("chain", ["chain"], [backend("down", "m0"), backend("up", "m", priority=1)], strategy="failover"),
        policy("lone", ["lone"], [backend("lone", "m"), backend("up", "m", priority=1)], strategy="failover"),
    )
    gateway = start_gateway(tmp_path, resources, upstream_ca_file=str(certs["ca"]))
    try:
        for alias in ("chain", "lone"):
            r = ask(gateway, alias)
            assert r.status_code == 200, r.text
            assert r.headers["x-signalbox-provider"] == "up"
        assert len(tls_fakes["secure"].requests()) == 2
    finally:
        gateway.stop()


@pytest.mark.parametrize("models", [2, ORIGIN_MIN_BACKENDS], ids=["own-tls", "origin"])
def test_a_tls_provider_moved_to_another_endpoint_is_reached_there(tls_fakes, certs, tmp_path, models):
    """A provider's new port: its backends' TLS clusters, or its new origin (listener and TLS
    cluster, the backends' endpoints over ADS), reach the new server, verified as before; every
    request is answered during the move, and nothing goes to the old server after it."""
    moved = Fake("moved", *tls_arguments(certs["good"]), context=ssl.create_default_context(cafile=str(certs["ca"])))
    tls_fakes["secure"].reset()

    def resources(fake: Fake) -> str:
        return dump(
            provider("p", https(fake), [model(m) for m in MODELS[:models]]),
            policy("one", ["one"], [backend("p", "m0"), backend("p", "m1", priority=1)], strategy="failover"),
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
        assert [r["body"]["model"] for r in moved.requests()][-5:] == ["m0"] * 5
        listeners = gatewayfiles.read_envoy_file(gateway.workdir / gatewayfiles.ENVOY_DIR, "lds.json")["resources"]
        internal = [item["name"] for item in listeners if "internal_listener" in item]
        origins = [name for name in internal if name != envoygen.contract.RESTING_LISTENER]
        if models >= ORIGIN_MIN_BACKENDS:  # the old endpoint's origin is gone; the new one's is there
            (origin,) = origins
            assert f".{moved.url.rsplit(':', 1)[1]}." in origin
        else:
            assert origins == []
    finally:
        gateway.stop()
        moved.stop()


def test_a_provider_crossing_over_to_its_origin_keeps_serving_verified(tls_fakes, certs, tmp_path):
    """One model more takes a provider's endpoint to ORIGIN_MIN_BACKENDS backends: its backends
    become plain clusters to the new origin while requests flow. Every request is answered
    (a plain cluster given the provider's TLS port would fail them, and send them in clear
    text), and Envoy ends with one TLS context for the endpoint instead of one per backend."""
    tls_fakes["secure"].reset()

    def resources(models: int) -> str:
        return dump(
            provider("p", https(tls_fakes["secure"]), [model(m) for m in MODELS[:models]]),
            policy("one", ["one"], [backend("p", "m0"), backend("p", "m1", priority=1)], strategy="failover"),
        )

    gateway = start_gateway(tmp_path, resources(ORIGIN_MIN_BACKENDS - 1), upstream_ca_file=str(certs["ca"]))
    try:
        assert ask(gateway, "one").status_code == 200
        # One per backend Envoy holds: the two the policy routes to (a model no policy names
        # has no cluster in Envoy: xds.Endpoints.eager_backends).
        assert trusting(gateway, certs["ca"]) == 2
        (Path(gateway.paths[0]) / "resources.yaml").write_text(resources(ORIGIN_MIN_BACKENDS))
        assert gateway.apply().ok
        deadline = time.monotonic() + 15
        while trusting(gateway, certs["ca"]) != 1 and time.monotonic() < deadline:
            assert ask(gateway, "one").status_code == 200  # served throughout
        assert trusting(gateway, certs["ca"]) == 1
        for _ in range(5):
            assert ask(gateway, "one").status_code == 200
        assert [r["body"]["model"] for r in tls_fakes["secure"].requests()][-5:] == ["m0"] * 5
    finally:
        gateway.stop()
