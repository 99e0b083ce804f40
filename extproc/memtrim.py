"""Give the C heap's free memory back to the system after a large, passing allocation.

Why: glibc keeps freed memory in its heaps for reuse, and a worker's RSS is what a pod's limit
and the scale bench count. Sending Envoy's 17,712 clusters at the large fleet's start
(extproc.clusterfeed) left a worker 12.5 MB larger, of which 4.6 MB is what it keeps; the rest
was free but still held (`malloc_trim` returned it). Without glibc (musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the free memory of every malloc arena to the system (some milliseconds)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
