"""Consumers in the operator (kmock's emulated API server): it makes each consumer's gateway key
in a Secret, rotates it with a grace period, notices a revoked Secret, and publishes only the
keys' hashes; the key appears nowhere but its Secret."""

from __future__ import annotations

import asyncio
import base64
import json
import time

from signalbox.core.keys import key_hash
from tests.factories import backend, consumer, model, policy, provider

SECRET = "team-a-api-key"


async def secret_data(cluster, name: str = SECRET) -> dict[str, str] | None:
    found = await cluster.api.secret_with_annotations("default", name)
    if found is None:
        return None
    return {k: v.reveal() for k, v in found[0].items()}


async def published_keys(cluster) -> list[dict]:
    cm = await cluster.configmap()
    if cm is None:
        return []
    return [k for c in cm["config"].get("consumers", []) if c["id"] == "default/team-a" for k in c.get("keys", [])]


async def test_keys_are_made_rotated_and_revoked_through_their_secret(cluster, start_operator):
    await start_operator()
    await cluster.apply(provider("alpha", "http://127.0.0.1:9001/v1", [model("m")]))
    await cluster.apply(policy("chat", ["chat"], [backend("alpha", "m")]))
    await cluster.apply(consumer("team-a", team="payments", apiKey={}, limits={"requestsPerMinute": 10}))

    # Made: a Secret owned by the consumer, its hash published, status and an Event.
    first = (await cluster.eventually(lambda: secret_data(cluster)))["api-key"]
    assert first.startswith("sbx-") and len(first) > 40
    raw = await asyncio.to_thread(cluster.api.core.read_namespaced_secret, SECRET, "default")
    assert raw.metadata.owner_references[0].kind == "Consumer"
    assert raw.metadata.labels["signalbox.io/consumer"] == "team-a"
    keys = await cluster.eventually(lambda: published_keys(cluster))
    assert keys == [{"sha256": key_hash(first)}]
    status = await cluster.eventually(lambda: _with(cluster, "keySecret"))
    assert status["keySecret"] == SECRET
    accepted = await cluster.condition("Consumer", "team-a", "Accepted")
    assert accepted and accepted["status"] == "True"

    # Rotated: a new key, the old one valid for the grace period.
    await cluster.apply(
        consumer(
            "team-a",
            team="payments",
            apiKey={"rotation": "2026-11", "gracePeriodSeconds": 600},
            limits={"requestsPerMinute": 10},
        )
    )

    async def rotated():
        data = await secret_data(cluster)
        return data if data and data.get("previous-api-key") == first else None

    data = await cluster.eventually(rotated)
    second = data["api-key"]
    assert second != first
    keys = await cluster.eventually(lambda: _when(published_keys(cluster), lambda k: len(k) == 2))
    by_hash = {k["sha256"]: int(k.get("expiresUnix", 0)) for k in keys}
    assert by_hash[key_hash(second)] == 0 and 590 < by_hash[key_hash(first)] - time.time() <= 600
    status = await cluster.eventually(lambda: _with(cluster, "previousKeyExpires"))
    assert status["keyRotation"] == "2026-11"

    # Revoked: the Secret deleted by hand. Both keys stop working: a new one is made at once.
    started = time.monotonic()
    await asyncio.to_thread(cluster.api.core.delete_namespaced_secret, SECRET, "default")
    keys = await cluster.eventually(
        lambda: _when(published_keys(cluster), lambda k: k and key_hash(second) not in {x["sha256"] for x in k})
    )
    revoked_in = time.monotonic() - started
    print(f"revoked through the operator in {revoked_in:.2f} s")
    third = (await secret_data(cluster))["api-key"]
    assert keys == [{"sha256": key_hash(third)}] and third not in (first, second)
    assert revoked_in < 5, revoked_in

    reasons = [e["reason"] for e in await cluster.events() if e["involved_object"]["kind"] == "Consumer"]
    assert reasons.count("KeyGenerated") == 2 and reasons.count("KeyRotated") == 1
    # No key in the published config, the consumer's status or any Event.
    cm = await cluster.configmap()
    seen = json.dumps(cm) + json.dumps(await cluster.status("Consumer", "team-a")) + str(await cluster.events())
    for key in (first, second, third):
        assert key not in seen and base64.b64encode(key.encode()).decode() not in seen


async def test_a_consumer_naming_an_unknown_alias_is_not_accepted_and_the_config_stays(cluster, start_operator):
    await start_operator()
    await cluster.apply(provider("alpha", "http://127.0.0.1:9001/v1", [model("m")]))
    await cluster.apply(policy("chat", ["chat"], [backend("alpha", "m")]))
    before = await cluster.eventually(cluster.configmap)
    await cluster.apply(consumer("team-x", apiKey={}, models=["nope"]))

    async def refused():
        c = await cluster.condition("Consumer", "team-x", "ResolvedRefs")
        return c if c and c["status"] == "False" else None

    condition = await cluster.eventually(refused)
    assert "no RoutingPolicy serves alias 'nope'" in condition["message"]
    assert (await cluster.configmap())["config"] == before["config"]


async def _with(cluster, field: str):
    status = await cluster.status("Consumer", "team-a")
    return status if field in status else None


async def _when(awaitable, predicate):
    value = await awaitable
    return value if predicate(value) else None


async def test_a_budgeted_consumer_shows_its_spend_from_the_gateways_limit_store(cluster, start_operator, tmp_path):
    """The gateways charge spend into Redis; the operator reads it into status.spend, which
    `kubectl get consumers` shows as Spent and Remaining."""
    from signalbox.extproc.limits import Charge
    from signalbox.extproc.redislimits import RedisLimits
    from signalbox.operator.reconciler import OperatorConfig
    from tests.redis_server import RedisServer

    from .conftest import CM_NAME, CM_NAMESPACE

    server = RedisServer(tmp_path).start()
    try:
        await start_operator(
            OperatorConfig(
                configmap_namespace=CM_NAMESPACE,
                configmap_name=CM_NAME,
                debounce_seconds=0.05,
                probes=False,
                budget_status_seconds=0.2,
                redis_url=server.url,
            )
        )
        await cluster.apply(provider("alpha", "http://127.0.0.1:9001/v1", [model("m")]))
        await cluster.apply(policy("chat", ["chat"], [backend("alpha", "m")]))
        await cluster.apply(consumer("team-a", apiKey={}, limits={"budget": {"dailyUsd": 2.0, "monthlyUsd": 100}}))
        gateway = RedisLimits(server.url)
        await gateway.settle("r1", (Charge("consumer:default/team-a", 100, 0.5),), time.time())

        async def spend():
            return (await cluster.status("Consumer", "team-a")).get("spend")

        found = await cluster.eventually(spend)
        assert found["window"] == "day" and found["limitUsd"] == 2.0
        assert found["spentUsd"] == 0.5 and found["remainingUsd"] == 1.5 and found["resetsAt"].endswith("Z")
        await gateway.settle("r2", (Charge("consumer:default/team-a", 100, 1.0),), time.time())
        assert (await cluster.eventually(lambda: _when(spend(), lambda s: s["spentUsd"] == 1.5)))["remainingUsd"] == 0.5
        await gateway.aclose()
    finally:
        server.stop()
