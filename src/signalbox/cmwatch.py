"""Watching one ConfigMap by name for as long as the process runs.

The gateway's two readers of the Kubernetes API (config-sync for the routing config, replica
sync for the other replicas' state) need the same thing: each version of one ConfigMap's data
as soon as the API server has it, re-watching after a quiet watch's read timeout or an API
server restart. The watch itself blocks, so it runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import kubernetes

log = logging.getLogger("signalbox.cmwatch")

OnData = Callable[[dict[str, str]], object]


def _watch_once(core: Any, namespace: str, name: str, on_data: OnData, stop: asyncio.Event) -> None:
    stream = kubernetes.watch.Watch()
    try:
        for event in stream.stream(
            core.list_namespaced_config_map,
            namespace,
            field_selector=f"metadata.name={name}",
            _request_timeout=(5, 5),
        ):
            if stop.is_set():
                return
            obj: Any = event["object"]
            if obj.metadata.name == name and event["type"] in ("ADDED", "MODIFIED"):
                on_data(dict(obj.data or {}))
    finally:
        stream.stop()


async def watch_configmap(core: Any, namespace: str, name: str, on_data: OnData, stop: asyncio.Event) -> None:
    """Call `on_data` with the ConfigMap's data on every ADDED/MODIFIED event until `stop`."""
    while not stop.is_set():
        try:
            await asyncio.to_thread(_watch_once, core, namespace, name, on_data, stop)
        except Exception as exc:  # read timeouts on a quiet watch, API restarts: re-watch
            if not stop.is_set():
                log.debug("re-watching ConfigMap %s/%s after: %s", namespace, name, exc)
                await asyncio.sleep(0.2)
