"""AIProviders show the models the gateway replicas keep requests off for now (status.cooldowns,
the Resting column of `kubectl get aiproviders`), read from the ConfigMap they publish to."""

from __future__ import annotations

import asyncio
import time

from signalbox.core.replicastate import encode
from signalbox.operator.cooldownstatus import provider_cooldowns
from tests.factories import model, provider

from .conftest import CM_NAMESPACE, reporting_config

REPLICAS = "signalbox-replicas"
NOW = 1795872600.0  # 2026-11-28 13:30 UTC


def test_each_resting_model_is_listed_once_with_the_longest_rest_and_who_saw_it():
    replicas = {
        "gw-a.json": encode(0, {}, {}, resting={"ns/p/m1": (NOW + 30, "rate_limited"), "ns/q/m1": (NOW + 9, "x")}),
        "gw-b.json": encode(0, {}, {}, resting={"ns/p/m1": (NOW + 60, "key_rejected"), "ns/p/m2": (NOW - 1, "old")}),
        "gw-c.json": "not json",
        "notes": "hello",
    }
    assert provider_cooldowns("ns/p", replicas, NOW) == [
        {"model": "m1", "until": "2026-11-28T13:31:00Z", "reason": "key_rejected", "replicas": ["gw-a", "gw-b"]}
    ]
    assert provider_cooldowns("ns/other", replicas, NOW) == []


async def test_the_operator_writes_what_the_replicas_rest_into_provider_status(cluster, start_operator):
    async def publish(resting: dict) -> None:
        data = {"gw-a.json": encode(0, {}, {}, resting=resting)}
        body = {"metadata": {"name": REPLICAS, "namespace": CM_NAMESPACE}, "data": data}
        try:
            await asyncio.to_thread(cluster.api.core.create_namespaced_config_map, CM_NAMESPACE, body)
        except Exception:
            await asyncio.to_thread(cluster.api.core.patch_namespaced_config_map, REPLICAS, CM_NAMESPACE, body)

    await start_operator(reporting_config(REPLICAS))
    await cluster.apply(provider("alpha", "http://127.0.0.1:9001/v1", [model("a1"), model("a2")]))
    await publish(
        {"default/alpha/a1": (time.time() + 300, "rate_limited"), "default/beta/b1": (time.time() + 300, "x")}
    )

    async def resting(models: list[str]):
        """(status.cooldowns,) once it lists exactly these models (a tuple: true even when empty)."""
        cooldowns = (await cluster.status("AIProvider", "alpha")).get("cooldowns")
        return (cooldowns,) if cooldowns is not None and [c["model"] for c in cooldowns] == models else None

    ((entry,),) = await cluster.eventually(lambda: resting(["a1"]))
    assert (entry["reason"], entry["replicas"]) == ("rate_limited", ["gw-a"])
    await publish({})  # the rest is over
    assert await cluster.eventually(lambda: resting([])) == ([],)
