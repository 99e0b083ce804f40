"""Operator tier: kopf runs the real handlers against kmock's KubernetesEmulator.

The emulator stores objects and streams watch events like an API server (merge-patches, no
admission): enough for the operator's contract — objects in, ConfigMap, status and Events out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import kmock
import kopf
import pytest
from google.protobuf import json_format

from signalbox.core import bundle
from signalbox.fakeprovider import serving
from signalbox.operator.handlers import build_registry
from signalbox.operator.kube import ClusterAPI, api_client
from signalbox.operator.reconciler import OperatorConfig

GROUP_VERSION = "signalbox.io/v1alpha1"
CM_NAMESPACE, CM_NAME = "signalbox-system", "signalbox-routing"
PLURALS = {"AIProvider": "aiproviders", "RoutingPolicy": "routingpolicies", "Consumer": "consumers"}


@pytest.fixture
def k8s(kmock: kmock.KubernetesEmulator) -> kmock.KubernetesEmulator:
    for plural, kind in (
        ("aiproviders", "AIProvider"),
        ("routingpolicies", "RoutingPolicy"),
        ("consumers", "Consumer"),
    ):
        kmock.resources[f"{GROUP_VERSION}/{plural}"] = kmock.ResourceInfo(
            kind=kind,
            namespaced=True,
            subresources={"status"},
            verbs={"list", "watch", "get", "patch", "create", "delete", "update"},
        )
    # kopf discovers what it may watch; without the CRD resource it will not start watching.
    kmock.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch", "get"}
    )
    for plural, kind in (
        ("secrets", "Secret"),
        ("configmaps", "ConfigMap"),
        ("events", "Event"),
        ("namespaces", "Namespace"),
    ):
        kmock.resources[f"v1/{plural}"] = kmock.ResourceInfo(
            kind=kind,
            namespaced=plural != "namespaces",
            verbs={"list", "watch", "get", "create", "patch", "update", "delete"},
        )
    return kmock


class Cluster:
    """What a test does to and reads from the emulated cluster (through the real client)."""

    def __init__(self, emulator: kmock.KubernetesEmulator, api: ClusterAPI):
        self.emulator = emulator
        self.api = api

    async def apply(self, obj: dict[str, Any]) -> None:
        plural = PLURALS[obj["kind"]]
        meta = obj["metadata"]
        ns = meta.get("namespace", "default")
        obj = {**obj, "metadata": {**meta, "namespace": ns}}

        def write() -> None:
            try:
                current = self.api.custom.get_namespaced_custom_object(
                    "signalbox.io", "v1alpha1", ns, plural, meta["name"]
                )
            except Exception:
                # As an API server would store it (kopf's finalizer patches test resourceVersion).
                body = {
                    **obj,
                    "metadata": {
                        **obj["metadata"],
                        "generation": 1,
                        "uid": f"uid-{meta['name']}",
                        "resourceVersion": "1",
                    },
                }
                self.api.custom.create_namespaced_custom_object("signalbox.io", "v1alpha1", ns, plural, body)
                return
            generation = int(current["metadata"].get("generation", 1)) + 1
            self.api.custom.patch_namespaced_custom_object(
                "signalbox.io",
                "v1alpha1",
                ns,
                plural,
                meta["name"],
                {"spec": obj["spec"], "metadata": {"generation": generation}},
            )

        await asyncio.to_thread(write)

    async def merge_patch(self, kind: str, name: str, patch: dict[str, Any], namespace: str = "default") -> None:
        """A JSON merge patch, as `kubectl edit` sends (a null removes a field)."""
        await asyncio.to_thread(
            self.api.custom.patch_namespaced_custom_object,
            "signalbox.io",
            "v1alpha1",
            namespace,
            PLURALS[kind],
            name,
            patch,
        )

    async def delete(self, kind: str, name: str, namespace: str = "default") -> None:
        plural = PLURALS[kind]
        await asyncio.to_thread(
            self.api.custom.delete_namespaced_custom_object, "signalbox.io", "v1alpha1", namespace, plural, name
        )

    async def secret(self, name: str, data: dict[str, str], namespace: str = "default") -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "data": {k: __import__("base64").b64encode(v.encode()).decode() for k, v in data.items()},
        }
        await asyncio.to_thread(self.api.core.create_namespaced_secret, namespace, body)

    def get(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any]:
        plural = PLURALS[kind]
        return self.api.custom.get_namespaced_custom_object("signalbox.io", "v1alpha1", namespace, plural, name)

    async def status(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any]:
        return (await asyncio.to_thread(self.get, kind, name, namespace)).get("status") or {}

    async def condition(self, kind: str, name: str, ctype: str) -> dict[str, Any] | None:
        for c in (await self.status(kind, name)).get("conditions", []):
            if c["type"] == ctype:
                return c
        return None

    async def configmap(self) -> dict[str, Any] | None:
        cm = await self.api.configmap(CM_NAMESPACE, CM_NAME)
        if cm is None:
            return None
        manifest = bundle.read_manifest(cm["data"])
        parts = []
        for name in manifest["parts"]:
            part = await self.api.configmap(CM_NAMESPACE, name)
            parts.append(part["data"][bundle.PART_KEY] if part else None)
        cfg = bundle.unpack(manifest, cm["data"].get(bundle.INLINE_KEY), parts)
        return {"config": json.loads(json_format.MessageToJson(cfg)), "annotations": cm["annotations"]}

    async def events(self) -> list[dict[str, Any]]:
        items = await asyncio.to_thread(self.api.core.list_event_for_all_namespaces)
        return [e.to_dict() for e in items.items]

    async def eventually(self, check: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Await `check()` until it returns something truthy; fail with its last value."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = await check()
            if last:
                return last
            await asyncio.sleep(0.05)
        raise AssertionError(f"condition not met within {timeout}s; last value: {last!r}")


@pytest.fixture
async def cluster(k8s: kmock.KubernetesEmulator) -> AsyncIterator[Cluster]:
    api = ClusterAPI(api_client(str(k8s.url)))
    yield Cluster(k8s, api)
    api.close()


@pytest.fixture
async def start_operator(k8s: kmock.KubernetesEmulator) -> AsyncIterator[Callable[..., Any]]:
    """Start the real operator (kopf + Signalbox handlers) against the emulator; stop it after.

    The operator gets its own thread and event loop, as in production: kopf treats tasks born
    after it in a shared loop (pytest's own) as its hung children at exit.
    """
    running: list[tuple[threading.Thread, threading.Event]] = []

    async def start(config: OperatorConfig | None = None, namespaces: tuple[str, ...] = ()) -> None:
        config = config or OperatorConfig(
            configmap_namespace=CM_NAMESPACE, configmap_name=CM_NAME, debounce_seconds=0.05, probes=False
        )
        config = dataclasses.replace(config, namespaces=namespaces)
        server = str(k8s.url)
        stop, ready = threading.Event(), threading.Event()

        def run() -> None:
            api = ClusterAPI(api_client(server))
            registry = build_registry(config, api, server=server)
            try:
                asyncio.run(
                    kopf.operator(
                        registry=registry,
                        clusterwide=not namespaces,
                        namespaces=namespaces,
                        standalone=True,
                        stop_flag=stop,
                        ready_flag=ready,
                    )
                )
            finally:
                api.close()

        thread = threading.Thread(target=run, name="operator", daemon=True)
        thread.start()
        running.append((thread, stop))
        assert await asyncio.to_thread(ready.wait, 10), "operator did not start"

    yield start
    for thread, stop in running:
        stop.set()
        await asyncio.to_thread(thread.join, 10)


@pytest.fixture
async def fake():
    """A fake provider in this event loop."""
    async with serving("probed") as fake:
        yield fake


async def envoy_listeners(cluster: Cluster, admin_socket: str, names: set[str], timeout: float) -> dict[str, int]:
    """The ports Envoy bound (listeners on port 0), once every listener in `names` is up."""
    from signalbox.envoyadmin import listener_ports

    bound: dict[str, int] = {}

    async def listening() -> bool:
        try:
            bound.update(await asyncio.to_thread(listener_ports, admin_socket))
        except OSError:
            return False
        return names <= set(bound)

    await cluster.eventually(listening, timeout=timeout)
    return bound


def reporting_config(replicas: str) -> OperatorConfig:
    """An operator that reports what the gateway replicas publish to ConfigMap `replicas`
    (budget spend, cooldowns) every 0.2 s, with no probes of its own."""
    return OperatorConfig(
        configmap_namespace=CM_NAMESPACE,
        configmap_name=CM_NAME,
        debounce_seconds=0.05,
        probes=False,
        replica_configmap_namespace=CM_NAMESPACE,
        replica_configmap_name=replicas,
        budget_status_seconds=0.2,
    )


def config_sync_children(pid: int) -> list[int]:
    """The `signalbox config-sync` processes whose parent is `pid` (the gateway sidecar's)."""
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            status = (proc / "status").read_text()
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        parent = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
        if parent == pid and b"config-sync" in argv:
            found.append(int(proc.name))
    return found
