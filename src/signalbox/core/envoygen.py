"""Pure generation of Envoy resources from a RoutingConfig.

Shape (see ARCHITECTURE.md, "One request"):
- one cluster per backend (provider host/TLS/SNI, outlier detection), its endpoint carrying
  `filter_metadata.signalbox` = backend id, provider and model;
- one aggregate cluster per *target* (a policy's first choice followed by its failover chain),
  whose upstream HTTP filters run the upstream-phase ext_proc on every attempt to a backend
  other than the one the router phase prepared the request for (a CEL matcher decides);
- one listener whose router-phase ext_proc picks the target and sets `x-signalbox-target`;
  one route per target (retry/hedge policy of the policy), and OpenAI-style local replies.

The same functions feed `signalbox up` (files Envoy watches) and the Helm chart, so a cluster
and a laptop run the same Envoy shape.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from importlib import resources as package_files
from typing import Any, Literal

from signalbox.api.v1alpha1 import config_pb2 as pb

from . import errors
from .compiler import chain

# Gateway-owned request headers. Clients cannot set them (a header_mutation filter removes them
# before the router phase sees the request) and providers never see them (the upstream filter
# chain removes them after the upstream phase).
TARGET_HEADER = "x-signalbox-target"
# The model the body already names: the upstream phase rewrites the body only when it differs.
BODY_MODEL_HEADER = "x-signalbox-body-model"
# The backend the router phase already prepared the request for (path, authority, key, model).
PREPARED_HEADER = "x-signalbox-prepared"
# The client's path, for the upstream phase of a failover attempt (`:path` is already rewritten):
# Envoy keeps it in x-envoy-original-path when a route rewrites the path.
PATH_HEADER = "x-envoy-original-path"
GATEWAY_HEADERS = (TARGET_HEADER, BODY_MODEL_HEADER, PREPARED_HEADER, PATH_HEADER)
# What the router phase reads of a request besides its body, sent with the body as attributes
# (CEL expressions): these, and `request.headers['<name>']` for each header a policy matches
# on or hashes by (`router_attributes`). Envoy cannot send the whole header map.
ROUTER_ATTRIBUTES = ("request.path", "request.method", "request.id", "source.address")
HEADER_ATTRIBUTE = "request.headers['{}']"
# Why a bodyless request is refused, by kind of path (Envoy's routes answer the requests that
# never reach the ext_proc; the ext_proc gives the same answer to a headers-first stream).
EMPTY_BODY = {
    "route": "request body is empty; a JSON body with 'model' is required",
    "feedback": 'feedback needs a JSON body: {"decision": ..., "score": 0..1}',
}
METADATA_NS = "signalbox"
EXTPROC_CLUSTER = "signalbox_extproc"
# HTTP 510 (Not Extended): the status Envoy's ext_proc filter answers when the processor
# cannot be reached or fails; mapped to 503 routing_unavailable before any client sees it.
EXTPROC_FAILED_STATUS = 510
ADMIN_CLUSTER = "signalbox_envoy_admin"
EXTPROC_ADMIN_CLUSTER = "signalbox_extproc_admin"
LISTENER_NAME = "signalbox_gateway"
HEALTH_LISTENER_NAME = "signalbox_health"
EMBEDDINGS_PATH = "/v1/embeddings"
# Paths whose POST bodies are routed by a policy, and the gateway's own endpoints.
ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions", EMBEDDINGS_PATH)
MODELS_PATH = "/v1/models"
FEEDBACK_PATH = "/v1/feedback"
API_PATHS = (*ROUTED_PATHS, MODELS_PATH)

_T = "type.googleapis.com/"
# Circuit breakers sized for LLM traffic, where a request stays open for seconds to minutes:
# Envoy's defaults (1,024 requests, connections and pending per cluster) would refuse
# concurrent streams long before the gateway's CPU or memory is the limit.
STREAM_LIMITS = {
    "priority": "DEFAULT",
    "max_connections": 100_000,
    "max_pending_requests": 100_000,
    "max_requests": 100_000,
    "max_retries": 10_000,
}
_RETRY_ON = {
    "5xx": "5xx",
    "429": "retriable-status-codes",
    "reset": "reset",
    "connect-failure": "connect-failure",
    "per-try-timeout": "gateway-error",
}


@dataclass(frozen=True)
class GatewayOptions:
    """How the gateway process is wired; not part of the routing config.

    failure_mode: what happens when the ext_proc cannot be reached. "closed" (default) answers
    503 `routing_unavailable`; "open" sends the request to `fallback_target` unrouted (useful
    only for keyless in-cluster backends, since no auth is injected without the ext_proc).
    """

    listen_address: str = "127.0.0.1"
    listen_port: int = 8080
    admin_address: str = "127.0.0.1"
    admin_port: int = 9901
    # Envoy's admin interface on a Unix socket instead (nothing on TCP at all).
    admin_socket: str = ""
    # One Unix socket per ext_proc worker process; Envoy spreads streams over them. Python's
    # gRPC runtime costs ~0.3 ms of CPU per stream, so workers are how the data plane scales
    # with cores (see bench/README.md). Empty: one worker on extproc_host:extproc_port.
    extproc_sockets: tuple[str, ...] = ()
    extproc_host: str = "127.0.0.1"
    extproc_port: int = 50051
    max_body_bytes: int = 8 * 1024 * 1024
    failure_mode: Literal["closed", "open"] = "closed"
    extproc_message_timeout_ms: int = 5000
    # How long finished requests wait in Envoy before their accounting entries are sent.
    accounting_flush_ms: int = 100
    # In a pod: a listener on this port answers /ready and /stats/prometheus from the admin
    # interface (which stays on localhost). It only exists once routes are loaded, so it is
    # also the readiness signal.
    health_port: int | None = None
    # In a pod: the ext_proc's admin API on localhost; the health listener serves its /metrics,
    # so Prometheus can scrape them while the API itself stays off the network.
    extproc_admin_port: int | None = None
    # Token and cost accounting (a Lua filter reads usage, the gRPC access log carries it to the
    # ext_proc in batches): spend metrics and budgets need it (cost: bench/README.md).
    accounting: bool = True
    # Where provider keys are, one SDS file per provider (`credential_file`): Envoy adds each
    # attempt's key itself. "" (unit tests of the generator only): no keys are added.
    credentials_dir: str = ""
    # Where Envoy writes one JSON line per request (REQUEST_LOG_FORMAT); "" writes none.
    # Locally `<workdir>/requests.log`; in a pod /dev/stdout, so `kubectl logs` shows it.
    request_log: str = ""


def _any(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": _T + type_name, **fields}


def _ms(value: int) -> str:
    return f"{value / 1000:.3f}s"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _admin_address(opts: GatewayOptions) -> dict[str, Any]:
    return {"pipe": {"path": opts.admin_socket}} if opts.admin_socket else _address(opts.admin_address, opts.admin_port)


def _grpc_service(timeout_ms: int) -> dict[str, Any]:
    return {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}, "timeout": _ms(timeout_ms)}


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
    return {
        "node": {"id": "signalbox-gateway", "cluster": "signalbox"},
        "admin": {"address": _admin_address(opts)},
        "dynamic_resources": {"lds_config": watched("lds.json"), "cds_config": watched("cds.json")},
        "static_resources": {"clusters": static},
    }


def resources(cfg: pb.RoutingConfig, opts: GatewayOptions) -> dict[str, dict[str, Any]]:
    """The dynamic resources as xDS DiscoveryResponse documents, keyed by file name."""
    listeners = [listener(cfg, opts)]
    if opts.health_port is not None:
        listeners.append(health_listener(opts))
    return {
        "cds.json": {"resources": clusters(cfg, opts)},
        "lds.json": {"resources": listeners},
    }


# --------------------------------------------------------------------------- clusters


def _http1_options(filters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    opts: dict[str, Any] = {"explicit_http_config": {"http_protocol_options": {}}}
    if filters:
        opts["http_filters"] = filters
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", **opts
        )
    }


def _backend_cluster(backend: pb.Backend, provider: pb.Provider) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": backend.cluster,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": _ms(provider.connect_timeout_ms or 2000),
        "typed_extension_protocol_options": _http1_options(),
        "circuit_breakers": {"thresholds": [STREAM_LIMITS]},
        "outlier_detection": {
            "consecutive_5xx": 5,
            "interval": "5s",
            "base_ejection_time": "15s",
            "max_ejection_percent": 100,
        },
        "load_assignment": {
            "cluster_name": backend.cluster,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {"address": _address(provider.host, provider.port), "hostname": provider.host},
                            "metadata": {
                                "filter_metadata": {
                                    METADATA_NS: {
                                        "backend": backend.id,
                                        "provider_id": provider.id,
                                        "provider": provider.name,
                                        "model": backend.model,
                                    }
                                }
                            },
                        }
                    ]
                }
            ],
        },
    }
    if provider.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _any(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                sni=provider.host,
                common_tls_context={
                    "validation_context": {"trusted_ca": {"filename": "/etc/ssl/certs/ca-certificates.crt"}}
                },
            ),
        }
    return cluster


def _extproc_filter(
    opts: GatewayOptions, response_headers: bool = False, request_headers: bool = True, **extra: Any
) -> dict[str, Any]:
    """The ext_proc filter of both phases. The upstream phase gets the headers, then the
    buffered body; the router phase only the body, with the headers it reads as attributes."""
    return _any(
        "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        grpc_service=_grpc_service(opts.extproc_message_timeout_ms),
        failure_mode_allow=opts.failure_mode == "open",
        # An unreachable, failed or timed-out ext_proc answers this status, which nothing else
        # produces, so the local reply mapper turns exactly these into 503 routing_unavailable
        # while the ext_proc's own 500 internal_error (with its request id) passes unchanged.
        status_on_error={"code": EXTPROC_FAILED_STATUS},
        message_timeout=_ms(opts.extproc_message_timeout_ms),
        processing_mode={
            "request_header_mode": "SEND" if request_headers else "SKIP",
            "response_header_mode": "SEND" if response_headers else "SKIP",
            "request_body_mode": "BUFFERED",
            "response_body_mode": "NONE",
        },
        allow_mode_override=True,
        mutation_rules={"allow_all_routing": True},
        **extra,
    )


def _picked_host_matches(lhs: tuple[str, str], key: str, op: str) -> dict[str, Any]:
    """CEL `<lhs> <op> xds.upstream_host_metadata.filter_metadata['signalbox'][key]` (lhs: a request
    header ("header", name) or a string ("const", value)), as a parsed
    expression (Envoy's CEL matcher does not take expression strings; every node needs a unique
    id). A missing header or metadata is an evaluation error, which never matches."""
    ids = itertools.count(1)

    def node(kind: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"id": str(next(ids)), kind: body}

    def select(operand: dict[str, Any], field: str) -> dict[str, Any]:
        return node("selectExpr", {"operand": operand, "field": field})

    def index(operand: dict[str, Any], name: str) -> dict[str, Any]:
        return node("callExpr", {"function": "_[_]", "args": [operand, node("constExpr", {"stringValue": name})]})

    kind, text = lhs
    if kind == "header":
        left = index(select(node("identExpr", {"name": "request"}), "headers"), text)
    else:
        left = node("constExpr", {"stringValue": text})
    host = select(select(node("identExpr", {"name": "xds"}), "upstream_host_metadata"), "filter_metadata")
    value = index(index(host, METADATA_NS), key)
    return {"expr": node("callExpr", {"function": op, "args": [left, value]})}


def prepared_for_picked_host() -> dict[str, Any]:
    """CEL: the attempt goes to the backend its target route prepared the request for
    (`request.headers['x-signalbox-prepared'] == <picked host's backend id>`)."""
    return _picked_host_matches(("header", PREPARED_HEADER), "backend", "_==_")


def picked_host_not_of(provider_id: str) -> dict[str, Any]:
    """CEL: the attempt goes to a backend of another provider than `provider_id`."""
    return _picked_host_matches(("const", provider_id), "provider_id", "_!=_")


def _skip_when(name: str, filter_config: dict[str, Any], predicate: dict[str, Any]) -> dict[str, Any]:
    """Wrap an upstream filter so it is skipped on the attempts where `predicate` (CEL) holds."""
    skip = {
        "predicate": {
            "single_predicate": {
                "input": {
                    "name": "envoy.matching.inputs.cel_data_input",
                    "typed_config": _any("xds.type.matcher.v3.HttpAttributesCelMatchInput"),
                },
                "custom_match": {
                    "name": "envoy.matching.matchers.cel_matcher",
                    "typed_config": _any("xds.type.matcher.v3.CelMatcher", expr_match={"cel_expr_parsed": predicate}),
                },
            }
        },
        "on_match": {
            "action": {
                "name": "skip",
                "typed_config": _any("envoy.extensions.filters.common.matcher.action.v3.SkipFilter"),
            }
        },
    }
    return {
        "name": name,
        "typed_config": _any(
            "envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            extension_config=filter_config,
            xds_matcher={"matcher_list": {"matchers": [skip]}},
        ),
    }


def credential_name(provider_id: str) -> str:
    """The SDS secret (and file) name of a provider's key header value."""
    return "key." + re.sub(r"[^A-Za-z0-9_.-]", "_", provider_id)


