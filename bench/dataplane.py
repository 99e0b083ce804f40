"""Plain Envoy vs Signalbox on the same fake upstream, same load, one run.

    make bench            (or: python -m bench.dataplane --seconds 8 --rounds 3)

Every gateway uses the same Envoy binary and concurrency and forwards to the same fake provider
process. Signalbox runs with its defaults (accounting and the request log on) and is measured
on two aliases: `compiled` (weighted 3:1, which Envoy routes alone) and `decided` (cost
routing, one ext_proc message per request). Rounds alternate (plain, compiled, decided, no-op
ext_proc, plain, ...) so drift on a noisy machine hits all; the report gives medians over
rounds, throughput ratios and the latency Signalbox adds. Load comes from `wrk` (Debian
package `wrk`) with a fixed chat-completions body.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from signalbox.local import LocalGateway, envoy_binary, free_port
from tests.factories import backend, dump, model, policy, provider

RESULTS = Path(__file__).parent / "results"
BODY = json.dumps(
    {
        "model": "compiled",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Summarize the plot of Hamlet in two sentences."},
        ],
        "max_tokens": 64,
    }
)


def start_fake() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "signalbox.cli", "fake-provider", "--id", "bench", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().rsplit(" ", 1)[1].strip()


# The two aliases every bench routes with (bench_resources): Envoy alone, or the ext_proc.
COMPILED, DECIDED = "compiled", "decided"


def bench_resources(workdir: Path, upstream: str) -> Path:
    """The policies every bench routes with: two providers on the same fake; `compiled`
    splits 3:1 (the compiled path), `decided` routes by cost (the prompt is parsed, classified
    and priced: the decided path), each with the other backend to fail over to."""
    resources = workdir / "resources"
    resources.mkdir()
    pricing = {"inputPricePer1M": 0.5, "outputPricePer1M": 1.5}
    (resources / "bench.yaml").write_text(
        dump(
            provider("one", upstream + "/v1", [model("m", upstreamName="bench-model", **pricing)]),
            provider("two", upstream + "/v1", [model("m", upstreamName="bench-model", inputPricePer1M=3)]),
            policy(COMPILED, [COMPILED], [backend("one", "m", weight=3), backend("two", "m", weight=1)]),
            policy(DECIDED, [DECIDED], [backend("one", "m"), backend("two", "m")], strategy="cost"),
        )
    )
    return resources


def noop_extproc_filter(sockets: list[str]) -> tuple[dict, dict]:
    """An ext_proc filter (request headers only: one message per request) and its cluster."""
    ext_proc = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "noop"}, "timeout": "5s"},
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SKIP",
                "request_body_mode": "NONE",
                "response_body_mode": "NONE",
            },
        },
    }
    cluster = {
        "name": "noop",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "noop",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": s}}}} for s in sockets]}],
        },
    }
    return ext_proc, cluster


def route_listener(port: int, routes: list[dict[str, Any]], stat_prefix: str = "routes") -> dict[str, Any]:
    """A listener serving `routes` with the router alone (a bare Envoy's, in the benches)."""
    return {
        "name": "routes",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": stat_prefix,
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                    },
                                }
                            ],
                            "route_config": {
                                "name": "routes",
                                # Its clusters come from the CDS file, after the listener.
                                "validate_clusters": False,
                                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
                            },
                        },
                    }
                ]
            }
        ],
    }


