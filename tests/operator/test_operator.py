"""The operator against an emulated Kubernetes API: ConfigMap, conditions, Events, health."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from signalbox.configsync import ConfigSync
from signalbox.core import envoygen
from signalbox.core.envoygen import GatewayOptions
from signalbox.extproc.reload import TableHolder
from signalbox.gatewayfiles import CONFIG_FILE
from signalbox.operator.kube import api_client
from signalbox.operator.reconciler import OperatorConfig
from tests.factories import backend, model, policy, provider

from .conftest import CM_NAME, CM_NAMESPACE

API_KEY = "sk-operator-test-5ecret"


def two_providers():
    return [
        provider("alpha", "http://127.0.0.1:9001/v1", [model("a1"), model("a2")]),
        provider("beta", "http://127.0.0.1:9002/v1", [model("b1")]),
    ]


async def ready(cluster, kind, name):
    c = await cluster.condition(kind, name, "Ready")
    return c if c and c["status"] == "True" else None


async def test_providers_and_policies_become_a_configmap_with_conditions(cluster, start_operator):
    await start_operator()
    for obj in two_providers():
        await cluster.apply(obj)
    await cluster.apply(policy("auto", ["auto"], [backend("alpha", "a1"), backend("beta", "b1", priority=1)]))
    cm = await cluster.eventually(cluster.configmap)
    config = cm["config"]
    assert [p["name"] for p in config["policies"]] == ["auto"]
    assert {b["id"] for b in config["backends"]} == {"default/alpha/a1", "default/alpha/a2", "default/beta/b1"}
    assert int(cm["annotations"]["signalbox.io/generation"]) >= 1
    c = await cluster.eventually(lambda: ready(cluster, "RoutingPolicy", "auto"))
    assert c["observedGeneration"] == 1 and "generation" in c["message"]
    status = await cluster.status("RoutingPolicy", "auto")
    assert status["backends"] == 2
    accepted = {c["type"]: c["status"] for c in status["conditions"]}
    assert accepted == {"Accepted": "True", "ResolvedRefs": "True", "Ready": "True"}
    assert await cluster.eventually(lambda: ready(cluster, "AIProvider", "alpha"))


async def test_invalid_policy_is_refused_and_the_configmap_stays(cluster, start_operator):
    await start_operator()
    for obj in two_providers():
        await cluster.apply(obj)
    await cluster.apply(policy("auto", ["auto"], [backend("alpha", "a1")]))
    await cluster.eventually(lambda: ready(cluster, "RoutingPolicy", "auto"))
    before = await cluster.configmap()

    bad = policy("auto", ["auto"], [backend("alpha", "a1", weight=-3)])
    await cluster.apply(bad)

    async def refused():
        c = await cluster.condition("RoutingPolicy", "auto", "Accepted")
        return c if c and c["status"] == "False" else None

    c = await cluster.eventually(refused)
    assert c["reason"] == "Invalid" and "spec.backends[0].weight" in c["message"] and c["observedGeneration"] == 2
    ready_now = await cluster.condition("RoutingPolicy", "auto", "Ready")
    assert ready_now["status"] == "False"
    # Conditions are written after the publish decision of the same round: generation 2 was
    # compiled and refused, so there is nothing left to wait for.
    assert await cluster.configmap() == before  # the last good config stays in force

    events = await cluster.eventually(lambda: _events_for(cluster, "auto", "Invalid"))
    assert events[0]["type"] == "Warning" and "spec.backends[0].weight" in events[0]["message"]


async def _events_for(cluster, name, reason):
    return [e for e in await cluster.events() if e["involved_object"]["name"] == name and e["reason"] == reason]


async def test_deleting_a_provider_unresolves_dependent_policies(cluster, start_operator):
    await start_operator()
    for obj in two_providers():
        await cluster.apply(obj)
    await cluster.apply(policy("uses-beta", ["b"], [backend("beta", "b1")]))
    await cluster.apply(policy("alpha-only", ["a"], [backend("alpha", "a1")]))
    await cluster.eventually(lambda: ready(cluster, "RoutingPolicy", "uses-beta"))
    before = await cluster.configmap()

    await cluster.delete("AIProvider", "beta")

    async def unresolved():
        c = await cluster.condition("RoutingPolicy", "uses-beta", "ResolvedRefs")
        return c if c and c["status"] == "False" else None

    c = await cluster.eventually(unresolved)
    assert c["reason"] == "RefNotFound" and "AIProvider default/beta not found" in c["message"]
    assert (await cluster.condition("RoutingPolicy", "alpha-only", "ResolvedRefs"))["status"] == "True"

    async def blocked():
        c = await cluster.condition("RoutingPolicy", "alpha-only", "Ready")
        return c if c and c["reason"] == "ConfigNotPublished" else None

    c = await cluster.eventually(blocked)  # valid itself, but the config it is in cannot be published
    assert "uses-beta" in c["message"]
    assert await cluster.configmap() == before


async def test_missing_secret_is_reported_and_its_value_never_leaks(cluster, start_operator, fake, caplog):
    caplog.set_level(logging.DEBUG)
    fake.behaviour.api_key = API_KEY
    await start_operator(
        OperatorConfig(configmap_namespace=CM_NAMESPACE, configmap_name=CM_NAME, debounce_seconds=0.05, probes=True)
    )
    keyed = provider(
        "keyed",
        fake.url + "/v1",
        [model("m")],
        auth={"secretRef": {"name": "keyed-key", "key": "apiKey"}},
        healthCheck={"intervalSeconds": 1, "failureThreshold": 1, "recoveryThreshold": 1},
    )
    await cluster.apply(keyed)
    await cluster.apply(policy("auto", ["auto"], [backend("keyed", "m")]))

    async def unresolved():
        c = await cluster.condition("AIProvider", "keyed", "ResolvedRefs")
        return c if c and c["status"] == "False" else None

    c = await cluster.eventually(unresolved)
    assert "Secret default/keyed-key with key 'apiKey' not found" in c["message"]

    await cluster.secret("keyed-key", {"apiKey": API_KEY})
    await cluster.apply({**keyed, "spec": {**keyed["spec"], "connectTimeoutMs": 1500}})  # a change triggers resync
    await cluster.eventually(lambda: ready(cluster, "RoutingPolicy", "auto"))

    async def probed_with_key():
        # The fake answers 401 without the right key: HTTP 200 proves the Secret's value was used.
        health = (await cluster.status("AIProvider", "keyed")).get("health") or {}
        return health.get("message") == "HTTP 200"

    await cluster.eventually(probed_with_key)
    # Where the key must never appear: status, ConfigMap, Events, logs.
    everything = json.dumps(
        [
            await cluster.status("AIProvider", "keyed"),
            await cluster.status("RoutingPolicy", "auto"),
            await cluster.configmap(),
            await cluster.events(),
        ],
        default=str,
    )
    assert API_KEY not in everything
    assert API_KEY not in caplog.text
    assert "keyed-key" in json.dumps(await cluster.configmap())  # named, not copied


async def test_health_moves_only_after_thresholds_with_events(cluster, start_operator, fake):
    await start_operator(
        OperatorConfig(configmap_namespace=CM_NAMESPACE, configmap_name=CM_NAME, debounce_seconds=0.05, probes=True)
    )
    await cluster.apply(
        provider(
            "flappy",
            fake.url + "/v1",
            [model("m")],
            healthCheck={"intervalSeconds": 1, "failureThreshold": 2, "recoveryThreshold": 2},
        )
    )
    await cluster.apply(policy("auto", ["auto"], [backend("flappy", "m")]))

    async def health():
        return (await cluster.status("AIProvider", "flappy")).get("health")

    first = await cluster.eventually(health)
    assert first["healthy"] is True and first["message"] == "HTTP 200"

    fake.behaviour.status = 500
    one_failure = await cluster.eventually(lambda: _health_where(cluster, failures=1))
    assert one_failure["healthy"] is True  # one failure is below the threshold of 2
    down = await cluster.eventually(lambda: _health_where(cluster, healthy=False), timeout=6)
    assert down["consecutiveFailures"] == 2

    # The reconciler, the one writer of conditions, turns status.health into Healthy.
    async def healthy_condition_false():
        c = await cluster.condition("AIProvider", "flappy", "Healthy")
        return c if c and c["status"] == "False" else None

    assert (await cluster.eventually(healthy_condition_false))["reason"] == "ProbeFailed"
    assert await cluster.eventually(lambda: _events_for(cluster, "flappy", "Unhealthy"))

    async def unrouted():
        cm = await cluster.configmap()
        return cm if not cm["config"]["policies"][0]["backends"][0].get("target") else None

    await cluster.eventually(unrouted)  # the compiled config carries health: no target any more

    async def no_backends():
        return (await cluster.status("RoutingPolicy", "auto")).get("backends") == 0

    await cluster.eventually(no_backends)

    fake.behaviour.status = 200
    one_success = await cluster.eventually(lambda: _health_where(cluster, successes=1), timeout=6)
    assert one_success["healthy"] is False
    await cluster.eventually(lambda: _health_where(cluster, healthy=True), timeout=6)
    assert await cluster.eventually(lambda: _events_for(cluster, "flappy", "Healthy"))


async def _health_where(cluster, healthy=None, failures=None, successes=None):
    h = (await cluster.status("AIProvider", "flappy")).get("health") or {}
    if healthy is not None and h.get("healthy") is not healthy:
        return None
    if failures is not None and h.get("consecutiveFailures") != failures:
        return None
    if successes is not None and h.get("consecutiveSuccesses") != successes:
        return None
    return h


async def test_spec_change_reaches_the_gateway_files_and_the_extproc(cluster, start_operator, k8s, tmp_path: Path):
    await start_operator()
    for obj in two_providers():
        await cluster.apply(obj)
    await cluster.apply(policy("auto", ["auto"], [backend("alpha", "a1")]))
    await cluster.eventually(cluster.configmap)

    sync = ConfigSync(
        api_client(str(k8s.url)),
        CM_NAMESPACE,
        CM_NAME,
        tmp_path,
        GatewayOptions(extproc_sockets=(str(tmp_path / "x.sock"),)),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(sync.run(stop))
    holder = TableHolder()
    config_file = tmp_path / CONFIG_FILE
    watcher = asyncio.create_task(holder.watch(config_file, stop))
    try:
        await cluster.eventually(lambda: _aliases(holder, ["auto"]))

        # The routing config is written before Envoy's files (gatewayfiles), so the ext_proc can
        # have it a moment before they exist (seen on a busy machine).
        async def envoy_files() -> bool:
            return all(Path(envoygen.resource_file(f"{tmp_path}/envoy", n)).exists() for n in envoygen.RESOURCE_FILES)

        await cluster.eventually(envoy_files)

        changed_at = time.monotonic()
        await cluster.apply(policy("auto", ["auto", "fast"], [backend("alpha", "a1")]))
        cm = await cluster.eventually(lambda: _configmap_with_alias(cluster, "fast"))
        configmap_at = time.monotonic()
        await cluster.eventually(lambda: _aliases(holder, ["auto", "fast"]))
        extproc_at = time.monotonic()
        print(
            f"spec change -> ConfigMap {configmap_at - changed_at:.2f}s, "
            f"-> ext_proc table {extproc_at - changed_at:.2f}s (generation {cm['config']['generation']})"
        )
        assert holder.current.generation == int(cm["config"]["generation"])
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        watcher.cancel()


async def _aliases(holder, expected):
    return holder.current.aliases == expected


async def _configmap_with_alias(cluster, alias):
    cm = await cluster.configmap()
    return cm if cm and any(alias in p.get("aliases", []) for p in cm["config"]["policies"]) else None


async def test_namespaced_mode_sees_only_its_namespaces(cluster, start_operator):
    await cluster.apply(provider("p", "http://127.0.0.1:9002/v1", [model("m")], namespace="team-b"))
    await cluster.apply(policy("theirs", ["theirs"], [backend("p", "m")], namespace="team-b"))
    await cluster.apply(provider("p", "http://127.0.0.1:9001/v1", [model("m")], namespace="team-a"))
    await cluster.apply(policy("mine", ["mine"], [backend("p", "m")], namespace="team-a"))
    # Started after everything exists: kopf lists all it watches into the indexes before the
    # first compile, so the first published config is the whole (namespaced) world; no waiting
    # in the hope that a wrongly watched namespace would have shown up by now.
    await start_operator(namespaces=("team-a",))

    async def served():
        cm = await cluster.configmap()
        return cm if cm and cm["config"].get("policies") else None

    cm = await cluster.eventually(served)
    assert [p["id"] for p in cm["config"]["policies"]] == ["team-a/mine"]
    assert await cluster.status("RoutingPolicy", "theirs", namespace="team-b") == {}


async def test_the_first_published_config_holds_every_object_that_existed_at_start(cluster, start_operator):
    """kopf's indexes are complete before the first compile: an operator (re)started on a large
    cluster never publishes a config that lacks the objects its listing had not reached yet."""
    n = 40
    for i in range(n):
        await cluster.apply(provider(f"p{i}", f"http://127.0.0.1:{9000 + i}/v1", [model("m")]))
        await cluster.apply(policy(f"r{i}", [f"alias-{i}"], [backend(f"p{i}", "m")]))
    await start_operator(
        OperatorConfig(configmap_namespace=CM_NAMESPACE, configmap_name=CM_NAME, debounce_seconds=0.0, probes=False)
    )
    cm = await cluster.eventually(cluster.configmap)
    assert cm["annotations"]["signalbox.io/generation"] == "1"
    assert len(cm["config"]["policies"]) == n and len(cm["config"]["providers"]) == n


async def test_probes_and_the_reconciler_never_overwrite_each_others_conditions(cluster, start_operator, fake):
    await start_operator(
        OperatorConfig(configmap_namespace=CM_NAMESPACE, configmap_name=CM_NAME, debounce_seconds=0.05, probes=True)
    )
    await cluster.apply(provider("both", fake.url + "/v1", [model("m")], healthCheck={"intervalSeconds": 1}))
    await cluster.apply(policy("auto", ["auto"], [backend("both", "m")]))

    async def all_four():
        status = await cluster.status("AIProvider", "both")
        types = {c["type"] for c in status.get("conditions", [])}
        return status if {"Accepted", "ResolvedRefs", "Ready", "Healthy"} <= types else None

    await cluster.eventually(all_four)
    fake.behaviour.status = 500  # flips health (threshold 3 by default), probes keep writing
    await cluster.eventually(lambda: _health_where_named(cluster, "both", healthy=False), timeout=8)
    status = await cluster.eventually(all_four)
    assert {c["type"]: c["status"] for c in status["conditions"]}["Accepted"] == "True"


async def _health_where_named(cluster, name, healthy):
    h = (await cluster.status("AIProvider", name)).get("health") or {}
    return h if h.get("healthy") is healthy else None
