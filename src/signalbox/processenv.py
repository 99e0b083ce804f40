"""Thread settings every Signalbox process takes before it imports numpy or tokenizers.

Imported first by the CLI (every `signalbox` process: ext_proc workers, the operator, `up`) and
by the benches that measure what a worker runs. A gateway runs one ext_proc worker per core, so
a library's own thread pool only competes with the other workers:

- OpenBLAS: its threads spun against the workers (the per-prompt memory's 8,192 x 256 product
  took 8 ms instead of 1 ms while another process was busy);
- tokenizers (Rust's rayon): a request's three segments encoded in parallel took the task-type
  tier 0.62 ms median against 0.41 ms on the calling thread alone (`bench/tiers.py`), and two
  threads more per worker.

Set only where not already set: an operator can still choose otherwise.

And one malloc setting (glibc only; `mallopt` at run time, as the environment variable would need
to be set before the process starts): blocks of 1 MiB or more are always mapped and unmapped on
their own. By default glibc raises that threshold to the size of any mapped block freed, and
serves later blocks of that size from its heaps, which keep them: a `/metrics` scrape's text
(12 MB at 2,600 backends with traffic), made in a thread, stayed in the worker after every
scrape. `MALLOC_MMAP_THRESHOLD_` in the environment still decides when set.
"""

from __future__ import annotations

import ctypes
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20


def _fixed_mmap_threshold() -> bool:
    """Whether the threshold was set here (False: not glibc, or the environment chose)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


MMAP_THRESHOLD_FIXED = _fixed_mmap_threshold()
