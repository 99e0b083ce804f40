"""The gateway pod's fixed layout, in one place.

The Helm chart's Envoy bootstrap (helm/signalbox/files/envoy-bootstrap.json, written by `make
chart-files`), the init container and the sidecar (`signalbox config-sync` and `signalbox
gateway-sidecar` defaults) all derive from these constants, and the bootstrap is produced by the
same generator `signalbox up` uses, so a cluster and a laptop run the same Envoy shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from signalbox.core import envoygen

WORKDIR = "/run/signalbox"
LISTEN_PORT = 8080
HEALTH_PORT = 8081
ADMIN_PORT = 9901
# The ext_proc's admin API (127.0.0.1 unless the chart's gateway.adminApi.expose).
EXTPROC_ADMIN_PORT = 8083
EXTPROC_SOCKET = f"{WORKDIR}/extproc.sock"
# One bootstrap per failure mode (the chart picks by gateway.failureMode): failing closed, Envoy
# takes its clusters and backend endpoints from the ext_proc over ADS; failing open it reads
# them from config-sync's files, so that it starts and routes while the ext_proc is down.
BOOTSTRAP_FILES: dict[str, str] = {
    "closed": "helm/signalbox/files/envoy-bootstrap.json",
    "open": "helm/signalbox/files/envoy-bootstrap-open.json",
}


def options(
    workdir: str = WORKDIR,
    failure_mode: Literal["closed", "open"] = "closed",
    max_body_bytes: int = 8 * 1024 * 1024,
    listen_port: int = LISTEN_PORT,
    health_port: int = HEALTH_PORT,
    admin_port: int = ADMIN_PORT,
    admin_socket: str = "",
    extproc_admin_port: int = EXTPROC_ADMIN_PORT,
    accounting: bool = True,
    request_log: bool = True,
    otlp_endpoint: str = "",
    trace_sampling_percent: float = 100.0,
    upstream_ca_file: str = envoygen.SYSTEM_CA_FILE,
) -> envoygen.GatewayOptions:
    """Ports are overridable only so tests can run a pod's processes side by side on one host."""
    return envoygen.GatewayOptions(
        listen_address="0.0.0.0",
        listen_port=listen_port,
        admin_address="127.0.0.1",
        admin_port=admin_port,
        admin_socket=admin_socket,
        health_port=health_port,
        extproc_admin_port=extproc_admin_port,
        extproc_sockets=(f"{workdir}/extproc.sock",),
        credentials_dir=f"{workdir}/credentials",
        failure_mode=failure_mode,
        max_body_bytes=max_body_bytes,
        accounting=accounting,
        request_log="/dev/stdout" if request_log else "",
        outlier_event_log=f"{workdir}/{envoygen.contract.OUTLIER_EVENTS_FILE}",
        otlp_endpoint=otlp_endpoint,
        trace_sampling_percent=trace_sampling_percent,
        upstream_ca_file=upstream_ca_file,
        ads=True,
    )


def bootstrap(workdir: str = WORKDIR, failure_mode: Literal["closed", "open"] = "closed") -> dict[str, Any]:
    return envoygen.bootstrap(options(workdir, failure_mode), f"{workdir}/envoy")


def bootstrap_json(failure_mode: Literal["closed", "open"] = "closed") -> str:
    return json.dumps(bootstrap(failure_mode=failure_mode), indent=2, sort_keys=True) + "\n"


def write_bootstrap_files() -> None:
    """`make chart-files`: the chart's bootstraps, one per failure mode."""
    for mode, path in BOOTSTRAP_FILES.items():
        Path(path).write_text(bootstrap_json(mode))  # type: ignore[arg-type]
