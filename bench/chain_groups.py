"""Does a route of priority groups walk a failover chain as an aggregate cluster does? (issue 12)

The gateway walks a chain with an aggregate cluster over the chain's backend clusters: an
attempt goes to the first member with a healthy host, a retry to the next. An aggregate costs
Envoy about 24 KB, and the 2,000-provider fleet starts with 3,432 of them
(`bench.cluster_cost`). Envoy 1.40's priority group cluster specifier can walk the same chain
from the route, one group per attempt (`refresh_cluster_on_retry`), with no cluster for the
chain; but it picks a group by the attempt's number alone, so a resting or ejected backend
would still get its attempt (in panic, Envoy sends to an unhealthy host rather than fail).

What this checks, on Envoy alone with three fake backends: each backend cluster carries a
second host, DEGRADED, at priority 1 (`bench.cluster_cost.resting_host`), an internal
listener that refuses at once with the header the retry policy retries on. Envoy sends to a
degraded host only while no healthy one is left, so a resting backend's attempt is refused
locally and the request moves to the next group, and the provider sees nothing. The same
clusters under an aggregate must keep their behaviour: a healthy later member is preferred
to a degraded earlier one. Exits 1 when an outcome differs from the expected one.

    python -m bench.chain_groups
"""

from __future__ import annotations

import http.server
import json
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.cluster_cost import (
    INTERNAL_LISTENER,
    RESTING_LISTENER,
    aggregate_cluster,
    groups_route,
    start_envoy,
    static_cluster,
)
from bench.dataplane import route_listener
from signalbox.local import free_port

RETRY_HEADER = "x-signalbox-retry"


class _Backend(http.server.BaseHTTPRequestHandler):
    """Answers its server's status with its server's name, and counts what it received."""

    def do_GET(self) -> None:
        self.server.received += 1  # type: ignore[attr-defined]
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _serve(name: str, status: int) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    server.name, server.status, server.received = name, status, 0  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _resting_listener() -> dict[str, Any]:
    """The internal listener a resting backend's degraded host names: a refusal (not a 5xx,
    which outlier detection would count against the host) marked for the retry policy."""
    listener = route_listener(0, [])
    del listener["address"]
    listener["name"] = RESTING_LISTENER
    listener["internal_listener"] = {}
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    manager["stat_prefix"] = "resting"
    manager["route_config"]["virtual_hosts"][0]["routes"] = [
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 429, "body": {"inline_string": "resting"}},
            "response_headers_to_add": [{"header": {"key": RETRY_HEADER, "value": "resting"}}],
        }
    ]
    return listener


_RETRY = {
    "retry_on": "5xx,retriable-headers",
    "retriable_headers": [{"name": RETRY_HEADER, "present_match": True}],
    "num_retries": 2,
    "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.05s"},
}
# An aggregate's retry moves to its next member (as `envoygen.listener._retry_policy`).
_NEXT_MEMBER = {
    "name": "envoy.retry_priorities.previous_priorities",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
        "update_frequency": 1,
    },
}

# (path, the chain, how it is walked, what the client gets) with A resting (its provider
# would answer 200), B failing with 503 and C answering 200.
CASES = [
    ("/groups/AC", ["A", "C"], "groups", "200 C"),
    ("/groups/BC", ["B", "C"], "groups", "200 C"),
    ("/groups/BA", ["B", "A"], "groups", "429 resting"),
    ("/aggregate/AC", ["A", "C"], "aggregate", "200 C"),
    ("/aggregate/BC", ["B", "C"], "aggregate", "200 C"),
    ("/aggregate/BA", ["B", "A"], "aggregate", "429 resting"),
]


def _routes() -> list[dict[str, Any]]:
    routes = []
    for path, members, walk, _ in CASES:
        if walk == "groups":
            route = groups_route(path, members)
            route["route"]["retry_policy"] = {**_RETRY, "refresh_cluster_on_retry": True}
        else:
            route = {
                "match": {"prefix": path},
                "route": {
                    "cluster": "chain" + "".join(members),
                    "retry_policy": {**_RETRY, "retry_priority": _NEXT_MEMBER},
                },
            }
        routes.append(route)
    return routes


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return f"{answer.status} {answer.read().decode()}"
    except urllib.error.HTTPError as err:
        return f"{err.code} {err.read().decode()}"


def _refusals(admin: int) -> int:
    """How many attempts the resting listener has refused so far."""
    url = f"http://127.0.0.1:{admin}/stats?filter=^http.resting.downstream_rq_total$&format=json"
    with urllib.request.urlopen(url, timeout=5) as r:
        stats = json.loads(r.read())["stats"]
    return int(stats[0]["value"]) if stats else 0


def main() -> int:
    servers = {"A": _serve("A", 200), "B": _serve("B", 503), "C": _serve("C", 200)}
    health = {"A": "UNHEALTHY", "B": "HEALTHY", "C": "HEALTHY"}
    clusters = [static_cluster(n, s.server_address[1], health[n], resting=True) for n, s in servers.items()]
    clusters += [aggregate_cluster("chain" + "".join(m), m) for _, m, walk, _ in CASES if walk == "aggregate"]
    for cluster in clusters:
        del cluster["@type"]  # static clusters are Cluster messages, not Any
    port, admin = free_port(), free_port()
    bootstrap = {
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "bootstrap_extensions": [INTERNAL_LISTENER],
        "static_resources": {"clusters": clusters, "listeners": [route_listener(port, _routes()), _resting_listener()]},
    }
    work = Path(tempfile.mkdtemp(prefix="signalbox-chain-groups-"))
    envoy, _ = start_envoy(work, bootstrap, admin, concurrency=1, timeout=30)
    failed = 0
    try:
        print("A rests (its provider would answer 200), B answers 503, C answers 200")
        for path, members, walk, expected in CASES:
            before = _refusals(admin)
            got = [_get(f"http://127.0.0.1:{port}{path}") for _ in range(5)]
            ok = all(g == expected for g in got)
            failed += not ok
            print(
                f"{walk:9} {' -> '.join(members)}: {got[0]!r} x{got.count(got[0])} (expected {expected!r}); "
                f"attempts refused at the resting listener: {_refusals(admin) - before}"
            )
        received = servers["A"].received  # type: ignore[attr-defined]
        print(f"requests that reached the resting backend's provider: {received} (expected 0)")
        failed += received != 0
    finally:
        envoy.terminate()
        envoy.wait()
    print("as expected" if not failed else f"{failed} outcome(s) differ")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
