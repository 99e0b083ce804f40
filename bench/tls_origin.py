"""What a TLS provider's backend costs reached directly against through its endpoint's origin.

    python -m bench.tls_origin                  (make bench runs it)

A backend of a TLS provider used to be a TLS cluster of its own; it is now a plain cluster whose
host is its origin's internal listener, which proxies the connection to one TLS cluster per
provider endpoint (`envoygen.origins`). Two questions, one run:

- **Per request** (alternating rounds, medians): one Envoy routing every request to one backend,
  either a TLS cluster to the upstream or a plain cluster to an internal listener in front of a
  TLS cluster (the generator's own origin cluster and listener). The upstream is a second
  Envoy serving HTTPS with a fixed answer, so the upstream is not what is measured; wrk keeps
  its connections open, as clients and Envoy's pools do.
- **Memory and start** (`--backends` N): Envoy alone with N backends of one TLS endpoint, each
  its own TLS cluster (the system CA bundle, as a hosted provider's) or all through one origin.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import trustme

from bench.cluster_cost import SYSTEM_CA, _rss_mb
from bench.dataplane import RESULTS, wrk
from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core.envoygen import origins
from signalbox.core.envoygen.endpoints import origin_name
from signalbox.core.envoygen.options import STREAM_LIMITS, upstream_tls
from signalbox.local import envoy_binary, free_port, raise_open_files_limit

_T = "type.googleapis.com/"
ANSWER = json.dumps({"id": "x", "object": "chat.completion", "choices": [{"message": {"content": "hi"}}]})


def _envoy(work: Path, name: str, config: dict[str, Any]) -> subprocess.Popen:
    path = work / f"{name}.json"
    path.write_text(json.dumps(config))
    return subprocess.Popen(
        [envoy_binary(), "-c", str(path), "--concurrency", "1", "--use-dynamic-base-id", "-l", "error"],
        stdout=subprocess.DEVNULL,
        stderr=open(work / f"{name}.log", "w"),
    )


def _wait_live(admin: int, proc: subprocess.Popen, timeout: float = 300) -> float:
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                if b"LIVE" in r.read():
                    return time.monotonic() - started
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() - started > timeout:
            raise RuntimeError(f"Envoy (admin {admin}) did not start")
        time.sleep(0.05)


def _admin(port: int) -> dict[str, Any]:
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}


def _static(name: str, address: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "circuit_breakers": {"thresholds": [STREAM_LIMITS]},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


def _hcm(route: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "bench",
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": _T + "envoy.extensions.filters.http.router.v3.Router"},
                }
            ],
        },
    }


def upstream(work: Path, certs: Path, port: int, admin: int, hold_s: float = 0) -> dict[str, Any]:
    """An HTTPS server with a fixed chat answer: Envoy, so that the upstream is not the bottleneck;
    `hold_s`: each answer waits that long (Envoy's fault filter), as a long generation does."""
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(certs / "cert.pem")},
                        "private_key": {"filename": str(certs / "key.pem")},
                    }
                ]
            },
        },
    }
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": ANSWER}}}
    hcm = _hcm(route)
    if hold_s:
        delay = {"fixed_delay": f"{hold_s}s", "percentage": {"numerator": 100}}
        fault = {"@type": _T + "envoy.extensions.filters.http.fault.v3.HTTPFault", "delay": delay}
        hcm["typed_config"]["http_filters"].insert(0, {"name": "envoy.filters.http.fault", "typed_config": fault})
    return {
        "admin": _admin(admin),
        "static_resources": {
            "listeners": [
                {
                    "name": "https",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [{"filters": [hcm], "transport_socket": tls}],
                }
            ]
        },
    }


def _provider(port: int) -> pb.Provider:
    return pb.Provider(host="localhost", port=port, tls=True)


def gateway(shape: str, port: int, admin: int, upstream_port: int, ca: str, backends: int = 1) -> dict[str, Any]:
    """Envoy routing to backend b0 of `backends` backends of one TLS endpoint, each a TLS
    cluster of its own (`direct`) or a plain cluster to the endpoint's origin (`origin`)."""
    provider = _provider(upstream_port)
    origin = origin_name(provider)
    clusters, listeners = [], []
    for i in range(backends):
        if shape == "direct":
            cluster = _static(f"b{i}", {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}})
            cluster["transport_socket"] = upstream_tls("localhost", ca)
        else:
            cluster = _static(f"b{i}", {"envoy_internal_address": {"server_listener_name": origin}})
        cluster["outlier_detection"] = {"consecutive_5xx": 5, "interval": "5s", "max_ejection_percent": 100}
        clusters.append(cluster)
    if shape == "origin":
        made = origins.origin_cluster(origin, provider, ca)
        made.pop("@type")
        made["type"] = "STATIC"  # localhost, without a resolver in the way
        made["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
            "address"
        ] = "127.0.0.1"
        clusters.append(made)
        listener = origins.origin_listener(origin)
        listener.pop("@type")
        listeners.append(listener)
    route = {"match": {"prefix": "/"}, "route": {"cluster": "b0", "auto_host_rewrite": True}}
    listeners.append(
        {
            "name": "front",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [_hcm(route)]}],
        }
    )
    return {
        "admin": _admin(admin),
        "bootstrap_extensions": [origins.INTERNAL_LISTENER_EXTENSION],
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _script(path: Path) -> Path:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]})
    path.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [[{body}]]\n')
    return path