def credential_file(credentials_dir: str, provider_id: str) -> str:
    return f"{credentials_dir}/{credential_name(provider_id)}.json"


def _credential_injector(provider: pb.Provider, opts: GatewayOptions) -> dict[str, Any]:
    """Envoy adds a provider's key on every attempt to it, from an SDS file that holds the whole
    header value: keys never pass through the ext_proc and never appear in Envoy's config."""
    name = credential_name(provider.id)
    source = {
        "path_config_source": {
            "path": credential_file(opts.credentials_dir, provider.id),
            "watched_directory": {"path": opts.credentials_dir},
        },
        "resource_api_version": "V3",
    }
    injector = {
        "name": "envoy.filters.http.credential_injector",
        "typed_config": _any(
            "envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
            overwrite=True,
            allow_request_without_credential=False,
            credential={
                "name": "envoy.http.injected_credentials.generic",
                "typed_config": _any(
                    "envoy.extensions.http.injected_credentials.generic.v3.Generic",
                    header=provider.auth.header or "authorization",
                    credential={"name": name, "sds_config": source},
                ),
            },
        ),
    }
    return _skip_when(f"signalbox.key.{provider.id}", injector, picked_host_not_of(provider.id))


def _upstream_phase(cfg: pb.RoutingConfig, opts: GatewayOptions, members: list[pb.Backend]) -> list[dict[str, Any]]:
    """Upstream filters of one aggregate cluster, per attempt: every key header removed (the
    client's included), the key of the picked backend's provider added by Envoy, and the
    upstream-phase ext_proc only on attempts the target route did not prepare (failover,
    hedging, Azure paths): it sets that backend's path, authority and body model.
    """
    key_headers = sorted({"authorization", "api-key", *(p.auth.header.lower() for p in cfg.providers if p.auth.header)})
    strip_keys = {
        "name": "signalbox.strip_keys",
        "typed_config": _any(
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            mutations={"request_mutations": [{"remove": h} for h in key_headers]},
        ),
    }
    providers = {p.id: p for p in cfg.providers}
    keyed = sorted({b.provider_id for b in members if providers[b.provider_id].HasField("auth")})
    credentials = [_credential_injector(providers[pid], opts) for pid in keyed] if opts.credentials_dir else []
    extproc = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": _extproc_filter(opts, request_attributes=["xds.upstream_host_metadata"]),
    }
    return [
        strip_keys,
        *credentials,
        _skip_when("signalbox.upstream_phase", extproc, prepared_for_picked_host()),
        _remove_gateway_headers("signalbox.strip_gateway_headers_upstream"),
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": _any("envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"),
        },
    ]


