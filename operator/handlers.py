"""kopf handlers: a few lines each around the Reconciler and the health probes.

`build_registry()` makes a fresh registry (no module-level state), so tests and the CLI build
the same operator with different settings.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import httpx
import kopf
from pydantic import ValidationError

from signalbox.core.models import GROUP, VERSION, AIProviderSpec, BudgetSpec

from . import consumerstatus, rolloutstatus
from .budgetstatus import summarize
from .consumerkeys import CONSUMER_LABEL
from .cooldownstatus import COOLDOWN_STATUS_SECONDS, ReplicaView, provider_cooldowns
from .health import HealthTracker, probe
from .kube import ClusterAPI
from .reconciler import Key, OperatorConfig, Reconciler


def build_registry(config: OperatorConfig, api: ClusterAPI, server: str | None = None) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(config, api)
    loop_stop = asyncio.Event()
    tasks: set[asyncio.Task] = set()

    if server:  # tests and out-of-cluster runs against an explicit API server

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=server, insecure=True)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # Events are posted by the reconciler, on changes only
        settings.watching.server_timeout = 300
        # Namespace (and CRD) scanning exists to resolve glob patterns; exact names need none,
        # so namespaced installs need no cluster-wide permission to list namespaces.
        settings.scanning.disabled = config.exact_namespaces
        tasks.add(asyncio.create_task(reconciler.run(loop_stop)))

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        loop_stop.set()
        for task in tasks:
            task.cancel()

    # kopf's indexes hold the objects; kopf lists every indexed resource completely before it
    # calls any other handler, so by the first event below the world is whole.
    @kopf.index(GROUP, VERSION, "aiproviders", registry=registry, id="provider_index")
    def provider_index(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
        return {(namespace or "default", name): dict(body)}

    @kopf.index(GROUP, VERSION, "routingpolicies", registry=registry, id="policy_index")
    def policy_index(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
        return {(namespace or "default", name): dict(body)}

    @kopf.index(GROUP, VERSION, "consumers", registry=registry, id="consumer_index")
    def consumer_index(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
        return {(namespace or "default", name): dict(body)}

    def attach(indexes: dict[str, Any]) -> None:
        # kopf passes every index as a keyword argument named after it.
        reconciler.attach(indexes["provider_index"], indexes["policy_index"], indexes["consumer_index"])

    @kopf.on.event(GROUP, VERSION, "aiproviders", registry=registry)
    def provider_event(type: str, body: kopf.Body, **indexes: Any) -> None:
        attach(indexes)
        reconciler.notify("AIProvider", type, dict(body))

    @kopf.on.event(GROUP, VERSION, "routingpolicies", registry=registry)
    def policy_event(type: str, body: kopf.Body, **indexes: Any) -> None:
        attach(indexes)
        reconciler.notify("RoutingPolicy", type, dict(body))

    @kopf.on.event(GROUP, VERSION, "consumers", registry=registry)
    def consumer_event(type: str, body: kopf.Body, **indexes: Any) -> None:
        attach(indexes)
        reconciler.notify("Consumer", type, dict(body))

    @kopf.on.event("", "v1", "secrets", registry=registry, labels={CONSUMER_LABEL: kopf.PRESENT})
    def consumer_secret_event(type: str, body: kopf.Body, **_: Any) -> None:
        """A consumer's key Secret changed (edited, emptied, deleted: a revocation): recompile
        at once rather than at the next resync. Only its name and version are read here."""
        reconciler.secret_changed()

    if config.probes:

        @kopf.daemon(GROUP, VERSION, "aiproviders", registry=registry, cancellation_timeout=2)
        async def health_probe(body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any) -> None:
            """Probe on the provider's own interval (re-read each round: body is a live view)."""
            async with httpx.AsyncClient() as client:
                tracker: HealthTracker | None = None
                while not stopped:
                    try:
                        spec = AIProviderSpec.model_validate(body.get("spec", {}))
                    except ValidationError:
                        await stopped.wait(5)  # the reconciler reports why; nothing to probe
                        continue
                    status = dict(body.get("status") or {})
                    tracker = tracker or HealthTracker.resume(spec, status.get("health"))
                    tracker.failure_threshold = spec.health_check.failure_threshold
                    tracker.recovery_threshold = spec.health_check.recovery_threshold
                    key = None
                    if spec.auth and spec.auth.secret_ref:
                        ns = body["metadata"].get("namespace") or "default"
                        key = reconciler.keys.get((ns, spec.auth.secret_ref.name, spec.auth.secret_ref.key))
                    result = await probe(spec, key, client)
                    flipped = tracker.observe(result)
                    await _write_health(api, body, tracker, result, flipped)
                    await stopped.wait(spec.health_check.interval_seconds)

    if config.replica_configmap_name:
        # Cooldowns last seconds to minutes: their status is refreshed at least every 5 s, from
        # one read of the ConfigMap per half interval whatever the number of providers.
        cooldown_every = min(config.budget_status_seconds, COOLDOWN_STATUS_SECONDS)
        replicas = ReplicaView(
            lambda: api.configmap(config.replica_configmap_namespace, config.replica_configmap_name),
            ttl=cooldown_every / 2,
        )

        @kopf.daemon(GROUP, VERSION, "aiproviders", registry=registry, cancellation_timeout=2)
        async def cooldown_status(body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any) -> None:
            """The models the gateways have cooling down, in status.cooldowns (only when it changed)."""
            while not stopped:
                meta = body["metadata"]
                namespace, name = meta.get("namespace") or "default", meta["name"]
                now = provider_cooldowns(f"{namespace}/{name}", await replicas.data(), time.time())
                if now != (body.get("status") or {}).get("cooldowns", []):
                    await api.patch_status("aiproviders", namespace, name, {"cooldowns": now})
                await stopped.wait(cooldown_every)

        @kopf.daemon(
            GROUP,
            VERSION,
            "routingpolicies",
            registry=registry,
            cancellation_timeout=2,
            when=lambda spec, **_: bool(spec.get("budget")),
        )
        async def budget_status(body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any) -> None:
            """What the gateway replicas have spent, in status.budget (only when it changed)."""
            while not stopped:
                await _write_budget(api, config, body)
                await stopped.wait(config.budget_status_seconds)

        @kopf.daemon(
            GROUP,
            VERSION,
            "routingpolicies",
            registry=registry,
            cancellation_timeout=2,
            when=lambda spec, **_: bool(spec.get("rollout")),
        )
        async def rollout_status(body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any) -> None:
            """The rollout's figures over every replica, in status.rollout (only when they changed).
            The reconciler turns its state into the RolloutProgressing condition and Event."""
            while not stopped:
                meta, spec = body["metadata"], dict(body.get("spec") or {})
                namespace, name = meta.get("namespace") or "default", meta["name"]
                candidate = reconciler.current("RoutingPolicy").get(
                    (namespace, (spec.get("rollout") or {}).get("candidate", ""))
                )
                now = rolloutstatus.summarize(spec, (candidate or {}).get("spec"), await replicas.data())
                if now is not None and now != (body.get("status") or {}).get("rollout"):
                    await api.patch_status("routingpolicies", namespace, name, {"rollout": now})
                await stopped.wait(cooldown_every)

    if config.redis_url:
        redis = consumerstatus.client(config.redis_url, os.environ.get("SIGNALBOX_REDIS_PASSWORD"))

        @kopf.daemon(
            GROUP,
            VERSION,
            "consumers",
            registry=registry,
            cancellation_timeout=2,
            when=lambda spec, **_: bool((spec.get("limits") or {}).get("budget")),
        )
        async def consumer_spend(body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any) -> None:
            """What the consumer spent in its most used budget window, in status.spend (on change)."""
            while not stopped:
                found = await consumerstatus.spend(redis, dict(body), time.time())
                if found is not None and found != (body.get("status") or {}).get("spend"):
                    meta = body["metadata"]
                    await api.patch_status(
                        "consumers", meta.get("namespace") or "default", meta["name"], {"spend": found}
                    )
                await stopped.wait(config.budget_status_seconds)

    return registry


