"""How a gateway process is wired (`GatewayOptions`), and the small builders every part of
the generated config uses."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Literal

from .contract import EXTPROC_CLUSTER

_T = "type.googleapis.com/"
SYSTEM_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"
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
    "auth": "retriable-status-codes",
}
# The statuses behind "retriable-status-codes", by retry_on name.
_RETRIABLE_STATUSES = {"429": (429,), "auth": (401, 403)}


@dataclass(frozen=True)
class GatewayOptions:
    """How the gateway process is wired; not part of the routing config.

    failure_mode: what happens when the ext_proc cannot be reached. "closed" (default) answers
    503 `routing_unavailable`; "open" sends the request unrouted to the first target, as the
    client sent it (path, model); Envoy still adds that provider's key.
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
    # The largest answer Envoy reads whole (a JSON answer's usage is at its end). Embeddings
    # answers are the large ones: 1,000 inputs (LangChain's batch) at 3,072 dimensions are
    # 16 MB in base64 (the SDK's default) and about 60 MB as floats. Requests stay bounded by
    # max_body_bytes (envoygen.listener._request_size_guard).
    max_answer_bytes: int = 64 * 1024 * 1024
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
    # Backend clusters get their endpoints from the ext_proc over ADS (extproc.xds): resolved
    # there, and marked unhealthy while a backend rests, pushed within a quarter second. Off:
    # Envoy resolves each provider's host itself and rests reach only the router phase (the
    # generator's own tests, a bare `signalbox extproc`). See `endpoints_over_ads`.
    ads: bool = False
    # Token and cost accounting (Envoy's JSON and SSE readers take usage, the gRPC access log
    # carries it to the ext_proc in batches): spend metrics and budgets need it (cost:
    # bench/README.md).
    accounting: bool = True
    # An OpenTelemetry collector (host:port, OTLP over gRPC) Envoy sends spans to; "": no tracing.
    otlp_endpoint: str = ""
    # Share of requests traced, in percent.
    trace_sampling_percent: float = 100.0
    # Envoy's outlier detection events (ejections of backends failing repeatedly), one JSON line
    # each, for the ext_proc to report (extproc/outliers.py); "": not written.
    outlier_event_log: str = ""
    # The CA bundle upstream TLS is verified against: the system's, or a file of private CAs
    # (providers behind an internal TLS endpoint; the tests' own CA).
    upstream_ca_file: str = SYSTEM_CA_FILE
    # The upstream-phase ext_proc that translates attempts to a backend of another API family
    # (skipped by a header matcher on every other attempt). Off only to measure what it costs.
    translation: bool = True
    # Where provider keys are, one file per provider holding the whole header value
    # (`credential_file`): attempt.lua adds each attempt's key inside Envoy. "" (unit tests of
    # the generator only): no keys are added.
    credentials_dir: str = ""
    # Where Envoy writes one JSON line per request (REQUEST_LOG_FORMAT); "" writes none.
    # Locally `<workdir>/requests.log`; in a pod /dev/stdout, so `kubectl logs` shows it.
    request_log: str = ""

    @property
    def endpoints_over_ads(self) -> bool:
        """Whether backend endpoints come over ADS. Not when failing open: an Envoy that
        starts while the ext_proc is down would have no endpoint to route to, and failing open
        promises to route without it (with the ext_proc's rests then steering decided
        requests only)."""
        return self.ads and self.failure_mode == "closed"


def upstream_tls(host: str, ca_file: str) -> dict[str, Any]:
    """The transport socket of a cluster that speaks TLS to `host`: SNI, the chain verified
    against `ca_file`, and the certificate's names checked against `host` (Envoy checks no
    name unless told: any certificate a trusted CA signed, for any name, would do)."""
    try:
        ipaddress.ip_address(host)
        san_type = "IP_ADDRESS"
    except ValueError:
        san_type = "DNS"
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": _any(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            sni=host,
            common_tls_context={
                "validation_context": {
                    "trusted_ca": {"filename": ca_file},
                    "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": host}}],
                }
            },
        ),
    }


# The router-phase ext_proc's name in the listener's filter chain, which routes name to
# configure it per route.
EXTPROC_FILTER = "envoy.filters.http.ext_proc"


def _any(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": _T + type_name, **fields}


def _ms(value: int) -> str:
    return f"{value / 1000:.3f}s"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _admin_address(opts: GatewayOptions) -> dict[str, Any]:
    return {"pipe": {"path": opts.admin_socket}} if opts.admin_socket else _address(opts.admin_address, opts.admin_port)


# A stream Envoy could not open to a worker goes to another worker at once. Why: a worker that was
# killed or is restarting refuses connections, and until outlier detection has taken it out
# (a post to Envoy's main thread and back, slow on a busy machine) LEAST_REQUEST prefers it,
# since a host that fails at once never has requests open: every stream it was given was a 503
# (54 in 4 s in one CI run). Only failures before the worker saw anything are retried: a stream a
# worker reset is never sent to a second one, so a request that crashes a worker cannot crash
# them all. It is GrpcService's retry policy, not EnvoyGrpc's (that one only paces re-opening
# xDS streams).
EXTPROC_RETRY: dict[str, Any] = {
    "retry_on": "connect-failure,refused-stream",
    "num_retries": 3,
    "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.025s"},
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ],
    # LEAST_REQUEST's two random picks favour the refusing worker (5 in 9 with three workers):
    # a retry re-picks up to this many times to find a worker it has not tried.
    "host_selection_retry_max_attempts": 6,
}


def extproc_grpc_service(timeout_ms: int | None = None) -> dict[str, Any]:
    """How a filter or access log reaches the ext_proc workers (GrpcService)."""
    service: dict[str, Any] = {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}, "retry_policy": EXTPROC_RETRY}
    if timeout_ms is not None:
        service["timeout"] = _ms(timeout_ms)
    return service
