"""What one Envoy cluster costs, by how it is configured (issue 12).

Starts Envoy alone on N copies of one cluster shape (STATIC, one endpoint, nothing listening)
and reports its RSS and time to ready per cluster, against Envoy with no cluster at all.
The shapes are what the generator emits for a backend (envoygen.clusters), piece by piece,
and a TLS backend (the system CA bundle, as a hosted provider's cluster has). It says what a
cluster count costs whatever the routing does with it, and what TLS adds on top. `aggregate`
is a failover chain (an aggregate cluster of five backends, as `envoygen.clusters._aggregate`
makes it), measured as N chains over N backends against the N backends alone.

`chains+routes` and `groups+routes` weigh the two ways Envoy can walk a failover chain, each
with the N routes that use the chains, against the N backends alone: an aggregate cluster per
chain (the gateway's shape), or a route whose priority group cluster specifier names the
chain's backend clusters one attempt each (`refresh_cluster_on_retry`), over backends that
each carry a second, DEGRADED host at priority 1 (`backend+resting`): an internal address an
attempt goes to only while the real host rests or is ejected, where a refusal moves the
request on. `python -m bench.chain_groups` checks that this walks chains as aggregates do.

    python -m bench.cluster_cost --clusters 2000
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.dataplane import RESULTS, route_listener
from signalbox.core.envoygen.bootstrap import DEFERRED_CLUSTERS, DEFERRED_STATS, UNKEPT_CLUSTER_STATS
from signalbox.core.envoygen.contract import TARGET_PREFIX
from signalbox.core.envoygen.options import STREAM_LIMITS
from signalbox.local import envoy_binary, free_port

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"
_NOWHERE = {"socket_address": {"address": "127.0.0.1", "port_value": 9}}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# The internal listener a resting backend's priority-1 host names (`backend+resting`).
RESTING_LISTENER = "signalbox_resting"
INTERNAL_LISTENER = {
    "name": "envoy.bootstrap.internal_listener",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"},
}


def resting_host(hostname: str) -> dict[str, Any]:
    """The priority-1 locality of a backend that can rest: one DEGRADED host (used only when
    the priority-0 hosts are unhealthy or ejected) at the resting listener."""
    return {
        "priority": 1,
        "lb_endpoints": [
            {
                "endpoint": {
                    "address": {"envoy_internal_address": {"server_listener_name": RESTING_LISTENER}},
                    "hostname": hostname,
                },
                "health_status": "DEGRADED",
            }
        ],
    }


def static_cluster(name: str, port: int = 9, health: str = "", resting: bool = False) -> dict[str, Any]:
    """A STATIC cluster of one host on localhost (port 9: nothing listens), of `health` if
    given, with `resting` the degraded priority-1 host as well."""
    host: dict[str, Any] = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
    if health:
        host["health_status"] = health
    endpoints: list[dict[str, Any]] = [{"lb_endpoints": [host]}]
    if resting:
        endpoints.append(resting_host(name))
    return {
        "@type": CLUSTER,
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": endpoints},
    }


def aggregate_cluster(name: str, members: list[str]) -> dict[str, Any]:
    """A failover chain over `members`, as `envoygen.clusters._aggregate` makes it."""
    return {
        "@type": CLUSTER,
        "name": name,
        "connect_timeout": "1s",
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": "envoy.clusters.aggregate",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                "clusters": members,
            },
        },
        "circuit_breakers": {"thresholds": [STREAM_LIMITS]},
    }


def _cluster(i: int, shape: str) -> dict[str, Any]:
    name = f"b.default.p{i}.m"  # a backend's name: the stats matcher treats it as one
    cluster = static_cluster(name, resting=shape == "backend+resting")
    if shape in ("backend", "backend+tls", "backend+resting"):
        cluster["circuit_breakers"] = {"thresholds": [STREAM_LIMITS]}
        cluster["outlier_detection"] = {"consecutive_5xx": 5, "interval": "5s", "max_ejection_percent": 100}
    if shape == "backend+tls":
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": f"p{i}.example.com",
                "common_tls_context": {"validation_context": {"trusted_ca": {"filename": SYSTEM_CA}}},
            },
        }
    return cluster


def _members(i: int, backends: int) -> list[str]:
    """The five backend clusters of chain `i` (the same for either way of walking it)."""
    pick = random.Random(i)
    return [_cluster(pick.randrange(backends), "backend")["name"] for _ in range(5)]


def _chain(i: int, backends: int) -> dict[str, Any]:
    """A failover chain of five of the `backends` backend clusters, named as the generator
    names chains (its stats are dropped by the gateway's matcher, as a chain's are)."""
    return aggregate_cluster(f"{TARGET_PREFIX}.chain{i}", _members(i, backends))


_RETRY = {"retry_on": "5xx,retriable-headers", "num_retries": 4}


def groups_route(prefix: str, members: list[str]) -> dict[str, Any]:
    """A route walking `members` one attempt each: the priority group cluster specifier picks
    the group of the attempt's number, and each retry asks it again."""
    return {
        "match": {"prefix": prefix},
        "route": {
            "inline_cluster_specifier_plugin": {
                "extension": {
                    "name": "envoy.router.cluster_specifier_plugin.priority_group",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.router.cluster_specifiers."
                        "priority_group.v3.PriorityGroupClusterSpecifier",
                        "priority_groups": [
                            {"name": f"g{n}", "clusters": [{"cluster_name": m, "weight": 1}]}
                            for n, m in enumerate(members)
                        ],
                    },
                }
            },
            "retry_policy": {**_RETRY, "refresh_cluster_on_retry": True},
        },
    }


