"""Process entry of the ext_proc: serve, hot-reload the config, drain on SIGTERM.

`serve_until_stopped` is what both `signalbox extproc` and the gateway pod's sidecar
(`signalbox gateway-sidecar`, which adds the ConfigMap watch) run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from signalbox import parentwatch

from .capture import Capture
from .clusterfeed import ClusterFile
from .cooldown import Cooldowns
from .decisions import DecisionSigner
from .inflight import OpenRequests
from .learning import SharedLearning
from .ledger import SpendLedger
from .limits import EmbeddedLimits, LimitStore
from .metrics import Metrics
from .outliers import OutlierEvents
from .reload import TableHolder, replace_text
from .rolloutstats import RolloutStats
from .runtime import default_key_resolver
from .server import Processor, serve
from .sharedstate import (
    COOLDOWN_DB,
    DECISION_KEY,
    DEFAULT_EXTPROC_SOCKET,
    LEARNING_DB,
    LIMITS_DB,
    OPEN_DB,
    ROLLOUT_DB,
    SPEND_DB,
)
from .strategies import SelectionState

log = logging.getLogger("signalbox.extproc")
DRAIN_SECONDS = 10

Background = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


async def health_only_server(address: str, tables: TableHolder) -> tuple[grpc.aio.Server, int]:
    """gRPC health on TCP for kubelet's grpc probe (readiness). The processor itself stays on
    the Unix socket: its upstream-phase answers carry API keys and must never be reachable off-pod.

    Ready once a routing config is in force: a gateway whose first config could not be loaded
    (it would answer every request 404) stays out of its Service, so a bad data-plane rollout
    stops there. A later reload that fails keeps the last good config, and readiness.
    """
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    await servicer.set("", serving if tables.loaded else not_serving)
    loop = asyncio.get_running_loop()
    tables.on_install.append(lambda: loop.create_task(servicer.set("", serving)))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


class _PeerClosedFirst(logging.Filter):
    """grpcio logs an ERROR with a traceback when it cannot send the final status of an RPC
    whose peer already closed it (grpc/grpc#32551: `ExecuteBatchError` with only a
    `SendStatusFromServerOperation`). Envoy does that routinely: once it has the answer it
    needs, it may end the stream before our handler returns. Nothing was lost, so it is not an
    error: the record is dropped and counted."""

    def __init__(self, metrics: Metrics):
        super().__init__()
        self.metrics = metrics

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        benign = (
            type(exc).__name__ == "ExecuteBatchError"
            and "SendStatusFromServerOperation" in str(exc)
            and ("SendMessageOperation" not in str(exc))
        )
        if benign:
            self.metrics.streams_closed_by_envoy.inc()
        return not benign


def listen_address(args: argparse.Namespace) -> str:
    """A Unix socket unless TCP is asked for: the processor's answers carry provider keys, so by
    default nothing off this machine (or outside this pod) can reach it."""
    if getattr(args, "address", None):
        return str(args.address)
    path = getattr(args, "socket", None) or DEFAULT_EXTPROC_SOCKET
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return f"unix:{path}"


def limit_store_of(args: argparse.Namespace) -> LimitStore:
    """Redis when one is named (every replica shares the counters), else SQLite in the state
    directory (this replica's workers share them)."""
    url = getattr(args, "redis_url", "")
    if url:
        from .redislimits import RedisLimits  # redis.asyncio only where it is used

        return RedisLimits(url, password=os.environ.get("SIGNALBOX_REDIS_PASSWORD"))
    state_dir = getattr(args, "state_dir", None)
    return EmbeddedLimits(Path(state_dir) / LIMITS_DB if state_dir else None)


def decision_signer(args: argparse.Namespace) -> DecisionSigner:
    """The key every worker (and, through a Secret, every replica) signs decision tokens with."""
    key_file = getattr(args, "decision_key_file", None)
    if key_file:
        return DecisionSigner.from_file(key_file)
    state_dir = getattr(args, "state_dir", None)
    if state_dir:
        return DecisionSigner.from_file(Path(state_dir) / DECISION_KEY, create=True)
    return DecisionSigner()


def publish_address(path: Path, address: str) -> None:
    """Write the bound address where the starter polls for it, by rename: the starter waits
    for the file to exist and reads it at once, and a file created then written was seen
    empty (a `signalbox up` that failed to start in CI)."""
    replace_text(path, address)


async def serve_until_stopped(args: argparse.Namespace, background: tuple[Background, ...] = ()) -> int:
    metrics = Metrics()
    logging.getLogger("grpc._cython.cygrpc").addFilter(_PeerClosedFirst(metrics))
    tables = TableHolder(resolve_key=default_key_resolver(args.secrets_dir), metrics=metrics)
    if not Path(args.config).exists():
        # Its writer starts later or is still compiling (`signalbox up` starts the workers
        # while it compiles); the config watch loads it once it is written.
        log.info("waiting for the routing config at %s", args.config)
    elif not tables.load_file(args.config):
        log.warning("starting with no routing config: every request gets 404 until %s is valid", args.config)
    address = listen_address(args)
    state_dir = getattr(args, "state_dir", None)
    ledger = SpendLedger(Path(state_dir) / SPEND_DB if state_dir else None)
    learning = SharedLearning(Path(state_dir) / LEARNING_DB) if state_dir else None
    open_requests = OpenRequests(Path(state_dir) / OPEN_DB if state_dir else None)
    cooldowns = Cooldowns(Path(state_dir) / COOLDOWN_DB if state_dir else None)
    rollout_stats = RolloutStats(Path(state_dir) / ROLLOUT_DB if state_dir else None)
    accounting = not getattr(args, "no_accounting", False)
    signer = decision_signer(args)
    limit_store = limit_store_of(args)
    processor = Processor(
        tables,
        SelectionState(shared=learning, cooldowns=cooldowns),
        args.max_body_bytes,
        metrics=metrics,
        ledger=ledger,
        accounting=accounting,
        signer=signer,
        open_requests=open_requests,
        limit_store=limit_store,
        capture=Capture(args.capture_prompts) if getattr(args, "capture_prompts", "") else None,
        rollout_stats=rollout_stats,
    )
    # Envoy's clusters, for the worker that holds Envoy's ADS stream (extproc.clusterfeed).
    clusters = ClusterFile(args.clusters) if getattr(args, "clusters", None) else None
    server, _ = await serve(tables, address, args.max_body_bytes, processor=processor, clusters=clusters)
    health_server = (await health_only_server(args.health_address, tables))[0] if args.health_address else None
    admin_runner = None
    if getattr(args, "admin_address", None):
        host, _, port = args.admin_address.rpartition(":")
        token = Path(args.admin_token_file).read_text().strip() if getattr(args, "admin_token_file", None) else ""
        from . import admin  # aiohttp's server: only in the worker that serves the admin API

        admin_runner, bound = await admin.start(processor, host or "127.0.0.1", int(port), token)
        if getattr(args, "admin_address_file", None):
            # Port 0 binds a free port; whoever started us reads which one here.
            publish_address(Path(args.admin_address_file), f"{host or '127.0.0.1'}:{bound}")
        log.info("admin API on http://%s:%s", host or "127.0.0.1", bound)
    log.info("ext_proc listening on %s", address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(tables.watch(args.config, stop), name="config-watch")]
    if clusters is not None:
        tasks.append(asyncio.create_task(clusters.watch(stop), name="clusters-watch"))
    if getattr(args, "outlier_events", ""):
        outliers = OutlierEvents(args.outlier_events, tables, cooldowns, metrics)
        tasks.append(asyncio.create_task(outliers.run(stop), name="outlier-events"))
    if getattr(args, "parent_pid", 0):
        tasks.append(asyncio.create_task(parentwatch.stop_with_parent(args.parent_pid, stop), name="parent-watch"))
    tasks += [asyncio.create_task(job(stop), name=getattr(job, "__name__", "background")) for job in background]
    failed: list[str] = []

    def stop_if_died(task: asyncio.Task[None]) -> None:
        # A watch or sync task that ends while we serve leaves a gateway that silently stops
        # following its config: stop loudly, so the supervisor (kubelet, `signalbox up`) restarts us.
        if stop.is_set() or task.cancelled():
            return
        exc = task.exception()
        log.critical("background task %s ended unexpectedly: %r; stopping", task.get_name(), exc)
        failed.append(task.get_name())
        stop.set()

    for task in tasks:
        task.add_done_callback(stop_if_died)
    await stop.wait()
    log.info("draining for up to %ss", DRAIN_SECONDS)
    await server.stop(DRAIN_SECONDS)
    if health_server is not None:
        await health_server.stop(0)
    if admin_runner is not None:
        await admin_runner.cleanup()
    await processor.llm.close()
    await processor.mirrors.close()
    ledger.close()
    rollout_stats.close()  # what it counted since its last flush
    limit_store.close()
    if learning is not None:
        learning.close()
    for task in tasks:
        task.cancel()
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(serve_until_stopped(args))
