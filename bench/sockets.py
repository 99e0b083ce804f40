"""Counting this machine's TCP connections, for the benches and tests that check what Envoy
holds open to a provider."""

from __future__ import annotations

from pathlib import Path

# /proc/net/tcp's state for an established connection.
_ESTABLISHED = "01"


def established_to(port: int) -> int:
    """Established TCP connections whose far end is `port` on this machine: the clients' side,
    so Envoy's connections to a fake provider listening there (Linux's /proc/net/tcp and tcp6;
    0 where neither can be read)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote, state = fields[2], fields[3]
            count += state == _ESTABLISHED and int(remote.rsplit(":", 1)[1], 16) == port
    return count
