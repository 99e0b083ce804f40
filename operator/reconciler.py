"""Everything the operator decides, around the one pure `compile_config`.

kopf handlers only feed `observe()` with what the watch streams say. A single loop waits until
something that matters changed (spec, generation or health: not our own status writes), lets
a burst settle (debounce), gathers every input (objects and which Secrets exist), compiles
once, publishes the ConfigMap only when the result is valid and new, and then writes each
object's conditions and Events where they changed. No Kubernetes reads happen inside compile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core import bundle
from signalbox.core.compiler import compile_config
from signalbox.core.errors import Problem
from signalbox.core.secrets import SecretValue

from . import conditions, consumerkeys, rolloutstatus
from .kube import ClusterAPI

log = logging.getLogger("signalbox.operator")

GENERATION_ANNOTATION = "signalbox.io/generation"
HASH_ANNOTATION = "signalbox.io/content-hash"
PLURALS = {"AIProvider": "aiproviders", "RoutingPolicy": "routingpolicies", "Consumer": "consumers"}

Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class OperatorConfig:
    configmap_namespace: str = "signalbox-system"
    configmap_name: str = "signalbox-routing"
    debounce_seconds: float = 0.3
    resync_seconds: float = 30.0
    probes: bool = True
    # Empty: cluster-wide. Exact names need no namespace listing (and no RBAC for it).
    namespaces: tuple[str, ...] = ()
    # The ConfigMap gateway replicas publish their spend to ("" name: budgets are not reported
    # in RoutingPolicy status), and how often a budgeted policy's status is refreshed from it.
    replica_configmap_namespace: str = ""
    replica_configmap_name: str = ""
    budget_status_seconds: float = 15.0
    # The gateways' shared limit store: budgeted Consumers show their spend in status.spend.
    redis_url: str = ""
    # Base64 characters of routing config per ConfigMap before it is split into parts
    # (core.bundle); smaller in tests, to exercise the parts with a small config.
    max_object_chars: int = bundle.MAX_OBJECT_CHARS

    @property
    def exact_namespaces(self) -> bool:
        return bool(self.namespaces) and not any(c in n for n in self.namespaces for c in "*?[!")


def _key(body: dict[str, Any]) -> Key:
    meta = body.get("metadata", {})
    return meta.get("namespace") or "default", meta["name"]


def _fingerprint(body: dict[str, Any] | None) -> str:
    """What the compile or the conditions depend on; status writes other than health and a
    rollout's state do not count."""
    if body is None:
        return ""
    status = body.get("status") or {}
    health = (status.get("health") or {}).get("healthy")
    rollout = (status.get("rollout") or {}).get("state")
    return json.dumps([body.get("spec"), body.get("metadata", {}).get("generation"), health, rollout], sort_keys=True)


