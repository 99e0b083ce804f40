"""A change reaches the ext_proc and Envoy apart (the routing config, the clusters over ADS,
the routes from their file): while one has it and the other not, clients get a 503 in their
API's shape that their SDK retries, never an error about their request nor an empty body.
Each half of the race is held open here by publishing one side of a change alone."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import httpx
import openai
import pytest

from signalbox import gatewayfiles
from signalbox.core import envoygen
from signalbox.local import compile_files
from tests.factories import backend, dump, model, policy, provider

from .conftest import start_gateway

pytestmark = pytest.mark.dataplane
MESSAGE = {"messages": [{"role": "user", "content": "hi"}]}


def fleet(fakes, *policies: tuple[str, str, list[str]]) -> str:
    """Providers alpha and beta; each policy (name, strategy, its providers in order)."""
    return dump(
        provider("alpha", fakes["alpha"].url + "/v1", [model("a1")]),
        provider("beta", fakes["beta"].url + "/v1", [model("b1")]),
        *(
            policy(name, [name], [backend(p, f"{p[0]}1") for p in members], strategy=strategy)
            for name, strategy, members in policies
        ),
    )


def compiled_fleet(fakes, *more: dict) -> str:
    """Providers alpha and beta, a compiled policy over both, and `more` resources."""
    return dump(
        provider("alpha", fakes["alpha"].url + "/v1", [model("a1")]),
        provider("beta", fakes["beta"].url + "/v1", [model("b1")]),
        policy("old", ["old"], [backend("alpha", "a1"), backend("beta", "b1")], strategy="failover"),
        *more,
    )


def config_of(text: str, tmp_path):
    source = tmp_path / "next.yaml"
    source.write_text(text)
    result = compile_files([str(source)])
    assert result.config is not None, result.problems
    return result.config


def answer(gateway, alias: str, deadline_s: float = 10.0) -> httpx.Response:
    """The gateway's answer once the workers know `alias` (their config watch loads it)."""
    stop = time.monotonic() + deadline_s
    while True:
        r = httpx.post(f"{gateway.url}/chat/completions", json={"model": alias, **MESSAGE}, timeout=10)
        if r.status_code != 404 or time.monotonic() > stop:
            return r
        time.sleep(0.05)


def test_a_new_decided_policy_is_served_before_envoys_routes_name_it(fakes, tmp_path):
    """The workers loaded a config with a new decided policy; Envoy's routes are the old ones.
    A decided request's cluster comes with the decision (contract.TARGET_NS), so the new
    policy's requests are served at once when Envoy can get its chain: a brand-new alias used
    to answer 503s until its routes arrived."""
    gateway = start_gateway(tmp_path, fleet(fakes, ("old", "cost", ["alpha", "beta"])))
    try:
        newer = config_of(
            fleet(fakes, ("old", "cost", ["alpha", "beta"]), ("new", "cost", ["beta", "alpha"])), tmp_path
        )
        gatewayfiles.publish(newer, gateway.workdir, gateway.options, envoy=False)  # the workers' side only
        r = answer(gateway, "new")
        assert r.status_code == 200, r.text
        assert r.headers["x-signalbox-policy"] == "new"
    finally:
        gateway.stop()


def test_a_decision_for_a_cluster_envoy_cannot_get_yet_is_a_503_to_retry_not_a_400(fakes, tmp_path):
    """The workers loaded a config with a new decided policy over a model Envoy has no cluster
    for yet (its clusters travel with Envoy's side of the change)."""
    gateway = start_gateway(tmp_path, fleet(fakes, ("old", "cost", ["alpha", "beta"])))
    try:
        newer_text = dump(
            provider("alpha", fakes["alpha"].url + "/v1", [model("a1")]),
            provider("beta", fakes["beta"].url + "/v1", [model("b1"), model("b2")]),
            policy("old", ["old"], [backend("alpha", "a1"), backend("beta", "b1")], strategy="cost"),
            policy("new", ["new"], [backend("beta", "b2"), backend("alpha", "a1")], strategy="cost"),
        )
        newer = config_of(newer_text, tmp_path)
        gatewayfiles.publish(newer, gateway.workdir, gateway.options, envoy=False)  # the workers' side only
        r = answer(gateway, "new")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "routing_unavailable"
        assert r.headers["x-signalbox-reason"].endswith("routing_unavailable")  # after the decision's reason
        gatewayfiles.write_envoy(newer, gateway.workdir, gateway.options)  # Envoy's side follows
        with openai.OpenAI(base_url=gateway.url, api_key="x", max_retries=5) as client:
            done = client.chat.completions.with_raw_response.create(model="new", **MESSAGE)
        assert done.http_response.status_code == 200 and done.headers["x-signalbox-policy"] == "new"
    finally:
        gateway.stop()


