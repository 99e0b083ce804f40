"""Clusters: one per backend, one aggregate per target (the failover chain), and the upstream
filters every attempt runs (keys by Envoy, the upstream-phase ext_proc on unprepared attempts)."""

from __future__ import annotations

import itertools
import re
from typing import Any

from signalbox.api.v1alpha1 import config_pb2 as pb

from ..compiler import chain
from .contract import EXTPROC_FAILED_STATUS, GATEWAY_HEADERS, METADATA_NS, PREPARED_HEADER
from .options import STREAM_LIMITS, GatewayOptions, _address, _any, _grpc_service, _ms


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
