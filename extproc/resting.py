"""The resting file: which backends cool down, for Envoy's health checks of every backend.

Envoy checks each backend's health against its own health listener, whose Lua filter
(core/resting.lua) answers from this file: 503 for a backend listed with a time still to come.
One ext_proc worker per gateway (the one serving the admin API) writes it, by rename, whenever
the set of resting backends or their ends change (all workers' and other replicas' rests, as
`Cooldowns.active` gives them). So the checks of thousands of backends never reach Python (at
2,000 providers they were 10,000 HTTP requests at each start, answered by that worker), and
they keep their answers while the ext_proc restarts: each rest ends at its time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger("signalbox.extproc")

# How often the set is compared with the file's: a new rest reaches Envoy's next check of that
# backend within this, plus its check interval.
EVERY_S = 0.25


def render(active: Mapping[str, tuple[float, str]]) -> str:
    """One `<backend id>\\t<until>` line per resting backend, in id order (equal sets, equal
    text: the file is rewritten only when it changes). Ids never hold control characters (they
    are Kubernetes names and model names joined by `/`), but one that would is left out rather
    than misread (its backend then rests only in the ext_proc's own choices)."""
    lines = [f"{b}\t{until:.3f}\n" for b, (until, _reason) in sorted(active.items()) if listable(b)]
    return "".join(lines)


def listable(backend_id: str) -> bool:
    return not any(ord(c) < 32 or ord(c) == 127 for c in backend_id)


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # Envoy's reader sees the old file or the new one, never half


class RestingFile:
    def __init__(self, path: str | Path, active: Callable[[], Mapping[str, tuple[float, str]]]):
        self.path, self.active = Path(path), active
        self._written: str | None = None

    def sync(self) -> bool:
        """Write the file if what rests changed; whether it was written."""
        text = render(self.active())
        if text == self._written:
            return False
        write(self.path, text)
        self._written = text
        return True

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self.sync()
            except OSError as exc:
                # Envoy keeps answering from the last file; the next round tries again.
                log.warning("could not write the resting file %s: %s", self.path, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), EVERY_S)
