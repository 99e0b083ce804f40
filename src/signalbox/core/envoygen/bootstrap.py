"""Envoy's static bootstrap (admin, the ext_proc cluster, LDS/CDS from watched files) and the
dynamic resources as files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from signalbox.api.v1alpha1 import config_pb2 as pb

from ..gcpause import paused_gc
from .clusters import ClusterSpec, chains_of, cluster_specs
from .contract import (
    ADMIN_CLUSTER,
    BACKEND_PREFIX,
    EXTPROC_ADMIN_CLUSTER,
    EXTPROC_CLUSTER,
    TARGET_PREFIX,
    XDS_CLUSTER,
)
from .kept import generation
from .listener import RouteParts, health_listener, listener, resting_listener, route_parts
from .options import STREAM_LIMITS, GatewayOptions, _address, _admin_address, _any
from .origins import INTERNAL_LISTENER_EXTENSION, origin_listeners

# Envoy allocates about 140 stats per cluster, each costing memory and start-up time for every
# backend. An aggregate cluster's are copies of its members' (every request it carries is
# counted again by the backend that answered), so none are kept: at thousands of failover
# chains they were a third of Envoy's memory (issue 12). A backend cluster keeps what
# dashboards, alerts and the fault tests read: requests by response code and their totals,
# timeouts and resets, connect failures, healthy membership and ejections. The
# rest (connection pool, load balancer, flow control, circuit breaker and xDS update
# internals) went: at the 2,000-provider fleet they were 335 MB of Envoy's 1.46 GB and half its
# time to ready (bench/README.md). Matched once, when a stat is created; never per request.
# A cluster's traffic stats (upstream_cx_*, upstream_rq_*) are made when it first carries a
# request: most of a large fleet's backends and chains carry none on a given gateway. 37.9 ->
# 31.0 KB per backend cluster, and a third off its time to ready (bench/cluster_cost.py).
# Membership, ejection and config stats are made at once; a cluster that never carried a
# request has no traffic series in /stats/prometheus (a dashboard's rate() reads it as none).
DEFERRED_STATS = {"enable_deferred_creation_stats": True}
# A worker makes its own copy of a cluster (load balancer, host sets, the aggregate's
# callbacks) the first time it routes there, not when the cluster arrives: at the
# 2,000-provider fleet Envoy held 797 -> 669 MB after the first and last alias answered
# (885 -> 812 MB once every alias had, on both workers), and the start's first and last alias
# answered 0.3-1.2 s sooner (bench/README.md, issue 12).
DEFERRED_CLUSTERS = {"enable_deferred_cluster_creation": True}
_UNKEPT_BACKEND_STATS = "|".join(
    (
        r"assignment_\w+",
        r"bind_errors",
        r"circuit_breakers\..+",
        r"default\.total_match_count",
        r"http1\..+",
        r"lb_\w+",
        r"max_host_weight",
        r"membership_(change|degraded|excluded|total)",
        r"original_dst_\w+",
        r"outlier_detection\.ejections_(consecutive_5xx|detected_\w+|overflow|success_rate|total)",
        r"outlier_detection\.ejections_enforced_(consecutive|failure|local|success)\w*",
        r"retry_or_shadow_abandoned",
        r"update_\w+",
        r"upstream_cx_(active|close_notify|connect_attempts_exceeded|connect_with_0_rtt|connect_ms|destroy\w*)",
        r"upstream_cx_(http[123]_total|idle_timeout|length_ms|max_\w+|none_healthy|overflow|pool_overflow)",
        r"upstream_cx_(preconnect_skipped|protocol_error|rx_\w+|total|tx_\w+)",
        r"upstream_flow_control_\w+",
        r"upstream_http3_broken",
        r"upstream_internal_redirect_\w+",
        r"upstream_queue_overloaded",
        r"upstream_rq_(0rtt|active_overflow|cancelled|maintenance_mode|max_duration_reached|pending_\w+)",
        r"upstream_rq_(per_cx|retry\w*|rx_reset_no_error|tx_reset)",
        r"version",
        r"version_text",  # EDS: the endpoints' version (the ext_proc's, over ADS)
        r"init_fetch_timeout",  # EDS: never, the endpoints come from this pod's own process
        r"warming_state",
    )
)
UNKEPT_CLUSTER_STATS: list[dict[str, Any]] = [
    {"prefix": f"cluster.{TARGET_PREFIX}."},
    {"safe_regex": {"regex": rf"^cluster\.{BACKEND_PREFIX}\..+\.({_UNKEPT_BACKEND_STATS})$"}},
]


def _worker_cluster(name: str, groups: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """A cluster of ext_proc workers: `groups` in priority order, the first that has a healthy
    worker taking every stream (a worker that is gone is ejected at its first refused connect,
    and its health check brings it back)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": a}} for a in group], **({"priority": p} if p else {})}
                for p, group in enumerate(groups)
            ],
        },
        # Router streams of `latency`/`least-busy`/learning policies last as long as their
        # requests: Envoy's default of 1,024 would refuse the 1,025th open LLM stream.
        "circuit_breakers": {"thresholds": [STREAM_LIMITS]},
        # A worker that is gone (killed, restarting) must stop receiving streams at once: a
        # refused connection is otherwise the "least busy" endpoint. One failed connect
        # ejects it; the health check brings it back as soon as it answers again. With half
        # or more of the workers unhealthy Envoy's panic mode tries them all anyway (one
        # worker in a pod, or a health check that has not run yet: never worse than before).
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "consecutive_gateway_failure": 1,
            "interval": "0.5s",
            "base_ejection_time": "1s",
            "max_ejection_time": "2s",
            "max_ejection_percent": 100,
        },
        "health_checks": [
            {
                "timeout": "0.5s",
                "interval": "0.5s",
                "no_traffic_interval": "0.5s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "grpc_health_check": {},
            }
        ],
    }