def _remove_gateway_headers(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "typed_config": _any(
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            mutations={"request_mutations": [{"remove": h} for h in GATEWAY_HEADERS]},
        ),
    }


def clusters(cfg: pb.RoutingConfig, opts: GatewayOptions) -> list[dict[str, Any]]:
    providers = {p.id: p for p in cfg.providers}
    out = []
    for backend in cfg.backends:
        out.append(_any("envoy.config.cluster.v3.Cluster", **_backend_cluster(backend, providers[backend.provider_id])))
    for policy in cfg.policies:
        for i, pb_backend in enumerate(policy.backends):
            if not pb_backend.target:
                continue
            members = chain(cfg, policy, i)
            out.append(
                _any(
                    "envoy.config.cluster.v3.Cluster",
                    name=pb_backend.target,
                    connect_timeout="1s",
                    lb_policy="CLUSTER_PROVIDED",
                    cluster_type={
                        "name": "envoy.clusters.aggregate",
                        "typed_config": _any(
                            "envoy.extensions.clusters.aggregate.v3.ClusterConfig",
                            clusters=[b.cluster for b in members],
                        ),
                    },
                    typed_extension_protocol_options=_http1_options(_upstream_phase(cfg, opts, members)),
                    circuit_breakers={"thresholds": [STREAM_LIMITS]},
                )
            )
    return out


