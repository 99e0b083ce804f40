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
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