def _xds_groups(addrs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Where Envoy's ADS stream goes: the last worker first, every other one if it is gone.

    Why: the first worker also serves the admin API and the stream relay (aiohttp), and the
    worker that holds the ADS stream keeps Envoy's cluster file and the stream's state. With both
    in one worker, which happened whenever Envoy's pick fell on it, that worker was 117-120 MB at
    the 2,000-provider fleet against 86-103 MB for the other (issue 12: each worker <= 100 MB).
    """
    if len(addrs) < 2:
        return [addrs]
    return [addrs[-1:], addrs[:-1]]


def bootstrap(opts: GatewayOptions, config_dir: str) -> dict[str, Any]:
    """Static bootstrap: admin, the ext_proc cluster, and LDS/CDS read from watched files."""
    if opts.extproc_sockets:
        extproc_addrs: list[dict[str, Any]] = [{"pipe": {"path": path}} for path in opts.extproc_sockets]
    else:
        extproc_addrs = [_address(opts.extproc_host, opts.extproc_port)]

    static: list[dict[str, Any]] = [_worker_cluster(EXTPROC_CLUSTER, [extproc_addrs])]
    if opts.endpoints_over_ads:
        static.append(_worker_cluster(XDS_CLUSTER, _xds_groups(extproc_addrs)))
    if opts.health_port is not None and opts.extproc_admin_port:
        static.append(
            {
                "name": EXTPROC_ADMIN_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": EXTPROC_ADMIN_CLUSTER,
                    "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": _address("127.0.0.1", opts.extproc_admin_port)}}]}
                    ],
                },
            }
        )
    if opts.health_port is not None:
        static.append(
            {
                "name": ADMIN_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": ADMIN_CLUSTER,
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _admin_address(opts)}}]}],
                },
            }
        )
    out: dict[str, Any] = {
        "node": {"id": "signalbox-gateway", "cluster": "signalbox"},
        "admin": {"address": _admin_address(opts)},
        "dynamic_resources": {
            "lds_config": watched_file(config_dir, "lds.json"),
            "cds_config": watched_file(config_dir, "cds.json"),  # binary: BINARY_FILES
        },
        "stats_config": {"stats_matcher": {"exclusion_list": {"patterns": UNKEPT_CLUSTER_STATS}}},
        "deferred_stat_options": DEFERRED_STATS,
        "static_resources": {"clusters": static},
        # TLS providers' backends reach their endpoint through internal listeners (origins).
        "bootstrap_extensions": [INTERNAL_LISTENER_EXTENSION],
    }
    if opts.endpoints_over_ads:
        # Clusters and backend endpoints (envoygen.endpoints) from whichever ext_proc worker
        # holds the one ADS stream (extproc.xds): only what changed travels, a resting backend's
        # health with it. The clusters are the file the publisher writes (extproc.clusterfeed):
        # read whole by Envoy, a new failover chain at the 2,000-provider fleet cost it 0.3-0.5 s
        # to compare 17,712 clusters.
        out["dynamic_resources"]["cds_config"] = {"ads": {}, "resource_api_version": "V3"}
        out["dynamic_resources"]["ads_config"] = {
            "api_type": "DELTA_GRPC",
            "transport_api_version": "V3",
            # Envoy may start before the workers (signalbox up starts both at once): it asks
            # again within 50 ms, not its default 500 ms doubling.
            "grpc_services": [
                {
                    "envoy_grpc": {
                        "cluster_name": XDS_CLUSTER,
                        "retry_policy": {"retry_back_off": {"base_interval": "0.05s", "max_interval": "1s"}},
                    }
                }
            ],
            "set_node_on_first_message_only": True,
        }
    if opts.otlp_endpoint:
        # Spans leave in batches: at least every second (Envoy's default is 5 s).
        out["layered_runtime"] = {
            "layers": [{"name": "tracing", "static_layer": {"tracing.opentelemetry.flush_interval_ms": 1000}}]
        }
    out["cluster_manager"] = dict(DEFERRED_CLUSTERS)
    if opts.outlier_event_log:
        out["cluster_manager"]["outlier_detection"] = {"event_log_path": opts.outlier_event_log}
    return out


# The dynamic resources' files, in the order a change is written: clusters before the routes
# that name them, routes before a listener that needs them.
RESOURCE_FILES = ("cds.json", "rds.json", "lds.json")


# Documents Envoy reads in protobuf's binary form (it goes by the file's suffix): the clusters
# and the routes, which Envoy re-reads whole on every change (signalbox.xdsbinary). The listener
# names types xds-protos lacks, and changes rarely: JSON.
BINARY_FILES = {"cds.json": "cds.pb", "rds.json": "rds.pb"}


def resource_file(config_dir: str, name: str) -> str:
    """Where Envoy reads one resource document (`name`, as `resources` keys it): each file in a
    folder of its own. Envoy watches a folder for files moved into it and re-reads every
    subscription watching that folder: with all of them in one, a new route table also made
    Envoy parse the 20 MB of clusters again (2-4 s of its main thread at the 2,000-provider
    fleet, issue 12)."""
    return f"{config_dir}/{name.removesuffix('.json')}/{BINARY_FILES.get(name, name)}"


def watched_file(config_dir: str, name: str) -> dict[str, Any]:
    """The config source of one resource file, its own folder watched for the file's moves."""
    path = resource_file(config_dir, name)
    return {
        "path_config_source": {"path": path, "watched_directory": {"path": path.rsplit("/", 1)[0]}},
        "resource_api_version": "V3",
    }


@dataclass(frozen=True)
class ResourceParts:
    """The dynamic resources as a publisher encodes them: the listeners' document, the
    clusters as keyed makers (`cluster_specs`) and the route table's routes in keyed groups
    (`route_parts`; None: inline in the listener), each converted once per key
    (xdsbinary.KeyedEncoder, RouteTableEncoder)."""

    listeners: dict[str, Any]
    clusters: list[ClusterSpec]
    routes: RouteParts | None


@paused_gc()
def resource_parts(cfg: pb.RoutingConfig, opts: GatewayOptions, config_dir: str = "") -> ResourceParts:
    """Every publisher's entry: one generation, which may reuse what the last one made from the
    same providers and backends (`kept`)."""
    with generation(cfg):
        rds = watched_file(config_dir, "rds.json") if config_dir else None
        listeners = [listener(cfg, opts, routes=rds)]
        if opts.health_port is not None:
            listeners.append(health_listener(opts))
        listeners += origin_listeners(cfg)
        if opts.endpoints_over_ads:
            listeners.append(resting_listener())  # what a resting backend's second host names
        chains = chains_of(cfg)
        routes = route_parts(cfg, opts, chains) if rds is not None else None
        return ResourceParts({"resources": listeners}, cluster_specs(cfg, opts, chains), routes)


@paused_gc()
def resources(cfg: pb.RoutingConfig, opts: GatewayOptions, config_dir: str = "") -> dict[str, dict[str, Any]]:
    """The dynamic resources as xDS DiscoveryResponse documents, keyed by file name.

    With `config_dir` (where a gateway's Envoy reads them) the routes are a file of their own
    (RDS), so a change to policies replaces the route table and leaves the listener, its
    filters and attempt.lua's Lua states as they are; without it they are inline in the
    listener (the generator's own tests read them there)."""
    parts = resource_parts(cfg, opts, config_dir)
    out = {"cds.json": {"resources": [make() for _, make in parts.clusters]}, "lds.json": parts.listeners}
    if parts.routes is not None:
        out["rds.json"] = {"resources": [_any("envoy.config.route.v3.RouteConfiguration", **parts.routes.config())]}
    return out