async def _write_budget(api: ClusterAPI, config: OperatorConfig, body: kopf.Body) -> None:
    try:
        spec = BudgetSpec.model_validate(body.get("spec", {}).get("budget") or {})
    except ValidationError:
        return  # the reconciler reports why the policy is refused
    meta = body["metadata"]
    namespace, name = meta.get("namespace") or "default", meta["name"]
    published = await api.configmap(config.replica_configmap_namespace, config.replica_configmap_name)
    summary = summarize(f"{namespace}/{name}", spec, (published or {}).get("data", {}), time.time())
    if summary != (body.get("status") or {}).get("budget"):
        await api.patch_status("routingpolicies", namespace, name, {"budget": summary})


async def _write_health(api: ClusterAPI, body: kopf.Body, tracker: HealthTracker, result: Any, flipped: bool) -> None:
    """status.health only: the reconciler turns it into the Healthy condition (one writer of
    conditions), as it recompiles on a flip anyway."""
    meta = body["metadata"]
    namespace, name = meta.get("namespace") or "default", meta["name"]
    await api.patch_status("aiproviders", namespace, name, {"health": tracker.status(result)})
    if flipped:
        state = "healthy" if tracker.healthy else "unhealthy"
        await api.event(
            dict(body),
            "AIProvider",
            "Healthy" if tracker.healthy else "Unhealthy",
            f"provider is {state}: {result.message}",
            warning=not tracker.healthy,
        )