def per_request(work: Path, certs: Path, seconds: int, rounds: int, connections: int) -> dict[str, Any]:
    up_port, up_admin = free_port(), free_port()
    up = _envoy(work, "upstream", upstream(work, certs, up_port, up_admin))
    procs: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        _wait_live(up_admin, up)
        for shape in ("direct", "origin"):
            port, admin = free_port(), free_port()
            procs[shape] = (_envoy(work, shape, gateway(shape, port, admin, up_port, str(certs / "ca.pem"))), port)
            _wait_live(admin, procs[shape][0])
        script = _script(work / "post.lua")
        runs: dict[str, list[dict[str, float]]] = {"direct": [], "origin": []}
        for _, port in procs.values():
            wrk(f"http://127.0.0.1:{port}/v1/chat/completions", 1, connections, script)  # warm-up
        for _ in range(rounds):
            for shape, (_, port) in procs.items():
                got = wrk(f"http://127.0.0.1:{port}/v1/chat/completions", seconds, connections, script)
                if got["non_2xx"]:
                    raise RuntimeError(f"{shape}: {got['non_2xx']} answers were not 2xx")
                runs[shape].append(got)

        def median(shape: str, key: str) -> float:
            return round(statistics.median(r[key] for r in runs[shape]), 3)

        return {
            "rounds": rounds,
            "seconds": seconds,
            "connections": connections,
            **{f"{shape}_{key}": median(shape, key) for shape in runs for key in ("rps", "p50_ms", "p99_ms")},
            "throughput_ratio": round(median("origin", "rps") / median("direct", "rps"), 3),
            "added_p50_ms": round(median("origin", "p50_ms") - median("direct", "p50_ms"), 3),
        }
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait()
        up.terminate()
        up.wait()


def held(work: Path, certs: Path, count: int, hold_s: float) -> dict[str, Any]:
    """Envoy's memory per open request: `count` requests held `hold_s` by the upstream at once
    (one connection each, from h2load), through a TLS cluster and through an origin; the front
    Envoy's RSS sampled while they are all open, against it idle."""
    raise_open_files_limit()
    up_port, up_admin = free_port(), free_port()
    up = _envoy(work, "held-upstream", upstream(work, certs, up_port, up_admin, hold_s))
    out: dict[str, Any] = {"requests": count, "held_s": hold_s}
    try:
        _wait_live(up_admin, up)
        for shape in ("direct", "origin"):
            port, admin = free_port(), free_port()
            proc = _envoy(work, f"held-{shape}", gateway(shape, port, admin, up_port, str(certs / "ca.pem")))
            try:
                _wait_live(admin, proc)
                idle = _rss_mb(proc.pid)
                argv = [
                    "h2load",
                    "--h1",
                    "-n",
                    str(count),
                    "-c",
                    str(count),
                    "-t",
                    "2",
                    f"http://127.0.0.1:{port}/v1/models",
                ]
                load = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
                peak = idle
                while load.poll() is None:
                    peak = max(peak, _rss_mb(proc.pid))
                    time.sleep(0.5)
                report = load.stdout.read() if load.stdout else ""
                succeeded = re.search(r"(\d+) succeeded", report)
                out[shape] = {
                    "idle_mb": round(idle, 1),
                    "peak_mb": round(peak, 1),
                    "kb_per_request": round((peak - idle) * 1024 / count, 1),
                    "succeeded": int(succeeded.group(1)) if succeeded else 0,
                }
            finally:
                proc.terminate()
                proc.wait()
    finally:
        up.terminate()
        up.wait()
    return out


def memory(work: Path, backends: int) -> dict[str, Any]:
    """Envoy alone with `backends` backends of one TLS endpoint verified against the system
    CA bundle (nothing is asked of the upstream: its port is closed)."""
    out: dict[str, Any] = {"backends": backends, "ca_file": SYSTEM_CA}
    closed = free_port()
    for shape in ("direct", "origin"):
        admin = free_port()
        proc = _envoy(work, f"memory-{shape}", gateway(shape, free_port(), admin, closed, SYSTEM_CA, backends))
        try:
            ready = _wait_live(admin, proc)
            time.sleep(2)
            out[shape] = {"rss_mb": round(_rss_mb(proc.pid), 1), "ready_s": round(ready, 2)}
        finally:
            proc.terminate()
            proc.wait()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--held", type=int, default=2000, help="requests held open at once (0: skip)")
    parser.add_argument("--out", type=Path, default=RESULTS / "tls_origin.json")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="signalbox-tls-origin-"))
    ca = trustme.CA()
    ca.cert_pem.write_to_path(work / "ca.pem")
    issued = ca.issue_cert("localhost")
    issued.private_key_pem.write_to_path(work / "key.pem")
    (work / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["per_request"] = per_request(work, work, args.seconds, args.rounds, args.connections)
    # By fleet size: each run keeps the others' figures.
    result.setdefault("memory", {})[str(args.backends)] = memory(work, args.backends)
    if args.held:
        result["held"] = held(work, work, args.held, 10)
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
