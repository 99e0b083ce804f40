"""Counting this machine's TCP connections, for the benches and tests that check what Envoy
holds open to a provider."""

from __future__ import annotations

import os
from pathlib import Path

# /proc/net/tcp's state for an established connection.
_ESTABLISHED = "01"


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process `pid` has open (its /proc/<pid>/fd links)."""
    inodes = set()
    folder = f"/proc/{pid}/fd"
    for fd in os.listdir(folder):
        try:
            target = os.readlink(f"{folder}/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def established_to(port: int, pid: int | None = None) -> int:
    """Established TCP connections whose far end is `port` on this machine: the clients' side,
    so the connections to a fake provider listening there, of process `pid` alone if given
    (Envoy's, where other gateways may reach the same fake). From Linux's /proc/net/tcp and
    tcp6; 0 where neither can be read."""
    owned = _socket_inodes(pid) if pid is not None else None
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if state == _ESTABLISHED and int(remote.rsplit(":", 1)[1], 16) == port:
                count += owned is None or inode in owned
    return count
