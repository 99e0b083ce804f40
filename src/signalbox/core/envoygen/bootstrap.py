"""Envoy's static bootstrap (admin, the ext_proc cluster, LDS/CDS from watched files) and the
dynamic resources as files."""

from __future__ import annotations

from typing import Any

from signalbox.api.v1alpha1 import config_pb2 as pb

from .clusters import clusters
from .contract import ADMIN_CLUSTER, EXTPROC_ADMIN_CLUSTER, EXTPROC_CLUSTER, TARGET_PREFIX
from .listener import health_listener, listener
from .options import STREAM_LIMITS, GatewayOptions, _address, _admin_address, _any


def bootstrap(opts: GatewayOptions, config_dir: str) -> dict[str, Any]:
    """Static bootstrap: admin, the ext_proc cluster, and LDS/CDS read from watched files."""
    if opts.extproc_sockets:
        extproc_addrs: list[dict[str, Any]] = [{"pipe": {"path": path}} for path in opts.extproc_sockets]
    else:
        extproc_addrs = [_address(opts.extproc_host, opts.extproc_port)]

    def watched(name: str) -> dict[str, Any]:
        return {
            "path_config_source": {"path": f"{config_dir}/{name}", "watched_directory": {"path": config_dir}},
            "resource_api_version": "V3",
        }

    static: list[dict[str, Any]] = [
        {
            "name": EXTPROC_CLUSTER,
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
                "cluster_name": EXTPROC_CLUSTER,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": a}} for a in extproc_addrs]}],
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
    ]
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
        "dynamic_resources": {"lds_config": watched("lds.json"), "cds_config": watched("cds.json")},
        # Envoy allocates about 150 stats per cluster. An aggregate cluster's are copies of its
        # members' (every request it carries is counted again by the backend that answered),
        # so they are not kept: at thousands of failover chains they were a third of Envoy's
        # memory (issue 12). Backend clusters keep theirs (the dashboard's 5xx by backend).
        "stats_config": {"stats_matcher": {"exclusion_list": {"patterns": [{"prefix": f"cluster.{TARGET_PREFIX}."}]}}},
        "static_resources": {"clusters": static},
    }
    if opts.otlp_endpoint:
        # Spans leave in batches: at least every second (Envoy's default is 5 s).
        out["layered_runtime"] = {
            "layers": [{"name": "tracing", "static_layer": {"tracing.opentelemetry.flush_interval_ms": 1000}}]
        }
    if opts.outlier_event_log:
        out["cluster_manager"] = {"outlier_detection": {"event_log_path": opts.outlier_event_log}}
    return out


def resources(cfg: pb.RoutingConfig, opts: GatewayOptions) -> dict[str, dict[str, Any]]:
    """The dynamic resources as xDS DiscoveryResponse documents, keyed by file name."""
    listeners = [listener(cfg, opts)]
    if opts.health_port is not None:
        listeners.append(health_listener(opts))
    return {
        "cds.json": {"resources": clusters(cfg, opts)},
        "lds.json": {"resources": listeners},
    }
