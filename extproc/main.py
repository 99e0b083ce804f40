"""Process entry of the ext_proc sidecar: serve, hot-reload the config, drain on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal

from .reload import TableHolder
from .runtime import default_key_resolver
from .server import serve

log = logging.getLogger("signalbox.extproc")
DRAIN_SECONDS = 10


async def _run(args: argparse.Namespace) -> int:
    tables = TableHolder(resolve_key=default_key_resolver(args.secrets_dir))
    if not tables.load_file(args.config):
        log.warning("starting with no routing config: every request gets 404 until %s is valid", args.config)
    if args.socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)
        address = f"unix:{args.socket}"
    else:
        address = args.address
    server, _ = await serve(tables, address, args.max_body_bytes)
    log.info("ext_proc listening on %s", address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(tables.watch(args.config, stop))
    await stop.wait()
    log.info("draining for up to %ss", DRAIN_SECONDS)
    await server.stop(DRAIN_SECONDS)
    watcher.cancel()
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