# --------------------------------------------------------------------------- listener


def _retry_policy(policy: pb.Policy) -> dict[str, Any]:
    retry_on = sorted({_RETRY_ON[r] for r in policy.retry_on})
    retry: dict[str, Any] = {
        "retry_on": ",".join(retry_on) or "5xx",
        "num_retries": max(policy.max_attempts - 1, 0),
        # Each retry moves to the next priority of the aggregate cluster, i.e. the next backend.
        "retry_priority": {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": _any(
                "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                update_frequency=1,
            ),
        },
        "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.05s"},
    }
    if "429" in policy.retry_on:
        retry["retriable_status_codes"] = [429]
    per_try = policy.hedge_delay_ms if policy.strategy == pb.FASTEST else policy.per_try_timeout_ms
    if per_try:
        retry["per_try_timeout"] = _ms(per_try)
    return retry


def _response_headers() -> list[dict[str, Any]]:
    def header(name: str, value: str) -> dict[str, Any]:
        return {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}

    return [
        header("x-signalbox-provider", f"%UPSTREAM_METADATA({METADATA_NS}:provider)%"),
        header("x-signalbox-model", f"%UPSTREAM_METADATA({METADATA_NS}:model)%"),
        header("x-signalbox-policy", f"%DYNAMIC_METADATA({METADATA_NS}:policy)%"),
        header("x-signalbox-reason", f"%DYNAMIC_METADATA({METADATA_NS}:reason)%"),
        header("x-signalbox-class", f"%DYNAMIC_METADATA({METADATA_NS}:class)%"),
        # Echoed back in POST /v1/feedback to teach adaptive routing (see README).
        header("x-signalbox-decision", f"%DYNAMIC_METADATA({METADATA_NS}:decision)%"),
    ]


