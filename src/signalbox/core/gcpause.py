"""Python's cyclic garbage collector paused while a whole config is built.

Compiling a large fleet and generating its Envoy resources allocate millions of dicts and
lists that all stay alive until the result is written. The collector's full passes walk all
of them again and again and find nothing to free: at the 2,000-provider fleet they were a third
to a half of the generation time (1.9-3.1 s against 1.2-1.4 s, bench/README.md, issue 12),
and every policy change pays that before it reaches traffic. Reference counting still frees
everything as usual; cycles made meanwhile are collected once the collector runs again.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any


class paused_gc(contextlib.ContextDecorator):
    """Pause the collector for the block or decorated call; nested uses leave it to the
    outermost, and it is never enabled here if it was off before."""

    def __enter__(self) -> paused_gc:
        self._was_enabled = gc.isenabled()
        gc.disable()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._was_enabled:
            gc.enable()
