"""Tracing (issue 14): Envoy's own OpenTelemetry tracer, exporting over OTLP/gRPC.

Envoy makes the spans: one server span per request and, with `spawn_upstream_span`, one
client span per upstream attempt (so a failover shows each backend tried, its status and
timing). The decision goes onto the request's span as attributes, read at the span's end from
what the request log reads: the ext_proc's dynamic metadata, the usage Envoy's JSON and SSE
readers took from the answer, and the x-signalbox-* response headers. Names follow the
OpenTelemetry GenAI semantic conventions where one exists (`gen_ai.*`), Signalbox's own
(`signalbox.*`) otherwise. No attribute carries prompt or answer text.
"""

from __future__ import annotations

from typing import Any

from .contract import ALIAS_KEY, ATTEMPT_NS, GENAI_PROVIDER_KEY, METADATA_NS, OTLP_CLUSTER
from .options import GatewayOptions, _address, _any

SERVICE_NAME = "signalbox-gateway"

# Span attribute -> Envoy format string (the access log's; unknown or absent values: "").
SPAN_ATTRIBUTES: dict[str, str] = {
    "gen_ai.request.model": f"%DYNAMIC_METADATA({METADATA_NS}:{ALIAS_KEY})%",
    "gen_ai.response.model": "%RESP(X-SIGNALBOX-MODEL)%",
    # The GenAI conventions' name of the provider's kind (openai, anthropic, gcp.gemini...); the
    # AIProvider's own name is signalbox.provider.
    "gen_ai.provider.name": f"%DYNAMIC_METADATA({ATTEMPT_NS}:{GENAI_PROVIDER_KEY})%",
    "signalbox.provider": "%RESP(X-SIGNALBOX-PROVIDER)%",
    "gen_ai.usage.input_tokens": f"%DYNAMIC_METADATA({METADATA_NS}:prompt_tokens)%",
    "gen_ai.usage.output_tokens": f"%DYNAMIC_METADATA({METADATA_NS}:completion_tokens)%",
    "signalbox.policy": "%RESP(X-SIGNALBOX-POLICY)%",
    "signalbox.reason": "%RESP(X-SIGNALBOX-REASON)%",
    "signalbox.class": "%RESP(X-SIGNALBOX-CLASS)%",
    "signalbox.rollout": f"%DYNAMIC_METADATA({METADATA_NS}:rollout)%",
    "signalbox.consumer": f"%DYNAMIC_METADATA({METADATA_NS}:consumer)%",
    "signalbox.attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    # On an attempt's span, the backend it went to (on the request's, the last one).
    "signalbox.backend": "%UPSTREAM_HOST_NAME%",
}


def host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise ValueError(f"OTLP endpoint must be host:port, got {endpoint!r}")
    return host.strip("[]"), int(port)


def http_tracing(opts: GatewayOptions) -> dict[str, Any]:
    """The listener's `tracing`: the OpenTelemetry provider, sampling and span attributes."""
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": _any(
                "envoy.config.trace.v3.OpenTelemetryConfig",
                grpc_service={"envoy_grpc": {"cluster_name": OTLP_CLUSTER}, "timeout": "2s"},
                service_name=SERVICE_NAME,
            ),
        },
        "random_sampling": {"value": opts.trace_sampling_percent},
        "spawn_upstream_span": True,
        "custom_tags": [{"tag": name, "value": value} for name, value in SPAN_ATTRIBUTES.items()],
    }


def otlp_cluster(opts: GatewayOptions) -> dict[str, Any]:
    """The collector Envoy exports spans to (OTLP over gRPC, plain HTTP/2)."""
    host, port = host_port(opts.otlp_endpoint)
    return _any(
        "envoy.config.cluster.v3.Cluster",
        name=OTLP_CLUSTER,
        type="STRICT_DNS",
        dns_lookup_family="V4_PREFERRED",
        connect_timeout="1s",
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        },
        load_assignment={
            "cluster_name": OTLP_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}],
        },
    )
