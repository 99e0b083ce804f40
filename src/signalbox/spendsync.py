"""Budget spend shared across gateway replicas, through one ConfigMap in the Kubernetes API.

Each replica owns one key of the ConfigMap (`<replica>.json`: its spend of the current UTC day,
policy -> hourly bucket -> USD) and writes it with a JSON merge patch, which touches only that
key: replicas never conflict and need no resourceVersion dance. It writes only when its spend
changed, at most once per interval, and *watches* the ConfigMap, so the others' spend reaches
its ledger (`remote` rows, added by the router phase to its own exact spend) as soon as they
publish it. The lag is therefore at most one interval plus a watch event
(tests/operator/test_spend_sync.py measures it).

A replica's key outlives the replica: its spend still counts until the day ends, so a restart
or a scale-down does not hand back money already spent. Keys with nothing of the current day
are deleted by whichever replica notices first.
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

from signalbox.extproc.budget import DAY, window_start
from signalbox.extproc.ledger import SpendLedger

log = logging.getLogger("signalbox.spendsync")
DEFAULT_INTERVAL = 2.0
_MERGE_PATCH = "application/merge-patch+json"

# replica -> policy id -> bucket start -> USD
Spend = dict[str, dict[str, dict[int, float]]]


def encode(spend: dict[str, dict[int, float]]) -> str:
    return json.dumps(
        {policy: {str(b): usd for b, usd in sorted(buckets.items())} for policy, buckets in sorted(spend.items())},
        sort_keys=True,
        separators=(",", ":"),
    )


def decode(raw: str, since: int) -> dict[str, dict[int, float]] | None:
    """A replica's published spend from `since` on; None if the value is not ours to read."""
    try:
        data = json.loads(raw)
        return {
            str(policy): {int(b): float(usd) for b, usd in buckets.items() if int(b) >= since}
            for policy, buckets in data.items()
        }
    except (ValueError, TypeError, AttributeError):
        return None


class SpendSync:
    def __init__(
        self,
        client: kubernetes.client.ApiClient,
        namespace: str,
        name: str,
        replica: str,
        ledger: SpendLedger,
        interval: float = DEFAULT_INTERVAL,
    ):
        self.core = kubernetes.client.CoreV1Api(client)
        self.namespace, self.name = namespace, name
        self.key = f"{replica}.json"
        self.ledger = ledger
        self.interval = interval
        self.stale: set[str] = set()
        self.published: dict[str, dict[int, float]] = {}
        # The watch thread and the publishing thread both record into the ledger.
        self.lock = threading.Lock()

    def sync_once(self, now: float | None = None) -> Spend:
        """Publish this replica's spend if it changed (else read) and record the others'."""
        now = time.time() if now is None else now
        local = self.ledger.local(now)
        if local != self.published or self.stale:
            data = self._publish(local)
            self.published = local
        else:
            data = self._read()
        return self.record(data, now)

    def record(self, data: dict[str, str], now: float | None = None) -> Spend:
        """What the ConfigMap says of the other replicas becomes the ledger's `remote` rows."""
        now = time.time() if now is None else now
        with self.lock:
            remote = self._remote(data, window_start(now, DAY))
            self.ledger.set_remote(remote)
        return remote

    def _publish(self, local: dict[str, dict[int, float]]) -> dict[str, str]:
        changes: dict[str, str | None] = dict.fromkeys(self.stale)
        if local:
            changes[self.key] = encode(local)
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
        return dict(cm.data or {})

    def _read(self) -> dict[str, str]:
        try:
            cm = self.core.read_namespaced_config_map(self.name, self.namespace)
        except kubernetes.client.rest.ApiException as exc:
            if exc.status != 404:
                raise
            return {}
        return dict(cm.data or {})

    def _remote(self, data: dict[str, str], since: int) -> Spend:
        remote: Spend = {}
        for key, raw in data.items():
            if key == self.key or not key.endswith(".json"):
                continue
            spend = decode(raw, since)
            if spend is None:
                log.warning("ignoring unreadable spend of %s in ConfigMap %s/%s", key, self.namespace, self.name)
                continue
            spend = {policy: buckets for policy, buckets in spend.items() if buckets}
            if spend:
                remote[key.removesuffix(".json")] = spend
            else:
                self.stale.add(key)  # nothing of today left: removed with our next write
        return remote

    def _watch_once(self, stop: asyncio.Event) -> None:
        stream = kubernetes.watch.Watch()
        try:
            for event in stream.stream(
                self.core.list_namespaced_config_map,
                self.namespace,
                field_selector=f"metadata.name={self.name}",
                _request_timeout=(5, 5),
            ):
                if stop.is_set():
                    return
                obj: Any = event["object"]
                if event["type"] in ("ADDED", "MODIFIED"):
                    self.record(dict(obj.data or {}))
        finally:
            stream.stop()

    async def _watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(self._watch_once, stop)
            except Exception as exc:  # read timeouts on a quiet watch, API restarts: re-watch
                if not stop.is_set():
                    log.debug("re-watching spend ConfigMap after: %s", exc)
                    await asyncio.sleep(0.2)

    async def run(self, stop: asyncio.Event) -> None:
        watcher = asyncio.create_task(self._watch(stop))
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.sync_once)
            except Exception as exc:  # API restarts, RBAC mistakes: keep the last known spend, retry
                log.warning("cannot sync budget spend with ConfigMap %s/%s: %s", self.namespace, self.name, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
        watcher.cancel()
