"""A RoutingPolicy's rollout in its status (issue 17): the gateway replicas' figures of the
current run summed into status.rollout, the RolloutProgressing condition, and an Event when the
gateways paused a failing candidate; promote or roll back by removing spec.rollout."""

from __future__ import annotations

import asyncio

from signalbox.core.compiler import rollout_epoch
from signalbox.core.models import RolloutSpec, RoutingPolicySpec
from signalbox.core.replicastate import encode
from signalbox.operator.rolloutstatus import PROGRESSING, summarize
from tests.factories import backend, model, policy, provider

from .conftest import CM_NAMESPACE, reporting_config

REPLICAS = "signalbox-replicas"
ROLLOUT = {"candidate": "next", "mode": "canary", "percent": 20, "minRequests": 10}
LIVE = policy("live", ["auto"], [backend("alpha", "a1")], rollout=ROLLOUT)
NEXT = policy("next", ["auto-next"], [backend("alpha", "a2")])
RUN = rollout_epoch(RolloutSpec.model_validate(ROLLOUT), RoutingPolicySpec.model_validate(NEXT["spec"]))


def test_the_current_runs_figures_of_every_replica_add_up_and_other_runs_are_skipped():
    shadow = {**LIVE["spec"], "rollout": {"candidate": "next"}}
    shadow_run = rollout_epoch(
        RolloutSpec.model_validate({"candidate": "next"}), RoutingPolicySpec.model_validate(NEXT["spec"])
    )
    replicas = {
        "gw-a.json": encode(0, {}, {}, rollouts={shadow_run: {"requests": 30, "candidate": 30, "differs": 6}}),
        "gw-b.json": encode(
            0, {}, {}, rollouts={shadow_run: {"requests": 10, "candidate": 10, "differs": 4, "candidate_usd": 0.5}}
        ),
        "gw-c.json": encode(0, {}, {}, rollouts={"an-earlier-run": {"requests": 1000, "candidate": 1000}}),
        "gw-bad.json": "not json",
        "notes": "hello",
    }
    status = summarize(shadow, NEXT["spec"], replicas)
    assert status == {
        "state": "Shadow",
        "candidate": "next",
        "epoch": shadow_run,
        "requests": 40,
        "candidateRequests": 40,
        "candidateErrors": 0,
        "liveErrors": 0,
        "liveCostUsd": 0.0,
        "candidateCostUsd": 0.5,
        "differingPercent": 25.0,
    }
    assert summarize(shadow, None, replicas) is None  # no candidate: the reconciler says why
    assert summarize(LIVE["spec"], NEXT["spec"], {})["requests"] == 0


async def test_the_operator_reports_a_canary_and_its_pause_and_forgets_it_when_rolled_back(cluster, start_operator):
    async def publish(**figures: float) -> None:
        data = {"gw-a.json": encode(0, {}, {}, rollouts={RUN: figures})}
        body = {"metadata": {"name": REPLICAS, "namespace": CM_NAMESPACE}, "data": data}
        try:
            await asyncio.to_thread(cluster.api.core.create_namespaced_config_map, CM_NAMESPACE, body)
        except Exception:
            await asyncio.to_thread(cluster.api.core.patch_namespaced_config_map, REPLICAS, CM_NAMESPACE, body)

    await publish(requests=100, candidate=20, candidate_errors=1, live_usd=0.8, candidate_usd=0.1)
    await start_operator(reporting_config(REPLICAS))
    await cluster.apply(provider("alpha", "http://127.0.0.1:9001/v1", [model("a1"), model("a2")]))
    await cluster.apply(NEXT)
    await cluster.apply(LIVE)

    async def rollout(state: str):
        found = (await cluster.status("RoutingPolicy", "live")).get("rollout") or {}
        return found if found.get("state") == state else None

    canary = await cluster.eventually(lambda: rollout("Canary"))
    assert (canary["requests"], canary["candidateRequests"], canary["candidateErrors"]) == (100, 20, 1)
    assert (canary["percent"], canary["liveCostUsd"], canary["candidateCostUsd"], canary["epoch"]) == (
        20,
        0.8,
        0.1,
        RUN,
    )

    async def progressing(status: str):
        c = await cluster.condition("RoutingPolicy", "live", PROGRESSING)
        return c if c and c["status"] == status else None

    running = await cluster.eventually(lambda: progressing("True"))
    assert running["reason"] == "Canary" and "next serves 20" in running["message"]

    # A gateway paused it: 9 of 30 failed.
    await publish(requests=150, candidate=30, candidate_errors=9, paused=1_800_000_000.0)
    paused = await cluster.eventually(lambda: rollout("Paused"))
    assert "failed 9 of 30 requests (30% > 20%)" in paused["message"]
    stopped = await cluster.eventually(lambda: progressing("False"))
    assert stopped["reason"] == "PausedOnErrors" and "edit the candidate or spec.rollout" in stopped["message"]

    async def pause_event():
        return [
            e
            for e in await cluster.events()
            if e["reason"] == "PausedOnErrors" and e["involved_object"]["name"] == "live" and e["type"] == "Warning"
        ]

    await cluster.eventually(pause_event)
    assert "rollout" not in await cluster.status("RoutingPolicy", "next")

    # Rolled back (or promoted): one field, spec.rollout, removed; the report and condition go.
    await cluster.merge_patch("RoutingPolicy", "live", {"spec": {"rollout": None}, "metadata": {"generation": 2}})

    async def gone():
        status = await cluster.status("RoutingPolicy", "live")
        kinds = {c["type"] for c in status.get("conditions", [])}
        return status.get("observedGeneration") == 2 and "rollout" not in status and PROGRESSING not in kinds

    await cluster.eventually(gone)