class Reconciler:
    """Compiles what kopf's indexes hold; kopf fills them from its watches.

    kopf populates every index from a full listing before it runs any other handler, so the
    first `notify()` (from an event handler) means the indexes hold every object: the first
    published config never holds half of the world. Until then `run` does not compile.
    """

    def __init__(self, config: OperatorConfig, api: ClusterAPI):
        self.config = config
        self.api = api
        # kind -> kopf.Index of (namespace, name) -> that object's body, attached on first notify.
        self.indexes: dict[str, Any] = {}
        self.indexed = asyncio.Event()
        self.dirty = asyncio.Event()
        self.fingerprints: dict[tuple[str, Key], str] = {}
        # Status this operator wrote last, by object: compared instead of the body, which may
        # not have caught up with our own write yet.
        self.written: dict[tuple[str, Key], dict[str, Any]] = {}
        self.generation: int | None = None
        self.published_hash = ""
        # (namespace, secret, key) -> value, for health probes only; never logged or copied.
        self.keys: dict[tuple[str, str, str], SecretValue] = {}

    # ------------------------------------------------------------------ inputs

    def attach(self, providers: Any, policies: Any, consumers: Any = None) -> None:
        """The kopf indexes (kopf.Index) this reconciler compiles from."""
        self.indexes = {"AIProvider": providers, "RoutingPolicy": policies, "Consumer": consumers}
        self.indexed.set()

    def notify(self, kind: str, event_type: str | None, body: dict[str, Any]) -> None:
        """An object changed; recompile if something the compile reads did (not our status)."""
        key = (kind, _key(body))
        if event_type == "DELETED":
            self.fingerprints.pop(key, None)
            self.written.pop(key, None)
            self.dirty.set()
            return
        fingerprint = _fingerprint(body)
        if self.fingerprints.get(key) != fingerprint:
            self.fingerprints[key] = fingerprint
            self.dirty.set()

    def secret_changed(self) -> None:
        """A consumer's key Secret changed: its hashes are read again by the next round."""
        self.dirty.set()

    def current(self, kind: str) -> dict[Key, dict[str, Any]]:
        """The objects of a kind as kopf's index holds them now (its latest watch event)."""
        index = self.indexes.get(kind)
        if index is None:
            return {}
        return {key: dict(body) for key, store in index.items() for body in store}

    async def _secrets(self, providers: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        present: set[tuple[str, str, str]] = set()
        keys: dict[tuple[str, str, str], SecretValue] = {}
        for body in providers:
            ref = ((body.get("spec") or {}).get("auth") or {}).get("secretRef") or {}
            if not isinstance(ref, dict) or not ref.get("name"):
                continue
            namespace = _key(body)[0]
            data = await self.api.secret(namespace, ref["name"])
            for name, value in (data or {}).items():
                present.add((namespace, ref["name"], name))
                keys[(namespace, ref["name"], name)] = value
        self.keys = keys
        return present

    async def _consumer_keys(self, consumers: list[dict[str, Any]]) -> dict[Key, consumerkeys.ConsumerKeys]:
        """Each consumer's key hashes (its Secret made or rotated first, as its spec says)."""
        out: dict[Key, consumerkeys.ConsumerKeys] = {}
        now = time.time()
        for body in consumers:
            found = await consumerkeys.ensure(self.api, body, now)
            if found is None:
                continue
            out[_key(body)] = found
            for reason, message in found.events:
                await self.api.event(body, "Consumer", reason, message)
        return out

    # ------------------------------------------------------------------ loop

    async def run(self, stopped: asyncio.Event) -> None:
        # A cluster with no objects yet fires no event: compile the empty world after a resync.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.indexed.wait(), timeout=self.config.resync_seconds)
        while not stopped.is_set():
            # Periodic resync too: Secrets appear without any event this operator watches.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dirty.wait(), timeout=self.config.resync_seconds)
            await asyncio.sleep(self.config.debounce_seconds)
            self.dirty.clear()
            try:
                await self.reconcile()
            except Exception:  # a failed round is retried on the next change or resync
                log.exception("reconcile failed; retrying")
                await asyncio.sleep(1)
                self.dirty.set()

    async def reconcile(self) -> None:
        objects = {kind: self.current(kind) for kind in PLURALS}
        providers, policies = list(objects["AIProvider"].values()), list(objects["RoutingPolicy"].values())
        consumers = list(objects["Consumer"].values())
        secrets = await self._secrets(providers)
        keys = await self._consumer_keys(consumers)
        if self.generation is None:
            current = await self.api.configmap(self.config.configmap_namespace, self.config.configmap_name)
            annotations = (current or {}).get("annotations", {})
            self.generation = int(annotations.get(GENERATION_ANNOTATION, 0))
            self.published_hash = annotations.get(HASH_ANNOTATION, "")
        result = compile_config(
            providers,
            policies,
            secrets,
            generation=self.generation + 1,
            consumers=consumers,
            key_hashes={f"{ns}/{name}": k.hashes for (ns, name), k in keys.items()},
        )
        if result.config is not None and result.config.content_hash != self.published_hash:
            await self.publish(result.config)
            self.generation += 1
            self.published_hash = result.config.content_hash
            log.info("published routing config generation %s (%s)", self.generation, self.published_hash[:12])
        elif result.config is None:
            log.warning(
                "routing config not published: %d problem(s); generation %s stays in force",
                len(result.problems),
                self.generation,
            )
        backends = {}
        if result.config is not None:
            backends = {p.id: sum(1 for b in p.backends if b.target) for p in result.config.policies}
        await self._write_statuses(objects, result.problems, result.config is not None, backends, keys)

    async def publish(self, config: pb.RoutingConfig) -> None:
        """Parts first, then the manifest that names them (one write the gateways watch), then
        the parts no manifest names any more (core.bundle)."""
        namespace, name = self.config.configmap_namespace, self.config.configmap_name
        packed = bundle.pack(config, name, self.config.max_object_chars)
        for part_name, text in zip(packed.part_names(), packed.parts, strict=True):
            await self.api.write_part(namespace, part_name, name, {bundle.PART_KEY: text})
        await self.api.write_configmap(
            namespace,
            name,
            packed.configmap_data(),
            {GENERATION_ANNOTATION: str(config.generation), HASH_ANNOTATION: config.content_hash},
        )
        await self.api.delete_parts(namespace, name, set(packed.part_names()))

    async def _write_statuses(
        self,
        objects: dict[str, dict[Key, dict[str, Any]]],
        problems: list[Problem],
        published: bool,
        backends: dict[str, int],
        keys: dict[Key, consumerkeys.ConsumerKeys] | None = None,
    ) -> None:
        """The one writer of every object's conditions (Healthy included: the probes write only
        status.health, which this reads), so no two writers replace each other's lists."""
        by_object: dict[tuple[str, str, str], list[Problem]] = defaultdict(list)
        for p in problems:
            by_object[(p.kind, p.namespace, p.name)].append(p)
        for kind, index in objects.items():
            for (namespace, name), body in index.items():
                own = by_object.get((kind, namespace, name), [])
                generation = int(body.get("metadata", {}).get("generation") or 0)
                new = conditions.for_object(own, generation, published, problems, self.generation or 0)
                status = {**(body.get("status") or {}), **self.written.get((kind, (namespace, name)), {})}
                if kind == "AIProvider" and (health := status.get("health")):
                    new.append(conditions.health(health, generation))
                rollout = (body.get("spec") or {}).get("rollout") if kind == "RoutingPolicy" else None
                if rollout:
                    ok, reason, message = rolloutstatus.condition_of(rollout, status.get("rollout"))
                    new.append(conditions.condition(rolloutstatus.PROGRESSING, ok, reason, message, generation))
                previous = status.get("conditions") or []
                merged = conditions.merge(previous, new)
                if kind == "RoutingPolicy" and not rollout:
                    merged = [c for c in merged if c.get("type") != rolloutstatus.PROGRESSING]
                patch: dict[str, Any] = {"observedGeneration": generation, "conditions": merged}
                if kind == "RoutingPolicy":
                    patch["backends"] = backends.get(f"{namespace}/{name}", status.get("backends", 0))
                    patch["configGeneration"] = self.generation or 0
                    if "budget" in status and not (body.get("spec") or {}).get("budget"):
                        patch["budget"] = None  # its budget was removed: so is the report of it
                    if status.get("rollout") and not rollout:
                        patch["rollout"] = None  # rolled back or promoted: the run's report goes
                if kind == "Consumer" and keys and (own_keys := keys.get((namespace, name))):
                    patch.update(own_keys.status)
                    if "previousKeyExpires" in status and "previousKeyExpires" not in own_keys.status:
                        patch["previousKeyExpires"] = None
                unchanged = conditions.strip_times(previous) == conditions.strip_times(merged) and all(
                    status.get(k) == v for k, v in patch.items() if k != "conditions"
                )
                if unchanged:
                    continue
                await self.api.patch_status(PLURALS[kind], namespace, name, patch)
                self.written[(kind, (namespace, name))] = patch
                for c in conditions.changed(previous, new):
                    if c["type"] == conditions.HEALTHY:
                        continue  # the probe posts its own Event when health flips, with the reason
                    await self.api.event(
                        body,
                        kind,
                        c["reason"],
                        f"{c['type']}={c['status']}: {c['message']}",
                        warning=c["status"] == "False",
                    )
