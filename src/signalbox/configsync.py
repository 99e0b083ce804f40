"""`signalbox config-sync`: the gateway pod's link to the operator's ConfigMap.

It *watches* the ConfigMap through the Kubernetes API (a mounted ConfigMap reaches a pod only
at the next kubelet sync, up to a minute later) and writes the routing config and the Envoy
resources generated from it into the directory the ext_proc and Envoy watch. A ConfigMap it
cannot parse, or of a schema version this gateway does not know, changes nothing: the last good
files stay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import kubernetes
from google.protobuf import json_format

from signalbox import gatewayfiles
from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core import envoygen
from signalbox.core.compiler import SCHEMA_VERSION

log = logging.getLogger("signalbox.configsync")
CONFIG_KEY = "routing-config.json"


class ConfigSync:
    def __init__(
        self,
        client: kubernetes.client.ApiClient,
        namespace: str,
        name: str,
        workdir: Path,
        options: envoygen.GatewayOptions,
    ):
        self.core = kubernetes.client.CoreV1Api(client)
        self.namespace, self.name = namespace, name
        self.workdir = workdir
        self.options = options
        self.content_hash = ""
        self.applied: list[tuple[int, float]] = []  # (generation, monotonic time written)

    def apply(self, data: dict[str, str] | None) -> bool:
        """Write the files for this ConfigMap data; False (and nothing written) if unusable."""
        raw = (data or {}).get(CONFIG_KEY)
        if not raw:
            return False
        try:
            cfg = json_format.Parse(raw, pb.RoutingConfig())
        except json_format.ParseError as exc:
            log.error("ignoring ConfigMap %s/%s: %s", self.namespace, self.name, exc)
            return False
        if cfg.schema_version != SCHEMA_VERSION:
            log.error(
                "ignoring routing config schema version %s (this gateway reads %s)", cfg.schema_version, SCHEMA_VERSION
            )
            return False
        if cfg.content_hash == self.content_hash:
            return True
        gatewayfiles.publish(cfg, self.workdir, self.options)
        self.content_hash = cfg.content_hash
        self.applied.append((cfg.generation, time.monotonic()))
        log.info("wrote routing config generation %s", cfg.generation)
        return True

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
                if obj.metadata.name == self.name and event["type"] in ("ADDED", "MODIFIED"):
                    self.apply(obj.data)
        finally:
            stream.stop()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(self._watch_once, stop)
            except Exception as exc:  # read timeouts on a quiet watch, API restarts: re-watch
                if not stop.is_set():
                    log.debug("re-watching ConfigMap after: %s", exc)
                    await asyncio.sleep(0.2)