def plain_envoy(
    upstream: str, workdir: Path, concurrency: int, noop_sockets: list[str] | None = None
) -> tuple[subprocess.Popen, int]:
    """The baseline: one route to the fake provider, no filters but the router (with
    `noop_sockets`: plus a do-nothing ext_proc, the ceiling of any Python gRPC processor)."""
    port, admin = free_port(), free_port()
    host, upstream_port = upstream.removeprefix("http://").split(":")
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [route_listener(port, [{"match": {"prefix": "/"}, "route": {"cluster": "fake"}}], "plain")],
            "clusters": [
                {
                    "name": "fake",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "fake",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {"address": host, "port_value": int(upstream_port)}
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }
    if noop_sockets:
        ext_proc, cluster = noop_extproc_filter(noop_sockets)
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"].insert(0, ext_proc)
        bootstrap["static_resources"]["clusters"].append(cluster)
    path = workdir / ("noop-envoy.json" if noop_sockets else "plain-envoy.json")
    path.write_text(json.dumps(bootstrap))
    proc = subprocess.Popen(
        [
            envoy_binary(),
            "-c",
            str(path),
            "--log-level",
            "error",
            "--base-id",
            str(admin),
            "--concurrency",
            str(concurrency),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if subprocess.run(["curl", "-sf", f"http://127.0.0.1:{admin}/ready"], capture_output=True).returncode == 0:
            return proc, port
        time.sleep(0.1)
    raise RuntimeError("plain envoy did not start")


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def lua(path: Path, delay_ms: int, stream: bool = False, alias: str = COMPILED) -> Path:
    """A wrk script posting BODY for `alias`; delay_ms asks the fake upstream to wait."""
    extra = f'wrk.headers["x-fake-delay-ms"] = "{delay_ms}"\n' if delay_ms else ""
    body = json.dumps({**json.loads(BODY), "model": alias, **({"stream": True} if stream else {})})
    path.write_text(
        f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n{extra}wrk.body = [[{body}]]\n'
    )
    return path


def round_args(doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    """The arguments every alternating-rounds bench takes: seconds per measurement, rounds,
    wrk connections (defaults that fit `make bench` on 2 cores)."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().split("\n")[0])
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    return parser.parse_args(argv)


def against_plain(
    url: str, plain_url: str, seconds: int, connections: int, script: Path, what: str
) -> dict[str, float]:
    """The gateway at `url` and plain Envoy at `plain_url` under the same load, back to back (the
    gateway warmed up for a second first): the gateway's figures with plain Envoy's throughput
    and p50 beside them (`plain_rps`, `plain_p50_ms`). A non-2xx answer from the gateway is an
    error: a bench of failures measures nothing."""
    wrk(url, 1, connections, script)  # warm-up
    base = wrk(plain_url, seconds, connections, script)
    ours = wrk(url, seconds, connections, script)
    if ours["non_2xx"]:
        raise RuntimeError(f"{what}: {ours['non_2xx']} non-2xx answers")
    return {**ours, "plain_rps": base["rps"], "plain_p50_ms": base["p50_ms"]}


@contextlib.contextmanager
def plain_bench(name: str) -> Iterator[tuple[Path, str, int]]:
    """A bench's rounds against plain Envoy: a work folder, the fake provider's URL and plain
    Envoy's port in front of it (both stopped at the end)."""
    work = Path(tempfile.mkdtemp(prefix=f"signalbox-{name}-"))
    fake, upstream = start_fake()
    plain, plain_port = plain_envoy(upstream, work, 1)
    try:
        yield work, upstream, plain_port
    finally:
        plain.terminate()
        fake.terminate()


@contextlib.contextmanager
def serving(gateway: LocalGateway) -> Iterator[LocalGateway]:
    """`gateway` started for one round, stopped after it whatever happens."""
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def measure(
    runs: dict[Any, list[dict[str, float]]],
    key: Any,
    label: str,
    n: int,
    urls: tuple[str, str],
    args: argparse.Namespace,
    script: Path,
) -> dict[str, float]:
    """One measurement of a round (`against_plain` on `urls`: the gateway's, plain Envoy's),
    kept under `key` in `runs` and printed as round `n`'s line for `label`."""
    ours = against_plain(urls[0], urls[1], args.seconds, args.connections, script, label)
    runs.setdefault(key, []).append(ours)
    print(
        f"round {n} {label} {ours['rps']:7.0f} rps (plain {ours['plain_rps']:7.0f}), p50 {ours['p50_ms']:.2f} ms",
        flush=True,
    )
    return ours


def versus_plain(values: list[dict[str, float]]) -> tuple[float, float, int]:
    """Medians over rounds: throughput ÷ plain Envoy, p50 added to plain Envoy's (ms), rps."""
    ratio = statistics.median(v["rps"] / v["plain_rps"] for v in values)
    added = statistics.median(v["p50_ms"] - v["plain_p50_ms"] for v in values)
    return ratio, added, round(statistics.median(v["rps"] for v in values))


def chat_script(path: Path, alias: str, stream: bool, chunks: int) -> Path:
    """A wrk script posting a short chat request for `alias`; a stream of `chunks` chunks."""
    body = {"model": alias, "messages": [{"role": "user", "content": "Summarize Hamlet."}], "max_tokens": 64}
    headers = 'wrk.headers["Content-Type"] = "application/json"\n'
    if stream:
        body["stream"] = True
        headers += f'wrk.headers["x-fake-chunks"] = "{chunks}"\n'
    path.write_text(f'wrk.method = "POST"\n{headers}wrk.body = [[{json.dumps(body)}]]\n')
    return path


def compare_aliases(
    doc: str | None,
    argv: list[str] | None,
    name: str,
    resources: Callable[[Path, str], Path],
    aliases: tuple[str, ...],
    chunks: int,
) -> int:
    """A bench of a few aliases of one gateway against plain Envoy, JSON and streamed answers of
    `chunks` chunks, in alternating rounds (a fresh gateway each round, one Envoy thread):
    medians of throughput ÷ plain Envoy and of the p50 latency added, to results/<name>.json.
    `resources(workdir, upstream)` writes the gateway's YAML folder for the fake at `upstream`."""
    args = round_args(doc, argv)
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    with plain_bench(name) as (work, upstream, plain_port):
        files = resources(work, upstream)
        for n in range(args.rounds):
            gateway = LocalGateway(
                paths=[str(files)], port=0, workdir=work / f"gw-{n}", start_fakes=False, envoy_concurrency=1
            )
            with serving(gateway):
                for alias in aliases:
                    for shape in ("json", "streamed"):
                        script = chat_script(work / f"{alias}-{shape}.lua", alias, shape == "streamed", chunks)
                        urls = (gateway.url + "/chat/completions", f"http://127.0.0.1:{plain_port}/v1/chat/completions")
                        measure(runs, (alias, shape), f"{alias:15} {shape:8}", n, urls, args, script)
    report = []
    for (alias, shape), values in sorted(runs.items()):
        ratio, added, rps = versus_plain(values)
        report.append(
            {
                "alias": alias,
                "shape": shape,
                "throughput_ratio": round(ratio, 3),
                "added_p50_ms": round(added, 3),
                "rps": rps,
            }
        )
        print(f"{alias:15} {shape:8} gateway/plain {ratio:.3f}, +{added:.2f} ms p50")
    RESULTS.mkdir(exist_ok=True)
    summary = {"rounds": args.rounds, "seconds": args.seconds, "chunks": chunks, "results": report}
    (RESULTS / f"{name.replace('-', '_')}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def wrk(url: str, seconds: int, connections: int, script: Path) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    # wrk pads some values ("1.27s ") with trailing spaces.
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    if "99" not in pct:
        raise RuntimeError(f"wrk measured no latency distribution for {url}:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": _ms(pct["50"]),
        "p99_ms": _ms(pct["99"]),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def summarize(runs: dict[str, list[dict[str, float]]], target: str = "signalbox") -> dict[str, float]:
    def median(name: str, key: str) -> float:
        """`signalbox` means the gateway being summarized (`target`)."""
        return statistics.median(r[key] for r in runs[target if name == "signalbox" else name])

    return {
        "throughput_ratio": round(median("signalbox", "rps") / median("plain", "rps"), 3),
        "added_p50_ms": round(median("signalbox", "p50_ms") - median("plain", "p50_ms"), 3),
        "added_p99_ms": round(median("signalbox", "p99_ms") - median("plain", "p99_ms"), 3),
        "plain_rps": median("plain", "rps"),
        "signalbox_rps": median("signalbox", "rps"),
        "plain_p50_ms": median("plain", "p50_ms"),
        "signalbox_p50_ms": median("signalbox", "p50_ms"),
        "plain_p99_ms": median("plain", "p99_ms"),
        "signalbox_p99_ms": median("signalbox", "p99_ms"),
        "signalbox_non_2xx": sum(r["non_2xx"] for r in runs[target]),
        "plain_non_2xx": sum(r["non_2xx"] for r in runs["plain"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=1, help="Envoy worker threads (both gateways)")
    parser.add_argument("--workers", type=int, default=0, help="ext_proc worker processes (0: one per core)")
    parser.add_argument(
        "--llm-delay-ms", type=int, default=50, help="upstream delay of the secondary, LLM-like scenario (0: skip)"
    )
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("make bench needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="signalbox-bench-"))
    shapes = {"zero_latency_upstream": (0, False), "zero_latency_streamed": (0, True)}
    if args.llm_delay_ms:
        shapes[f"upstream_{args.llm_delay_ms}ms"] = (args.llm_delay_ms, False)
    # Per scenario, per target: the wrk script (the alias is the only difference between
    # the compiled and decided targets; plain Envoy and the no-op ext_proc ignore it).
    scripts = {
        scenario: {
            alias: lua(workdir / f"{scenario}-{alias}.lua", delay, stream, alias) for alias in (COMPILED, DECIDED)
        }
        for scenario, (delay, stream) in shapes.items()
    }
    fake, upstream = start_fake()
    resources = bench_resources(workdir, upstream)
    plain, plain_port = plain_envoy(upstream, workdir, args.concurrency)
    workers = args.workers or os.cpu_count() or 1
    noop_sockets = [str(workdir / f"noop-{n}.sock") for n in range(workers)]
    noops = [subprocess.Popen([sys.executable, "-m", "bench.noop_extproc", "--socket", sock]) for sock in noop_sockets]
    noop, noop_port = plain_envoy(upstream, workdir, args.concurrency, noop_sockets)
    # The product's defaults: accounting and the request log on.
    gateway = LocalGateway(
        paths=[str(resources)],
        port=0,
        workdir=workdir / "signalbox",
        start_fakes=False,
        envoy_concurrency=args.concurrency,
        extproc_workers=args.workers,
        accounting=True,
        request_log=True,
    )
    gateway.start()
    signalbox = gateway.url.removesuffix("/v1")
    targets = {
        "plain": (f"http://127.0.0.1:{plain_port}", COMPILED),
        COMPILED: (signalbox, COMPILED),
        DECIDED: (signalbox, DECIDED),
        "noop_extproc": (f"http://127.0.0.1:{noop_port}", COMPILED),
    }
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        for scenario in shapes:
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for url, alias in targets.values():
                wrk(url + "/v1/chat/completions", 2, args.connections, scripts[scenario][alias])  # warm-up
            for n in range(args.rounds):
                for target, (url, alias) in targets.items():
                    result = wrk(url + "/v1/chat/completions", args.seconds, args.connections, scripts[scenario][alias])
                    runs[target].append(result)
                    print(f"{scenario} round {n + 1} {target:12s} {result}", flush=True)
            results[scenario] = runs
    finally:
        gateway.stop()
        for proc in (plain, noop, *noops, fake):
            proc.terminate()

    def to_noop(runs: dict[str, list[dict[str, float]]]) -> float:
        return round(
            statistics.median(r["rps"] for r in runs[DECIDED])
            / statistics.median(r["rps"] for r in runs["noop_extproc"]),
            3,
        )

    headline = summarize(results["zero_latency_upstream"], COMPILED)
    report = {
        **headline,
        "decided_to_noop_ratio": to_noop(results["zero_latency_upstream"]),
        "scenarios_compiled": {name: summarize(runs, COMPILED) for name, runs in results.items()},
        "scenarios_decided": {name: summarize(runs, DECIDED) for name, runs in results.items()},
        # The ceiling: plain Envoy plus a grpc.aio ext_proc that answers one message and decides nothing.
        "scenarios_noop_extproc": {name: summarize(runs, "noop_extproc") for name, runs in results.items()},
        "decided_to_noop": {name: to_noop(runs) for name, runs in results.items()},
        "setup": {
            "connections": args.connections,
            "seconds_per_round": args.seconds,
            "rounds": args.rounds,
            "envoy_concurrency": args.concurrency,
            "extproc_workers": len(gateway.options.extproc_sockets),
            "cores": os.cpu_count(),
            "policies": "compiled: weighted 3:1 (Envoy alone); decided: cost routing (one ext_proc message); "
            "both with the defaults: accounting (Lua filter and gRPC access log) and the JSON request log",
            "upstream": "signalbox fake-provider (aiohttp), one process, shared by all",
        },
        "runs": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {
                "compiled": report["scenarios_compiled"],
                "decided": report["scenarios_decided"],
                "noop_extproc_ceiling": report["scenarios_noop_extproc"],
                "decided_to_noop": report["decided_to_noop"],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
