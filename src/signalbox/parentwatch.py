"""A child of `signalbox up` stops when `signalbox up` is gone.

`signalbox up` stops what it started when it is asked to (SIGTERM, Ctrl-C, a failed start); when
it is killed (SIGKILL, a crash, the OOM killer) it cannot, and its ext_proc workers and fake
providers kept running for good, holding the gateway's sockets, ports and state files (Envoy
went with it). A process whose parent dies is handed to another (init or a subreaper), so its
parent pid changes: each child started with `--parent-pid` polls for that and stops as it would
on SIGTERM. Polling rather than Linux's PR_SET_PDEATHSIG: that fires when the parent *thread*
that started the child ends, and `signalbox up` restarts dead workers from a thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

log = logging.getLogger(__name__)

CHECK_S = 1.0


async def stop_with_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Set `stop` once the process `parent_pid` is no longer this one's parent; return early if
    `stop` is set otherwise."""
    while os.getppid() == parent_pid:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), CHECK_S)
        if stop.is_set():
            return
    log.warning("the process that started this one (pid %d) is gone: stopping", parent_pid)
    stop.set()