def test_a_request_is_decided_by_the_config_whose_routes_it_arrived_under(fakes, tmp_path):
    """A decided policy moves to a backend it did not have; the worker loaded the change, and
    Envoy's routes are the old ones. The request is decided by the old config, whose routes it
    arrived under (Envoy keeps those for the whole request): the old backend answers, where the
    new config's target had no route in them (a 503 until they came). Once Envoy has the new
    routes, the new backend does."""
    gateway = start_gateway(tmp_path, fleet(fakes, ("moving", "cost", ["alpha"])), extproc_workers=1)
    try:
        newer = config_of(fleet(fakes, ("moving", "cost", ["beta"])), tmp_path)
        newer.generation = 1000
        gatewayfiles.publish(newer, gateway.workdir, gateway.options, envoy=False)  # the worker's side only
        deadline = time.monotonic() + 10
        while httpx.get(f"{gateway.admin_url}/healthz", timeout=10).json()["generation"] != newer.generation:
            assert time.monotonic() < deadline, "the worker never loaded the change"
            time.sleep(0.05)
        r = httpx.post(f"{gateway.url}/chat/completions", json={"model": "moving", **MESSAGE}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.headers["x-signalbox-provider"] == "alpha"
        gatewayfiles.write_envoy(newer, gateway.workdir, gateway.options)  # Envoy's side follows
        deadline = time.monotonic() + 10
        while r.headers.get("x-signalbox-provider") != "beta":
            assert r.status_code == 200, r.text
            assert time.monotonic() < deadline, "Envoy's new routes never served the new backend"
            time.sleep(0.05)
            r = httpx.post(f"{gateway.url}/chat/completions", json={"model": "moving", **MESSAGE}, timeout=10)
    finally:
        gateway.stop()


def test_a_route_to_a_cluster_envoy_has_not_got_yet_is_a_503_in_the_clients_shape(fakes, tmp_path):
    """Envoy read the routes of a change before its clusters arrived over ADS: the compiled
    route names a backend Envoy does not have. Envoy's own answer was a 503 with no body. (A
    new compiled policy over backends Envoy holds has no such window: its route walks their
    clusters, and no aggregate cluster of its own is needed; it is served at once.)"""

    resources = functools.partial(compiled_fleet, fakes)
    gateway = start_gateway(tmp_path, resources())
    try:
        clusters = envoygen.resource_file(str(gateway.workdir / gatewayfiles.ENVOY_DIR), "cds.json")

        def routes_only(*more: dict):
            newer = config_of(resources(*more), tmp_path)
            gatewayfiles.publish(newer, gateway.workdir, gateway.options, envoy=False)
            files = gatewayfiles.envoy_files(newer, gateway.workdir, gateway.options)
            gatewayfiles.write_envoy_files({path: data for path, data in files.items() if str(path) != clusters})
            return files

        def until_not_404(alias: str) -> httpx.Response:
            deadline = time.monotonic() + 10
            while True:  # until Envoy has read the new routes (the alias is compiled: Envoy alone)
                r = httpx.post(f"{gateway.url}/chat/completions", json={"model": alias, **MESSAGE}, timeout=10)
                if r.status_code != 404 or time.monotonic() > deadline:
                    return r
                time.sleep(0.05)

        held = policy("held", ["held"], [backend("beta", "b1"), backend("alpha", "a1")], strategy="failover")
        routes_only(held)
        r = until_not_404("held")
        assert r.status_code == 200 and r.headers["x-signalbox-provider"] == "beta", r.text
        files = routes_only(  # a provider new to the gateway (the same fake as alpha's)
            held,
            provider("gamma", fakes["alpha"].url + "/v1", [model("g1")]),
            policy("new", ["new"], [backend("gamma", "g1"), backend("alpha", "a1")], strategy="failover"),
        )
        r = until_not_404("new")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "routing_unavailable"
        gatewayfiles.write_envoy_files(files)  # the clusters arrive
        with openai.OpenAI(base_url=gateway.url, api_key="x", max_retries=5) as client:
            done = client.chat.completions.with_raw_response.create(model="new", **MESSAGE)
        assert done.headers["x-signalbox-provider"] == "gamma"
    finally:
        gateway.stop()


def test_a_change_writes_routes_only_once_envoy_holds_the_clusters_they_name(fakes, tmp_path, monkeypatch):
    """A compiled policy over a new backend: Envoy reads the routes from their file, the
    backend's cluster from the ext_proc's stream. Envoy's last cluster update (the one that
    brought it, `cluster_manager.cds.update_time`) comes before the routes file is written, so
    no request meets the window the test above holds open. Without the wait it came some
    milliseconds after."""

    resources = functools.partial(compiled_fleet, fakes)
    gateway = start_gateway(tmp_path, resources())
    admin = f"http://127.0.0.1:{gateway.admin_port}"
    try:
        assert gateway.options.endpoints_over_ads
        newer = config_of(  # a provider (the same fake as alpha's) and a policy over it: new clusters
            resources(
                provider("gamma", fakes["alpha"].url + "/v1", [model("g1")]),
                policy("new", ["new"], [backend("gamma", "g1"), backend("beta", "b1")], strategy="failover"),
            ),
            tmp_path,
        )
        added = next(b.cluster for b in newer.backends if b.provider_id == "default/gamma")
        assert f"{added}::" not in httpx.get(f"{admin}/clusters", timeout=10).text
        routes_written_ms: list[float] = []
        write = gatewayfiles.write_atomic

        def watched(path, data, mode=0o644):
            if Path(path).parent.name == "rds":
                routes_written_ms.append(time.time() * 1000)
            write(path, data, mode)

        monkeypatch.setattr(gatewayfiles, "write_atomic", watched)
        gatewayfiles.publish(newer, gateway.workdir, gateway.options)
        deadline = time.monotonic() + 10
        while f"{added}::" not in httpx.get(f"{admin}/clusters", timeout=10).text:
            assert time.monotonic() < deadline, "the backend never reached Envoy"
            time.sleep(0.05)
        stats = httpx.get(f"{admin}/stats", params={"filter": r"^cluster_manager\.cds\.update_time$"}, timeout=10)
        arrived_ms = int(stats.text.split(":")[1])
        assert len(routes_written_ms) == 1 and arrived_ms <= routes_written_ms[0]
        with openai.OpenAI(base_url=gateway.url, api_key="x", max_retries=5) as client:
            done = client.chat.completions.with_raw_response.create(model="new", **MESSAGE)
        assert done.headers["x-signalbox-provider"] == "gamma"
    finally:
        gateway.stop()


def test_a_decided_policys_chain_reaches_envoy_when_its_first_request_needs_it(fakes, tmp_path):
    """A decided policy's chains are not sent to Envoy until a request needs one (on-demand
    CDS: the 2,000-provider fleet's 7,712 chains held at once cost Envoy 182 MB and 1.6 s of its
    start), nor the backends only such chains name (4,286 of the fleet's 10,000). The first
    request waits for its chain and its backends and is served by it; its failover still works
    (the chain's first backend down, the next answers); the other chains stay out."""
    gateway = start_gateway(tmp_path, fleet(fakes, ("decided", "cost", ["alpha", "beta"])))
    admin = f"http://127.0.0.1:{gateway.admin_port}"
    try:
        cfg = gateway.config
        assert cfg is not None and gateway.options.endpoints_over_ads
        chains = {b.target for p in cfg.policies for b in p.backends}
        assert len(chains) == 2  # one per first choice
        backends = {b.cluster for b in cfg.backends}

        def held(names: set[str] = chains) -> set[str]:
            text = httpx.get(f"{admin}/clusters", timeout=10).text
            return {c for c in names if f"{c}::" in text}

        assert held() == set() and held(backends) == set()  # ready, and no chain asked for yet
        first = httpx.post(f"{gateway.url}/chat/completions", json={"model": "decided", **MESSAGE}, timeout=10)
        assert first.status_code == 200, first.text
        assert first.headers["x-signalbox-provider"] == "alpha"  # the cheaper
        (used,) = held()
        assert used.startswith("t.default.alpha.")
        assert held(backends) == backends  # the chain's members came with it
        fakes["alpha"].behave(status=503)
        again = httpx.post(f"{gateway.url}/chat/completions", json={"model": "decided", **MESSAGE}, timeout=10)
        assert again.status_code == 200, again.text
        assert again.headers["x-signalbox-provider"] == "beta"  # the chain's next member
        assert held() == {used}
    finally:
        gateway.stop()
