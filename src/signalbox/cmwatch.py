"""Watching one ConfigMap by name for as long as the process runs.

The gateway's two readers of the Kubernetes API (config-sync for the routing config, replica
sync for the other replicas' state) need the same thing: each version of one ConfigMap's data
as soon as the API server has it, and nothing twice.

So the watch is what kopf's watcher does: list once, then watch from the list's
`resourceVersion`; when a watch ends (the server's timeout on a quiet watch, a dropped
connection) it resumes from the last version it saw, so nothing is re-delivered; only a 410
Gone (that version has been compacted away) makes it list again. Errors back off
exponentially and are logged at warning; the routine end of a quiet watch is not an error.
The watch itself blocks, so it runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kubernetes

log = logging.getLogger("signalbox.cmwatch")

# Called with the ConfigMap's data and its resourceVersion.
OnData = Callable[[dict[str, str], str], object]
# The server ends a watch after WATCH_SECONDS (a clean end, resumed at once). The client gives
# up on a connection silent for READ_TIMEOUT: a silent watch is then resumed from its
# resourceVersion (one cheap request, nothing re-delivered), and a stopping process never
# waits longer than that for its watch thread.
WATCH_SECONDS = 60
READ_TIMEOUT = 5
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 10.0
GONE = 410


@dataclass
class WatchState:
    """Where the next watch resumes: the last resourceVersion seen ("" means list first)."""

    resource_version: str = ""
    # Watches started, and lists among them (for tests and logs: a resume is not a re-list).
    watches: int = 0
    lists: int = 0
    # The data last handed on: a watch that starts over (an API server, or an emulator, that
    # replays the current object) never hands the same data on twice.
    delivered: dict[str, str] | None = None

    def deliver(self, on_data: OnData, data: dict[str, str], version: str) -> None:
        if data == self.delivered:
            return
        self.delivered = data
        on_data(data, version)


def _watch_once(core: Any, namespace: str, name: str, on_data: OnData, stop: asyncio.Event, state: WatchState) -> None:
    stream = kubernetes.watch.Watch()
    kwargs: dict[str, Any] = {
        "field_selector": f"metadata.name={name}",
        "timeout_seconds": WATCH_SECONDS,  # also makes a 410 an exception rather than a silent retry
        "_request_timeout": (5, READ_TIMEOUT),
    }
    if state.resource_version:
        kwargs["resource_version"] = state.resource_version
        kwargs["allow_watch_bookmarks"] = True
    else:
        # List first: the current object and the version to watch from, delivered once.
        listing = core.list_namespaced_config_map(namespace, field_selector=kwargs["field_selector"])
        state.lists += 1
        for item in listing.items:
            if item.metadata.name == name:
                state.deliver(on_data, dict(item.data or {}), item.metadata.resource_version or "")
        state.resource_version = listing.metadata.resource_version or ""
        kwargs["resource_version"] = state.resource_version
    state.watches += 1
    try:
        for event in stream.stream(core.list_namespaced_config_map, namespace, **kwargs):
            if stop.is_set():
                return
            obj: Any = event["object"]
            version = getattr(obj.metadata, "resource_version", None) if getattr(obj, "metadata", None) else None
            if version:
                state.resource_version = version
            if event["type"] in ("ADDED", "MODIFIED") and obj.metadata.name == name:
                state.deliver(on_data, dict(obj.data or {}), version or "")
    finally:
        stream.stop()


def _is_quiet_end(exc: BaseException) -> bool:
    """A read timeout on a silent connection: resume, it is not worth a warning."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return "timeout" in text or "timed out" in text


async def watch_configmap(
    core: Any, namespace: str, name: str, on_data: OnData, stop: asyncio.Event, state: WatchState | None = None
) -> None:
    """Call `on_data` with the ConfigMap's data once per version, until `stop`."""
    state = state or WatchState()
    delay = BACKOFF_FIRST
    while not stop.is_set():
        try:
            await asyncio.to_thread(_watch_once, core, namespace, name, on_data, stop, state)
            delay = BACKOFF_FIRST  # a clean end of a watch: resume from where it was
            continue
        except kubernetes.client.rest.ApiException as exc:
            if exc.status == GONE:
                log.info("ConfigMap %s/%s: resourceVersion expired (410); listing again", namespace, name)
                state.resource_version = ""
                continue
            log.warning("watching ConfigMap %s/%s failed: HTTP %s %s", namespace, name, exc.status, exc.reason)
        except Exception as exc:
            if stop.is_set():
                return
            if _is_quiet_end(exc):
                log.debug("ConfigMap %s/%s watch timed out; resuming", namespace, name)
                continue
            log.warning("watching ConfigMap %s/%s failed: %s; retrying in %.1f s", namespace, name, exc, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        delay = min(delay * 2, BACKOFF_MAX)
