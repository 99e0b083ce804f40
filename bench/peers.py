"""Signalbox against the gateways users compare it with, on the same fake, load and machine.

    make bench-peers      (or: python -m bench.peers --seconds 8 --rounds 3)

The peers are installed here, pinned, each into its own environment under build/peers/ (never
a dependency of the product): LiteLLM's proxy (PyPI `litellm[proxy]`, two workers) and
Portkey's gateway (npm `@portkey-ai/gateway`, Node). Each forwards the same chat-completions
body to the same fake provider process. Rounds alternate between the gateways so machine noise
hits all of them; figures are medians over rounds: requests per second, p50/p99 latency, and
CPU milliseconds per request (user + system time of each gateway's whole process tree during
the round, divided by the requests it served). Writes bench/results/peers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from signalbox.local import LocalGateway, free_port

from .dataplane import BODY, COMPILED, DECIDED, RESULTS, bench_resources, start_fake, wrk

PEERS = Path(__file__).resolve().parents[1] / "build" / "peers"
LITELLM = "litellm[proxy]==1.106.12"
PORTKEY = "@portkey-ai/gateway@1.15.2"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# A throwaway key for the local LiteLLM proxy of the benchmark (it listens on loopback only).
LITELLM_KEY = "sk-bench-" + os.urandom(16).hex()


def install() -> tuple[Path, Path]:
    """The peers' entry points, installed on first use (pinned)."""
    venv = PEERS / "litellm-venv"
    litellm = venv / "bin" / "litellm"
    if not litellm.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", LITELLM], check=True)
    portkey_dir = PEERS / "portkey"
    portkey = portkey_dir / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    if not portkey.exists():
        portkey_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", PORTKEY], cwd=portkey_dir, check=True)
    return litellm, portkey


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its live descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
        todo += children.get(current, [])
    return total


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def first_answer(url: str, script: Path, timeout: float = 60.0) -> None:
    """Post the benchmark body with the script's headers until a 200 comes back."""
    headers = dict(re.findall(r'wrk\.headers\["([^"]+)"\] = "([^"]*)"', script.read_text()))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        request = urllib.request.Request(url, data=BODY.encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} never answered 200")


def wrk_script(path: Path, headers: dict[str, str]) -> Path:
    """The mixed load: requests alternate between the `compiled` and `decided` aliases (half
    routed by Envoy alone, half by one ext_proc message; the peers route both by name)."""
    lines = ['wrk.method = "POST"', 'wrk.headers["Content-Type"] = "application/json"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    bodies = [json.dumps({**json.loads(BODY), "model": alias}) for alias in (COMPILED, DECIDED)]
    lines += [
        f"wrk.body = [[{bodies[0]}]]",
        "local bodies = {" + ", ".join(f"[[{b}]]" for b in bodies) + "}",
        "local n = 0",
        "request = function()",
        "  n = n + 1",
        "  return wrk.format(nil, nil, nil, bodies[n % 2 + 1])",
        "end",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    if not shutil.which("wrk") or not shutil.which("npm"):
        print("make bench-peers needs wrk and npm (apt-get install wrk nodejs npm)", file=sys.stderr)
        return 2
    litellm, portkey = install()
    workdir = Path(tempfile.mkdtemp(prefix="signalbox-peers-"))
    fake, upstream = start_fake()
    procs: list[subprocess.Popen] = [fake]
    resources = bench_resources(workdir, upstream)
    gateway = LocalGateway(paths=[str(resources)], port=0, workdir=workdir / "signalbox", start_fakes=False)
    litellm_config = workdir / "litellm.yaml"
    litellm_config.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": alias,
                        "litellm_params": {"model": "openai/bench-model", "api_base": upstream + "/v1", "api_key": "x"},
                    }
                    for alias in (COMPILED, DECIDED)
                ]
            }
        )
    )
    litellm_port, portkey_port = free_port(), free_port()
    try:
        gateway.start()
        procs.append(
            subprocess.Popen(
                [str(litellm), "--config", str(litellm_config), "--port", str(litellm_port), "--num_workers", "2"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                # The proxy refuses to start without a master key; clients send it as their key.
                # Offline: the bundled model price map, no telemetry (traffic stays on loopback).
                env={
                    **os.environ,
                    "LITELLM_MASTER_KEY": LITELLM_KEY,
                    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                    "LITELLM_TELEMETRY": "False",
                },
            )
        )
        procs.append(
            subprocess.Popen(
                ["node", str(portkey), f"--port={portkey_port}", "--headless"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "NODE_ENV": "production"},
            )
        )
        wait_http(f"http://127.0.0.1:{litellm_port}/health/liveliness")
        wait_http(f"http://127.0.0.1:{portkey_port}/")
        auth = {"Authorization": f"Bearer {LITELLM_KEY}"}
        targets = {
            "signalbox": (gateway.url + "/chat/completions", wrk_script(workdir / "sb.lua", {})),
            "litellm": (
                f"http://127.0.0.1:{litellm_port}/v1/chat/completions",
                wrk_script(workdir / "litellm.lua", auth),
            ),
            "portkey": (
                f"http://127.0.0.1:{portkey_port}/v1/chat/completions",
                wrk_script(
                    workdir / "portkey.lua",
                    {**auth, "x-portkey-provider": "openai", "x-portkey-custom-host": upstream + "/v1"},
                ),
            ),
        }
        pids = {
            "signalbox": [p.pid for p in gateway.processes.values()],
            "litellm": [procs[1].pid],
            "portkey": [procs[2].pid],
        }
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for url, script in targets.values():
            first_answer(url, script)  # each peer answers once before it is measured
            wrk(url, 3, args.connections, script)  # warm-up
        for n in range(args.rounds):
            for name, (url, script) in targets.items():
                before = sum(tree_cpu_seconds(pid) for pid in pids[name])
                result = wrk(url, args.seconds, args.connections, script)
                cpu = sum(tree_cpu_seconds(pid) for pid in pids[name]) - before
                result["cpu_ms_per_request"] = round(cpu * 1000 / max(result["rps"] * args.seconds, 1), 3)
                runs[name].append(result)
                print(f"round {n + 1} {name:9s} {result}", flush=True)
    finally:
        gateway.stop()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=20)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    summary = {
        name: {key: median(name, key) for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_request")}
        | {"non_2xx": sum(r["non_2xx"] for r in runs[name])}
        for name in runs
    }
    report = {
        "summary": summary,
        "signalbox_vs": {
            peer: {
                "throughput_ratio": round(summary["signalbox"]["rps"] / summary[peer]["rps"], 2),
                "cpu_ratio": round(summary[peer]["cpu_ms_per_request"] / summary["signalbox"]["cpu_ms_per_request"], 2),
            }
            for peer in ("litellm", "portkey")
        },
        "setup": {
            "connections": args.connections,
            "seconds_per_round": args.seconds,
            "rounds": args.rounds,
            "cores": os.cpu_count(),
            "versions": {"litellm": LITELLM, "portkey": PORTKEY, "signalbox": "this checkout"},
            "load": "mixed: requests alternate between a compiled and a decided alias",
            "signalbox": "compiled: weighted 3:1 (Envoy alone); decided: cost routing (one ext_proc message); "
            f"accounting and request log on, {len(gateway.options.extproc_sockets)} ext_proc workers",
            "litellm": "proxy, 2 workers, one model entry per alias",
            "portkey": "gateway (Node), provider and custom host by header",
        },
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "peers.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"summary": summary, "signalbox_vs": report["signalbox_vs"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
