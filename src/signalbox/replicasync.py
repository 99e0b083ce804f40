"""What gateway replicas share through one ConfigMap: budget spend, learning, cooldowns, rollouts.

Each replica owns one key of the ConfigMap (`<replica>.json`: its spend of the current UTC
day, policy -> hourly bucket -> USD, what its requests in flight hold, policy -> [USD, until],
its learning observations (class-level counts and its newest per-prompt ones), and the
backends its attempts put to rest, backend -> [until, reason]) and writes it with a JSON
merge patch, which touches only that key: replicas never conflict and need no resourceVersion
dance. It writes only when its state changed, at most once per interval, and *watches* the
ConfigMap, so the others' state reaches its SQLite files (`remote` rows, which the ext_proc
workers add to their own) as soon as they publish it. The lag is therefore at most one
interval plus a watch event (tests/operator/test_replica_sync.py measures it).

A replica's key outlives the replica until the day ends: its spend still counts, so a restart
or a scale-down does not hand back money already spent, and its learning still teaches. A key
still of an earlier day ten minutes into a new one is deleted by whichever replica notices
first (every live replica republishes on its first sync of a day, because the day is part of
what it publishes); a replica that finds its own key gone or changed publishes it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from typing import Any

import kubernetes

from signalbox.cmwatch import watch_configmap
from signalbox.core.budget import DAY, window_start
from signalbox.core.replicastate import (
    Held,
    Learning,
    Resting,
    Rollouts,
    Spend,
    decode,
    decode_resting,
    decode_rollouts,
    encode,
)
from signalbox.extproc.cooldown import Cooldowns
from signalbox.extproc.learning import SharedLearning
from signalbox.extproc.ledger import SpendLedger
from signalbox.extproc.rolloutstats import RolloutStats

log = logging.getLogger("signalbox.replicasync")
DEFAULT_INTERVAL = 2.0
# A ConfigMap holds at most 1 MiB for all replicas together; one replica's key stays well below.
# Past this its per-prompt observations are left out, then all its learning (spend is small and
# always fits: hourly buckets of a day).
MAX_KEY_BYTES = 128 * 1024
_MERGE_PATCH = "application/merge-patch+json"
# The per-prompt observations of all replicas together stay within this much of the ConfigMap
# (each replica's share: this over the replicas it last saw), so that adding replicas never
# takes the ConfigMap past its 1 MiB and with it the spend every replica must share.
NEIGHBOUR_BYTES = 384 * 1024
# How far into a UTC day a key still of an earlier day counts as a gone replica's (a live one
# republishes within an interval of the day's start).
STALE_AFTER_SECONDS = 600


def newest_within(rows: list[list[object]], budget: int) -> list[list[object]]:
    """The newest of `rows` (oldest first) whose JSON fits in `budget` bytes, oldest first."""
    kept: list[list[object]] = []
    for row in reversed(rows):
        budget -= len(json.dumps(row, separators=(",", ":"))) + 1
        if budget < 0:
            break
        kept.append(row)
    return kept[::-1]


def _version(cm: kubernetes.client.V1ConfigMap) -> str:
    return (cm.metadata.resource_version if cm.metadata else None) or ""


def _older(version: str, than: str) -> bool:
    """resourceVersions are opaque, but etcd's (and every API server's in practice) are
    increasing integers; anything else is never judged older."""
    return version.isdigit() and than.isdigit() and int(version) < int(than)


class ReplicaSync:
    def __init__(
        self,
        client: kubernetes.client.ApiClient,
        namespace: str,
        name: str,
        replica: str,
        ledger: SpendLedger,
        learning: SharedLearning | None = None,
        interval: float = DEFAULT_INTERVAL,
        cooldowns: Cooldowns | None = None,
        rollouts: RolloutStats | None = None,
    ):
        self.core = kubernetes.client.CoreV1Api(client)
        self.namespace, self.name = namespace, name
        self.key = f"{replica}.json"
        self.ledger = ledger
        self.learning = learning
        self.cooldowns = cooldowns
        self.rollouts = rollouts
        self.interval = interval
        self.stale: set[str] = set()
        self.published = ""
        self.learning_left_out = False
        # Replicas with a key in the ConfigMap when last read (this one included).
        self.replicas = 1
        # The watch thread and the publishing thread both record into the SQLite files.
        self.lock = threading.Lock()
        self.recorded_version = ""
        self.last_recorded: dict[str, Any] = {"spend": {}, "learning": {}, "held": {}}

    def sync_once(self, now: float | None = None) -> dict[str, Any]:
        """Publish this replica's state if it changed (else read) and record the others'."""
        now = time.time() if now is None else now
        with self.lock:
            spend, held = self.ledger.local(now), self.ledger.local_held(now)
            learning = self.learning.local_rows() if self.learning is not None else {}
            if learning.get("neighbours"):
                learning["neighbours"] = newest_within(learning["neighbours"], NEIGHBOUR_BYTES // self.replicas)
            resting = self.cooldowns.local(now) if self.cooldowns is not None else {}
            rollouts = self.rollouts.local() if self.rollouts is not None else {}
        day = window_start(now, DAY)
        shared = spend or held or resting or rollouts
        payload = encode(day, spend, learning, held, resting, rollouts) if shared or any(learning.values()) else ""
        if len(payload) > MAX_KEY_BYTES and learning.get("neighbours"):
            # The per-prompt observations go first: the class-level counts are what every
            # replica's decisions fall back on.
            learning = {**learning, "neighbours": []}
            payload = encode(day, spend, learning, held, resting, rollouts)
        if len(payload) > MAX_KEY_BYTES:
            if not self.learning_left_out:
                log.warning(
                    "this replica's learning (%d bytes) does not fit its key of ConfigMap %s/%s: "
                    "sharing budget spend only",
                    len(payload),
                    self.namespace,
                    self.name,
                )
            self.learning_left_out = True
            payload = encode(day, spend, {}, held, resting, rollouts) if shared else ""
        if payload != self.published or self.stale:
            data, version = self._publish(payload)
            self.published = payload
        else:
            data, version = self._read()
        return self.record(data, version, now)

    def record(self, data: dict[str, str], version: str = "", now: float | None = None) -> dict[str, Any]:
        """What the ConfigMap says of the other replicas becomes the `remote` rows; returns it.

        Two paths deliver versions of the ConfigMap (the watch, and this replica's own writes
        and reads), in any order: a version older than the one recorded is ignored, so an old
        snapshot never replaces a newer one.
        """
        now = time.time() if now is None else now
        with self.lock:
            if _older(version, self.recorded_version):
                return self.last_recorded
            self.recorded_version = version or self.recorded_version
        if self.published and data.get(self.key) != self.published:
            # Our key is gone or not ours (deleted as stale by a replica that read it just before
            # we republished): publish it again on the next round.
            self.published = ""
        self.replicas = max(1, len({k for k in data if k.endswith(".json")} | {self.key}))
        today = window_start(now, DAY)
        spend: dict[str, Spend] = {}
        learning: dict[str, Learning] = {}
        held: dict[str, Held] = {}
        resting: dict[str, Resting] = {}
        rollouts: dict[str, Rollouts] = {}
        for key, raw in data.items():
            if key == self.key or not key.endswith(".json"):
                continue
            decoded = decode(raw)
            if decoded is None:
                log.warning("ignoring unreadable state of %s in ConfigMap %s/%s", key, self.namespace, self.name)
                continue
            day, their_spend, their_learning, their_held = decoded
            if day < today:
                # Not republished today. A live replica republishes on its first round of a day,
                # so only a key still of an earlier day well into today is a gone replica's.
                if now - today >= STALE_AFTER_SECONDS:
                    self.stale.add(key)  # removed with our next write
                continue
            replica = key.removesuffix(".json")
            spend[replica] = their_spend  # earlier days' buckets are ignored where spend is read
            learning[replica] = their_learning
            if their_held:
                held[replica] = their_held
            if their_resting := decode_resting(raw):
                resting[replica] = their_resting
            if their_rollouts := decode_rollouts(raw):
                rollouts[replica] = their_rollouts
        with self.lock:
            self.ledger.set_remote(spend, held)
            if self.cooldowns is not None:
                self.cooldowns.set_remote(resting)
            if self.rollouts is not None:
                self.rollouts.set_remote(rollouts)
            if self.learning is not None:
                self.learning.set_remote(learning)
            self.last_recorded = {"spend": spend, "learning": learning, "held": held}
        return self.last_recorded

    def _publish(self, payload: str) -> tuple[dict[str, str], str]:
        changes: dict[str, str | None] = dict.fromkeys(self.stale)
        if payload:
            changes[self.key] = payload
        try:
            cm = self.core.patch_namespaced_config_map(
                self.name, self.namespace, {"data": changes}, _content_type=_MERGE_PATCH
            )
        except kubernetes.client.rest.ApiException as exc:
            if exc.status != 404:
                raise
            body = kubernetes.client.V1ConfigMap(
                metadata=kubernetes.client.V1ObjectMeta(
                    name=self.name, namespace=self.namespace, labels={"app.kubernetes.io/part-of": "signalbox"}
                ),
                data={k: v for k, v in changes.items() if v is not None},
            )
            try:
                cm = self.core.create_namespaced_config_map(self.namespace, body)
            except kubernetes.client.rest.ApiException as again:
                if again.status != 409:  # another replica created it first: patch next round
                    raise
                return self._read()
        self.stale.clear()
        return dict(cm.data or {}), _version(cm)

    def _read(self) -> tuple[dict[str, str], str]:
        try:
            cm = self.core.read_namespaced_config_map(self.name, self.namespace)
        except kubernetes.client.rest.ApiException as exc:
            if exc.status != 404:
                raise
            return {}, ""
        return dict(cm.data or {}), _version(cm)

    async def run(self, stop: asyncio.Event) -> None:
        watcher = asyncio.create_task(watch_configmap(self.core, self.namespace, self.name, self.record, stop))
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.sync_once)
            except Exception as exc:  # API restarts, RBAC mistakes: keep the last known spend, retry
                log.warning("cannot sync replica state with ConfigMap %s/%s: %s", self.namespace, self.name, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
        watcher.cancel()