def _routes(count: int, shape: str) -> list[dict[str, Any]]:
    if shape == "chains+routes":
        return [
            {"match": {"prefix": f"/c{i}/"}, "route": {"cluster": _chain(i, count)["name"], "retry_policy": _RETRY}}
            for i in range(count)
        ]
    if shape == "groups+routes":
        return [groups_route(f"/c{i}/", _members(i, count)) for i in range(count)]
    return []


def _clusters(count: int, shape: str) -> list[dict[str, Any]]:
    if shape in ("aggregate", "chains+routes"):
        return [_cluster(i, "backend") for i in range(count)] + [_chain(i, count) for i in range(count)]
    if shape == "groups+routes":
        return [_cluster(i, "backend+resting") for i in range(count)]
    return [_cluster(i, shape) for i in range(count)]


def start_envoy(
    work: Path, bootstrap: dict[str, Any], admin: int, concurrency: int, timeout: float
) -> tuple[subprocess.Popen[bytes], float]:
    """Envoy alone on `bootstrap` (written into `work`), once its admin port at `admin` says
    it is live, and the seconds that took."""
    (work / "bootstrap.json").write_text(json.dumps(bootstrap))
    started = time.monotonic()
    command = [envoy_binary(), "-c", str(work / "bootstrap.json"), "--concurrency", str(concurrency)]
    envoy = subprocess.Popen(
        [*command, "--use-dynamic-base-id", "-l", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                if b"LIVE" in r.read():
                    return envoy, time.monotonic() - started
        except OSError:
            pass
        if envoy.poll() is not None or time.monotonic() - started > timeout:
            envoy.terminate()
            raise RuntimeError("Envoy did not become ready")
        time.sleep(0.05)


def measure(count: int, shape: str, deferred: bool = True) -> dict[str, float]:
    """Envoy's RSS and time to ready with `count` clusters of `shape` (0: none); `deferred`:
    a worker makes its copy of a cluster on first use, as the gateway's Envoy does."""
    work = Path(tempfile.mkdtemp(prefix="signalbox-cluster-cost-"))
    (work / "cds").mkdir()
    (work / "cds" / "cds.json").write_text(json.dumps({"resources": _clusters(count, shape)}))
    admin = free_port()
    bootstrap = {
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "dynamic_resources": {
            "cds_config": {"path_config_source": {"path": str(work / "cds" / "cds.json")}, "resource_api_version": "V3"}
        },
        "stats_config": {"stats_matcher": {"exclusion_list": {"patterns": UNKEPT_CLUSTER_STATS}}},
        # As the gateway's bootstrap (`deferred=False`: every worker copies every cluster).
        "deferred_stat_options": DEFERRED_STATS,
        **({"cluster_manager": DEFERRED_CLUSTERS} if deferred else {}),
        "bootstrap_extensions": [INTERNAL_LISTENER],
    }
    routes = _routes(count, shape)
    if routes:
        bootstrap["static_resources"] = {"listeners": [route_listener(free_port(), routes)]}
    envoy, ready = start_envoy(work, bootstrap, admin, concurrency=2, timeout=300)
    try:
        time.sleep(2)  # workers take their copies of the clusters
        return {"rss_mb": round(_rss_mb(envoy.pid), 1), "ready_s": round(ready, 2)}
    finally:
        envoy.terminate()
        envoy.wait()


SHAPES = ("bare", "backend", "backend+tls", "aggregate", "backend+resting", "chains+routes", "groups+routes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS / "cluster_cost.json")
    parser.add_argument(
        "--shapes", nargs="*", default=list(SHAPES), choices=SHAPES, help="(the backend is always measured)"
    )
    args = parser.parse_args(argv)
    empty = measure(0, "bare")
    out: dict[str, Any] = {"clusters": args.clusters, "no_cluster": empty}
    for shape in dict.fromkeys(["backend", *args.shapes]):
        for deferred in (True, False) if shape in ("bare", "backend", "backend+tls", "aggregate") else (True,):
            got = measure(args.clusters, shape, deferred)
            # A chain is measured over as many backends: against those alone.
            base = (
                out["backend" if deferred else "backend, every worker's copy at once"]
                if shape in ("aggregate", "chains+routes", "groups+routes")
                else empty
            )
            got["kb_per_cluster"] = round((got["rss_mb"] - base["rss_mb"]) * 1024 / args.clusters, 1)
            got["ms_per_cluster"] = round((got["ready_s"] - base["ready_s"]) * 1000 / args.clusters, 3)
            out[shape if deferred else f"{shape}, every worker's copy at once"] = got
            print(shape, "deferred" if deferred else "at once", got, flush=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
