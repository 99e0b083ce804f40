"""TLS origins: one TLS cluster per provider endpoint, shared by the backends that reach it.

A TLS cluster holds its own TLS context, and with the system CA bundle each context parses the
bundle's 144 certificates into a store of its own: about 290 KB of Envoy and 1.3 ms of its start
per cluster (`bench.cluster_cost`), for every model of every hosted provider. So a backend of a
TLS endpoint that many backends reach (`endpoints.ORIGIN_MIN_BACKENDS`) is a plain cluster whose
one host is an internal listener (Envoy's `envoy_internal_address`: an in-process connection,
no socket), named after its origin (`endpoints.origin_name`: the provider's host, port and
connect timeout). That listener hands the connection to a TCP proxy over the origin's cluster,
which resolves the host, opens the connection, speaks TLS with the provider's name (SNI) and
checks its certificate against the name (`options.upstream_tls`). The backends of one endpoint,
however many models and providers name it, share one TLS context.

The hop has a price (`bench.tls_origin`): 20-36 us of Envoy per attempt and 24 KB per request
held open (two more connection objects). So an endpoint few backends reach keeps a TLS cluster
per backend, and one crosses over when enough backends share it. Crossing over is safe while
traffic flows: over ADS each way of reaching a backend is a resource of its own
(`endpoints.resource_name`), and the plain cluster's (`<cluster>/origin`) is answered with the
origin's listener only, never with an address. Envoy may hold the new cluster before the worker
has the new config, but never a plain cluster with the provider's TLS port, which would send a
request, key and all, in clear text.

The TCP proxy passes bytes, not requests: the backend's HTTP/1.1 (every backend cluster's
protocol) runs end to end over it, and the origin offers no ALPN. A backend that spoke HTTP/2
would need its origin to offer "h2".

What stays per backend: its cluster, endpoint metadata, health (a rest marks its internal host
unhealthy), outlier detection, circuit breakers and request stats. What moves to the origin:
DNS, connect and TLS handshake failures and their stats (`cluster.origin.*`). A connection the
origin cannot open reaches the backend as a reset before any response, which chains retry and
outlier detection counts as they counted a failed connect.
"""

from __future__ import annotations

import functools
from typing import Any

import orjson

from signalbox.api.v1alpha1 import config_pb2 as pb

from .endpoints import DEFAULT_CONNECT_TIMEOUT_MS, shared_origins
from .kept import kept
from .options import STREAM_LIMITS, _address, _any, _ms, upstream_tls

# Registered in every bootstrap (`bootstrap.bootstrap`): Envoy accepts internal listeners and
# internal addresses only with it.
INTERNAL_LISTENER_EXTENSION = {
    "name": "envoy.bootstrap.internal_listener",
    "typed_config": _any("envoy.extensions.bootstrap.internal_listener.v3.InternalListener"),
}


def tls_origins(cfg: pb.RoutingConfig) -> dict[str, pb.Provider]:
    """Each origin backends are reached through (`endpoints.shared_origins`), by name, with the
    first provider naming it (all of them share its host, port and connect timeout: the name
    says so)."""
    shared = shared_origins(cfg)
    out: dict[str, pb.Provider] = {}
    for provider in cfg.providers:
        if provider.id in shared:
            out.setdefault(shared[provider.id], provider)
    return out


def origin_cluster(name: str, provider: pb.Provider, ca_file: str) -> dict[str, Any]:
    """The origin's TLS cluster: Envoy resolves the host (every 5 s, as any STRICT_DNS cluster)."""
    return _any(
        "envoy.config.cluster.v3.Cluster",
        name=name,
        type="STRICT_DNS",
        dns_lookup_family="V4_PREFERRED",
        connect_timeout=_ms(provider.connect_timeout_ms or DEFAULT_CONNECT_TIMEOUT_MS),
        circuit_breakers={"thresholds": [STREAM_LIMITS]},
        load_assignment={
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(provider.host, provider.port)}}]}],
        },
        transport_socket=upstream_tls(provider.host, ca_file),
    )


def origin_listener(name: str) -> dict[str, Any]:
    """The internal listener backends connect to: each connection proxied to the origin's cluster."""
    return _any(
        "envoy.config.listener.v3.Listener",
        name=name,
        internal_listener={},
        filter_chains=[
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": _any(
                            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", stat_prefix=name, cluster=name
                        ),
                    }
                ]
            }
        ],
    )


def origin_clusters(cfg: pb.RoutingConfig, ca_file: str) -> list[dict[str, Any]]:
    """One TLS cluster per origin (kept between generations, `kept`, while the providers,
    backends, which of them share an origin and the CA bundle are the same)."""
    made = kept(
        cfg,
        "origin_clusters",
        functools.partial(_origin_clusters, cfg, ca_file),
        orjson.dumps([shared_origins(cfg), ca_file]),
    )
    return list(made)


def _origin_clusters(cfg: pb.RoutingConfig, ca_file: str) -> list[dict[str, Any]]:
    return [origin_cluster(name, provider, ca_file) for name, provider in tls_origins(cfg).items()]


def origin_listeners(cfg: pb.RoutingConfig) -> list[dict[str, Any]]:
    made = kept(cfg, "origin_listeners", functools.partial(_origin_listeners, cfg), orjson.dumps(shared_origins(cfg)))
    return list(made)


def _origin_listeners(cfg: pb.RoutingConfig) -> list[dict[str, Any]]:
    return [origin_listener(name) for name in tls_origins(cfg)]
