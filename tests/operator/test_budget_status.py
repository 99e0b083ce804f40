"""Budgeted RoutingPolicies show what the gateway replicas have spent (status.budget, the
Budget column of `kubectl get routingpolicies`), read from the ConfigMap they publish to."""

from __future__ import annotations

import asyncio
import time

from signalbox.core.budget import DAY, HOUR, window_start
from signalbox.core.models import BudgetSpec
from signalbox.core.replicastate import encode
from signalbox.operator.budgetstatus import summarize
from tests.factories import backend, model, policy, provider
from tests.windows import clear_of_the_hour_edge

from .conftest import CM_NAMESPACE, reporting_config

REPLICAS = "signalbox-replicas"
NOW = 1795872600.0  # 2026-11-28 13:30 UTC
HOUR_START, DAY_START = window_start(NOW, HOUR), window_start(NOW, DAY)


def test_every_replicas_spend_and_live_holds_add_up_and_others_are_skipped():
    spec = BudgetSpec.model_validate({"hourlyUsd": 1.0, "dailyUsd": 10.0, "downgradeAt": 0.5})
    replicas = {
        "gw-a.json": encode(DAY_START, {"ns/p": {HOUR_START: 0.25, HOUR_START - HOUR: 2.0}}, {}),
        "gw-b.json": encode(
            DAY_START,
            {"ns/p": {HOUR_START: 0.25}, "ns/other": {HOUR_START: 5.0}},
            {},
            {"ns/p": (0.125, NOW + 60)},
        ),
        "gw-c.json": encode(DAY_START, {"ns/p": {HOUR_START: 0.5}}, {}, {"ns/p": (9.0, NOW - 1)}),  # lapsed hold
        "gw-old.json": encode(DAY_START - DAY, {"ns/p": {DAY_START - HOUR: 7.0}}, {}),  # yesterday's key
        "gw-bad.json": "not json",
        "notes": "hello",
    }
    assert summarize("ns/p", spec, replicas, NOW) == {
        "state": "exhausted",  # 0.25 + 0.25 + 0.5 spent this hour, plus 0.125 in flight
        "windows": [
            {
                "window": "hour",
                "limitUsd": 1.0,
                "spentUsd": 1.0,
                "inFlightUsd": 0.125,
                "resetsAt": "2026-11-28T14:00:00Z",
            },
            {
                "window": "day",
                "limitUsd": 10.0,
                "spentUsd": 3.0,
                "inFlightUsd": 0.125,
                "resetsAt": "2026-11-29T00:00:00Z",
            },
        ],
    }
    assert summarize("ns/p", spec, {}, NOW)["state"] == "ok"


async def test_the_operator_writes_the_replicas_spend_into_budgeted_policies_status(cluster, start_operator):
    clear_of_the_hour_edge()
    now = time.time()
    day, hour = window_start(now, DAY), window_start(now, HOUR)

    async def publish(**replicas: float) -> None:
        data = {f"{r}.json": encode(day, {"default/metered": {hour: usd}}, {}) for r, usd in replicas.items()}
        body = {"metadata": {"name": REPLICAS, "namespace": CM_NAMESPACE}, "data": data}
        try:
            await asyncio.to_thread(cluster.api.core.create_namespaced_config_map, CM_NAMESPACE, body)
        except Exception:
            await asyncio.to_thread(cluster.api.core.patch_namespaced_config_map, REPLICAS, CM_NAMESPACE, body)

    await publish(**{"gw-a": 0.25, "gw-b": 0.25})
    await start_operator(reporting_config(REPLICAS))
    await cluster.apply(provider("alpha", "http://127.0.0.1:9001/v1", [model("a1")]))
    await cluster.apply(policy("metered", ["metered"], [backend("alpha", "a1")], budget={"hourlyUsd": 1.0}))
    await cluster.apply(policy("free", ["free"], [backend("alpha", "a1")]))

    async def budget_state(expected: str):
        budget = (await cluster.status("RoutingPolicy", "metered")).get("budget") or {}
        return budget if budget.get("state") == expected else None

    ok = await cluster.eventually(lambda: budget_state("ok"))
    (window,) = ok["windows"]
    assert (window["window"], window["limitUsd"], window["spentUsd"]) == ("hour", 1.0, 0.5)

    await publish(**{"gw-a": 0.25, "gw-b": 0.75})  # the gateways spent more
    exhausted = await cluster.eventually(lambda: budget_state("exhausted"))
    assert exhausted["windows"][0]["spentUsd"] == 1.0
    assert "budget" not in await cluster.status("RoutingPolicy", "free")  # no budget, nothing reported

    # The budget removed (a JSON merge patch, as `kubectl edit` sends): so is its report.
    remove = {"spec": {"budget": None}, "metadata": {"generation": 2}}
    await cluster.merge_patch("RoutingPolicy", "metered", remove)
    await cluster.eventually(lambda: _without_budget(cluster, "metered"))


async def _without_budget(cluster, name: str) -> bool:
    status = await cluster.status("RoutingPolicy", name)
    return status.get("observedGeneration") == 2 and "budget" not in status
