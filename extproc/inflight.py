"""Requests open per backend, shared by the ext_proc workers of one gateway (SQLite, `sharedstate`).

`least-busy` picks the backend serving the fewest requests. The router phase opens a row when it
decides (keyed by the request id Envoy gives every request); the request's access log entry,
which may reach another worker, closes it. So no gRPC stream is held for the request's length,
and every worker counts every worker's requests. A row whose entry never comes (the request
ended while the ext_proc restarted; the file outlives it) lapses at `until`, the policy's
timeout plus slack, so a count cannot drift upwards.
"""

from __future__ import annotations

from pathlib import Path

from .sharedstate import connect

_SCHEMA = """
CREATE TABLE IF NOT EXISTS open_requests (
  request TEXT PRIMARY KEY, backend TEXT NOT NULL, until REAL NOT NULL);
"""
# How often lapsed rows are deleted (counting ignores them anyway).
PRUNE_SECONDS = 30.0


class OpenRequests:
    def __init__(self, path: str | Path | None = None):
        self.db = connect(path, _SCHEMA)
        self._pruned_at = float("-inf")

    def close(self) -> None:
        self.db.close()

    def begin(self, request_id: str, backend: str, until: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO open_requests VALUES (?, ?, ?)", (request_id, backend, until))

    def end(self, request_id: str) -> None:
        self.db.execute("DELETE FROM open_requests WHERE request = ?", (request_id,))

    def counts(self, now: float) -> dict[str, int]:
        """Backend id -> requests open on it now."""
        if now - self._pruned_at > PRUNE_SECONDS:
            self._pruned_at = now
            self.db.execute("DELETE FROM open_requests WHERE until <= ?", (now,))
        rows = self.db.execute(
            "SELECT backend, COUNT(*) FROM open_requests WHERE until > ? GROUP BY backend", (now,)
        ).fetchall()
        return dict(rows)
