"""SQLite files shared by the ext_proc workers of one gateway (`<workdir>/state/*.db`).

One replica runs several ext_proc workers (one per core locally); what one counts or learns
the others must see. A file they all open does that with no extra process: WAL mode (readers
never wait for the writer), autocommit (no worker holds a lock across an await), and without
a path, an in-memory database for a single process and tests.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from pathlib import Path

# The files in a gateway's state directory (`--state-dir`).
SPEND_DB = "spend.db"
LEARNING_DB = "learning.db"
OPEN_DB = "open.db"
COOLDOWN_DB = "cooldown.db"
# Rollout figures and pauses (rolloutstats.py).
ROLLOUT_DB = "rollout.db"
# Consumer and policy limit counters, when no Redis is configured (limits.EmbeddedLimits).
LIMITS_DB = "limits.db"
# The key that signs decision tokens (decisions.py), made by the first worker that starts.
DECISION_KEY = "decision.key"
# Where `signalbox extproc` listens without --socket or --address.
DEFAULT_EXTPROC_SOCKET = os.path.join(tempfile.gettempdir(), "signalbox-extproc.sock")


def connect(path: str | Path | None, schema: str) -> sqlite3.Connection:
    target = str(path) if path else ":memory:"
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=5.0)
    # Workers start together: switching a new file to WAL needs a lock another may hold.
    attempt = 0
    while True:
        try:
            if path:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(schema)
            return db
        except sqlite3.OperationalError as exc:
            attempt += 1
            if "locked" not in str(exc) or attempt == 50:
                raise
            time.sleep(0.02 * attempt)
