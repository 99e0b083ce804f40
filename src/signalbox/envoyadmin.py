"""What the publishers ask Envoy's admin interface (on a 127.0.0.1 port, or a Unix socket in a
pod): which ports its listeners bound, and whether the clusters it was given have warmed."""

from __future__ import annotations

from typing import Any

import httpx


def _get(admin: int | str, path: str) -> Any:
    transport = httpx.HTTPTransport(uds=admin) if isinstance(admin, str) else None
    base = "http://envoy" if isinstance(admin, str) else f"http://127.0.0.1:{admin}"
    try:
        with httpx.Client(transport=transport, timeout=1) as client:
            return client.get(f"{base}{path}").json()
    except (httpx.HTTPError, ValueError) as exc:
        raise OSError(f"Envoy's admin interface did not answer: {exc}") from None


def listener_ports(admin: int | str) -> dict[str, int]:
    """The ports Envoy's listeners are bound to, by listener name (for listeners on port 0).

    `admin` is Envoy's admin port on 127.0.0.1, or the path of its admin Unix socket.
    """
    # No listener yet (Envoy still loading its clusters): an empty object, not an error.
    listeners = _get(admin, "/listeners?format=json").get("listener_statuses", [])
    return {
        listener["name"]: int(listener["local_address"]["socket_address"]["port_value"])
        for listener in listeners
        if "socket_address" in listener.get("local_address", {})
    }


def clusters_warm(admin: int | str) -> bool:
    """Whether Envoy has read its clusters file at least once and no cluster is still warming
    (an EDS cluster warms until its endpoints arrive); False while Envoy does not answer."""
    try:
        stats = _get(admin, "/stats?format=json&filter=^cluster_manager\\.(warming_clusters|cds\\.update_success)$")
    except OSError:
        return False
    values = {s["name"]: s.get("value", 0) for s in stats.get("stats", []) if "name" in s}
    return (
        values.get("cluster_manager.cds.update_success", 0) >= 1
        and values.get("cluster_manager.warming_clusters", 1) == 0
    )