def _set(name: str, value: str) -> dict[str, Any]:
    return {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _routes(cfg: pb.RoutingConfig, opts: GatewayOptions) -> list[dict[str, Any]]:
    """One route per target (a policy's backend as first choice), matched on the target the
    router phase put in dynamic metadata; then what Envoy answers without Python."""
    providers = {p.id: p for p in cfg.providers}
    routes: list[dict[str, Any]] = []
    first_target = ""
    for policy in cfg.policies:
        for pb_backend in policy.backends:
            if not pb_backend.target:
                continue
            first_target = first_target or pb_backend.target
            route: dict[str, Any] = {
                "cluster": pb_backend.target,
                "timeout": _ms(policy.timeout_ms),
                "auto_host_rewrite": True,
                "retry_policy": _retry_policy(policy),
            }
            if policy.strategy == pb.FASTEST:
                route["hedge_policy"] = {"hedge_on_per_try_timeout": True}
            backend = cfg.backends[pb_backend.backend]
            provider = providers[backend.provider_id]
            prepared = [_set(BODY_MODEL_HEADER, backend.upstream_model)]
            if provider.type != pb.AZURE_OPENAI:
                # The first attempt is prepared here, by Envoy: the provider's path (the query
                # string is kept) and, through auto_host_rewrite, its authority. Azure's paths
                # name the deployment and need an api-version: its attempts go to the upstream phase.
                route["regex_rewrite"] = {"pattern": {"regex": "^/v1/"}, "substitution": provider.base_path + "/"}
                prepared.append(_set(PREPARED_HEADER, backend.id))
            routes.append(
                {
                    "name": pb_backend.target,
                    "match": {
                        "prefix": "/",
                        "dynamic_metadata": [
                            {
                                "filter": METADATA_NS,
                                "path": [{"key": "target"}],
                                "value": {"string_match": {"exact": pb_backend.target}},
                            }
                        ],
                    },
                    "route": route,
                    "request_headers_to_add": prepared,
                    "response_headers_to_add": _response_headers(),
                }
            )
    # GET /v1/models is answered by Envoy from the compiled aliases: no body, no Python.
    routes.append(
        {
            "name": "models",
            "match": {"path": MODELS_PATH, "headers": [_method("GET")]},
            "direct_response": {"status": 200, "body": {"inline_bytes": _b64(models_listing(_aliases(cfg)))}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
        }
    )
    # Below: requests the router phase set no target for. The ext_proc sees every request with
    # a body and either sets a target, refuses it or fails (510, or forwarded when it fails
    # open); so in the default closed mode only bodyless requests get here.
    if opts.failure_mode == "open" and first_target:
        routes.append(
            {
                "name": "fail-open",
                "match": {"prefix": "/"},
                "route": {"cluster": first_target, "auto_host_rewrite": True},
            }
        )
    else:
        for path in (*ROUTED_PATHS, FEEDBACK_PATH):
            empty = errors.MalformedRequest(EMPTY_BODY["feedback" if path == FEEDBACK_PATH else "route"])
            routes.append(_refusal(f"empty:{path}", {"path": path, "headers": [_method("POST")]}, empty))
        for path in (*API_PATHS, FEEDBACK_PATH):
            method = errors.UnsupportedPath(f"only {'GET' if path == MODELS_PATH else 'POST'} is supported on {path}")
            routes.append(_refusal(f"method:{path}", {"path": path}, method))
        supported = ", ".join((*API_PATHS, FEEDBACK_PATH))
        routes.append(
            _refusal("unknown-path", {"prefix": "/"}, errors.UnsupportedPath(f"unknown path; supported: {supported}"))
        )
    return routes


def _method(name: str) -> dict[str, Any]:
    return {"name": ":method", "string_match": {"exact": name}}


def _refusal(name: str, match: dict[str, Any], err: errors.RequestError) -> dict[str, Any]:
    """A route that answers a request Envoy can judge alone with the error the ext_proc would give."""
    return {
        "name": name,
        "match": match,
        "direct_response": {"status": err.status, "body": {"inline_bytes": _b64(err.body())}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": "application/json"}},
            {"header": {"key": "x-signalbox-reason", "value": err.code}},
        ],
    }


def _aliases(cfg: pb.RoutingConfig) -> list[str]:
    return sorted({alias for policy in cfg.policies for alias in policy.aliases})


def models_listing(aliases: list[str]) -> bytes:
    """What `GET /v1/models` on the gateway answers: the aliases clients may send."""
    data = [{"id": a, "object": "model", "created": 0, "owned_by": "signalbox"} for a in aliases]
    return json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _local_reply_config(opts: GatewayOptions) -> dict[str, Any]:
    """Envoy's own errors (body too large, ext_proc unreachable, upstream failed) as OpenAI JSON.

    The ext_proc's refusals are local replies too and pass through these mappers, so each
    mapper is narrow: 503/504 only with an upstream response flag (the ext_proc's 503s carry
    none), 510 only arises from the ext_proc being unreachable or failing (`status_on_error`),
    and the 413 text states the same limit the ext_proc enforces.
    """

    def mapper(status: int, err: errors.RequestError, flags: list[str] | None = None) -> dict[str, Any]:
        match: dict[str, Any] = {
            "status_code_filter": {
                "comparison": {
                    "op": "EQ",
                    "value": {"default_value": status, "runtime_key": f"signalbox.local_reply.{status}"},
                }
            }
        }
        if flags:
            match = {"and_filter": {"filters": [match, {"response_flag_filter": {"flags": flags}}]}}
        return {
            "filter": match,
            "status_code": err.status,
            "body": {"inline_string": err.body().decode()},
            "body_format_override": {
                "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                "content_type": "application/json",
            },
            "headers_to_add": [
                {
                    "header": {"key": "x-signalbox-reason", "value": err.code},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        }

    upstream_flags = ["UH", "UF", "UO", "URX", "UC", "UT", "LR", "NR"]
    return {
        "mappers": [
            mapper(413, errors.PayloadTooLarge(too_large_message(opts.max_body_bytes))),
            mapper(EXTPROC_FAILED_STATUS, errors.RoutingUnavailable("the routing service is unavailable")),
            mapper(
                503, errors.NoHealthyBackend("no backend could serve the request (all attempts failed)"), upstream_flags
            ),
            mapper(504, errors.NoHealthyBackend("the upstream backend timed out"), upstream_flags),
        ]
    }


def too_large_message(limit: int) -> str:
    return f"request body exceeds the gateway's limit of {limit} bytes"


def usage_filter() -> dict[str, Any]:
    """Accounting, part 1: Envoy's Lua filter reads token usage from each routed response as it
    streams past (usage.lua; no buffering, no round trip) and leaves it in dynamic metadata."""
    source = package_files.files("signalbox.core").joinpath("usage.lua").read_text()
    return {
        "name": "signalbox.usage",
        "typed_config": _any("envoy.extensions.filters.http.lua.v3.Lua", default_source_code={"inline_string": source}),
    }


def accounting_log(opts: GatewayOptions) -> dict[str, Any]:
    """Accounting, part 2: the gRPC access log carries each finished request (decision and
    usage metadata, the endpoint that answered, timings) to the ext_proc, batched: a stream of
    any length costs the ext_proc part of one message instead of one message per chunk."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": _any(
            "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            common_config={
                "log_name": "signalbox",
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}},
                # Budgets read the ledger: spend lands within this, batched under load.
                "buffer_flush_interval": _ms(opts.accounting_flush_ms),
                "custom_tags": [
                    {
                        "tag": "backend",
                        "metadata": {
                            "kind": {"host": {}},
                            "metadata_key": {"key": METADATA_NS, "path": [{"key": "backend"}]},
                        },
                    }
                ],
            },
            additional_response_headers_to_log=["content-type"],
        ),
        # Only routed requests carry a decision; everything else is not worth a log entry.
        "filter": {
            "metadata_filter": {
                "matcher": {"filter": METADATA_NS, "path": [{"key": "decision"}], "value": {"present_match": True}}
            }
        },
    }


# One JSON line per request: what an operator asks of a gateway (who answered, why, how long,
# how many tokens). The x-signalbox-* fields are the response headers the client got (for a
# refused request: provider "none" and the error code as reason). Of the request's own headers
# only the method, path (as sent upstream) and request id are logged: never keys or prompts.
REQUEST_LOG_FORMAT: dict[str, str] = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "policy": "%RESP(X-SIGNALBOX-POLICY)%",
    "provider": "%RESP(X-SIGNALBOX-PROVIDER)%",
    "model": "%RESP(X-SIGNALBOX-MODEL)%",
    "reason": "%RESP(X-SIGNALBOX-REASON)%",
    "class": "%RESP(X-SIGNALBOX-CLASS)%",
    "prompt_tokens": f"%DYNAMIC_METADATA({METADATA_NS}:prompt_tokens)%",
    "completion_tokens": f"%DYNAMIC_METADATA({METADATA_NS}:completion_tokens)%",
}


def request_log(path: str) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": _any(
            "envoy.extensions.access_loggers.file.v3.FileAccessLog",
            path=path,
            log_format={"json_format": REQUEST_LOG_FORMAT},
        ),
    }


def router_attributes(cfg: pb.RoutingConfig) -> list[str]:
    """The attributes the router phase needs: the request line, its id and peer, and every
    header some policy reads (validated header names: safe inside a CEL string)."""
    names = {h.name for p in cfg.policies for h in p.headers} | {p.hash_header for p in cfg.policies if p.hash_header}
    safe = sorted(n for n in names if re.fullmatch(r"[A-Za-z0-9!#$%&*+.^_`|~-]+", n))
    return [*ROUTER_ATTRIBUTES, *(HEADER_ATTRIBUTE.format(n.lower()) for n in safe)]


def listener(cfg: pb.RoutingConfig, opts: GatewayOptions) -> dict[str, Any]:
    # The decision's policy and reason travel as dynamic metadata, not request headers, so they
    # reach the response headers without ever being sent to a provider.
    # Response headers (status, and which backend answered) are sent to the router phase only
    # when a policy learns from outcomes: a round trip per request that others do not pay for.
    learns = any(p.learning for p in cfg.policies)
    extra: dict[str, Any] = {"response_attributes": ["xds.upstream_host_metadata"]} if learns else {}
    # One message per request: the body, with the request's headers as attributes. The buffer
    # filter after the ext_proc holds the headers (and the router) until the body's answer has
    # put the target in dynamic metadata; the target route prepares the request. Requests
    # without a body never reach Python (GET /v1/models and refusals are routes of their own).
    router_extproc = _extproc_filter(
        opts,
        response_headers=learns,
        request_headers=False,
        request_attributes=router_attributes(cfg),
        metadata_options={"receiving_namespaces": {"untyped": [METADATA_NS]}},
        **extra,
    )
    hcm = _any(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="signalbox",
        codec_type="AUTO",
        route_config={
            "name": "signalbox",
            "virtual_hosts": [{"name": "signalbox", "domains": ["*"], "routes": _routes(cfg, opts)}],
            "request_headers_to_remove": [],
        },
        http_filters=[
            _remove_gateway_headers("signalbox.strip_client_gateway_headers"),
            {"name": "envoy.filters.http.ext_proc", "typed_config": router_extproc},
            {
                "name": "envoy.filters.http.buffer",
                "typed_config": _any(
                    "envoy.extensions.filters.http.buffer.v3.Buffer", max_request_bytes=opts.max_body_bytes
                ),
            },
            *([usage_filter()] if opts.accounting else []),
            {
                "name": "envoy.filters.http.router",
                "typed_config": _any("envoy.extensions.filters.http.router.v3.Router"),
            },
        ],
        access_log=([accounting_log(opts)] if opts.accounting else [])
        + ([request_log(opts.request_log)] if opts.request_log else []),
        local_reply_config=_local_reply_config(opts),
        stream_idle_timeout="300s",
        use_remote_address=True,
        # Clients can quote it: it is the request log's request_id.
        always_set_request_id_in_response=True,
    )
    return _any(
        "envoy.config.listener.v3.Listener",
        name=LISTENER_NAME,
        address=_address(opts.listen_address, opts.listen_port),
        per_connection_buffer_limit_bytes=opts.max_body_bytes + 64 * 1024,
        filter_chains=[{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    )


def health_listener(opts: GatewayOptions) -> dict[str, Any]:
    """Readiness and metrics for kubelet and Prometheus, without exposing the admin interface."""

    def route(path: str, cluster: str = ADMIN_CLUSTER) -> dict[str, Any]:
        return {"match": {"path": path}, "route": {"cluster": cluster}}

    extproc_metrics = [route("/metrics", EXTPROC_ADMIN_CLUSTER)] if opts.extproc_admin_port else []

    hcm = _any(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="signalbox_health",
        route_config={
            "name": "health",
            "virtual_hosts": [
                {
                    "name": "health",
                    "domains": ["*"],
                    "routes": [
                        route("/ready"),
                        route("/stats/prometheus"),
                        *extproc_metrics,
                        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
                    ],
                }
            ],
        },
        http_filters=[
            {
                "name": "envoy.filters.http.router",
                "typed_config": _any("envoy.extensions.filters.http.router.v3.Router"),
            }
        ],
    )
    return _any(
        "envoy.config.listener.v3.Listener",
        name=HEALTH_LISTENER_NAME,
        address=_address(opts.listen_address, opts.health_port or 0),
        filter_chains=[{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    )
