"""Scale: what a large fleet costs the gateway (issue 12).

`config` runs the generated fleet (bench/fleet.py: P providers of 5 models, P policies of 5
backends, every strategy) through what a user runs: compile, the published objects (core.bundle),
the generated Envoy resources, `signalbox up` until it serves, and Envoy's and each ext_proc
worker's memory once it does, and again after DISTINCT_PROMPTS different prompts to the decided
aliases (a worker's memory must not grow with the variety of its traffic); then one policy's
change, timed until it serves traffic.

`streams` holds N concurrent streaming requests of S seconds each through one gateway (Envoy
at its default concurrency, one ext_proc worker per core) for each strategy, and reports the
errors, the streams held at the peak and Envoy's and the ext_proc's memory per stream.

    python -m bench.scale config --providers 2000
    python -m bench.scale streams --streams 5000 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trustme
import yaml
from google.protobuf import json_format

from bench.cluster_cost import SYSTEM_CA
from bench.dataplane import RESULTS, lua, start_fake, wrk
from bench.fleet import KEY_ENV, STRATEGIES, alias, fleet
from bench.fleet import policies as fleet_policies
from bench.sockets import established_to
from signalbox import gatewayfiles
from signalbox.core import bundle, envoygen
from signalbox.extproc.cooldown import Cooldowns
from signalbox.extproc.sharedstate import COOLDOWN_DB
from signalbox.local import LocalGateway, compile_files, raise_open_files_limit

BODY = {"messages": [{"role": "user", "content": "hello"}]}
RAMP_PER_SECOND = 500
# Different prompts sent to the decided aliases before the workers' memory is read again.
DISTINCT_PROMPTS = 3000
_PROMPT_WORDS_TEXT = (
    "how can I write a short function that sorts numbers explain why the sky looks blue "
    "summarize this article about rivers translate the sentence into French what is a good "
    "way to learn maths give me three ideas for a party proof prime lemma poem story email "
    "bug error"
)
_PROMPT_WORDS = _PROMPT_WORDS_TEXT.split()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pss_mb(pid: int) -> float:
    """The process's proportional set size: pages it shares with others (the embedding file
    every classifying worker maps) counted in shares, as a pod's memory is charged once."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def memory(gateway: LocalGateway) -> dict[str, Any]:
    workers = [p.pid for name, p in gateway.processes.items() if name.startswith("extproc-")]
    return {
        "envoy_mb": round(rss_mb(gateway.processes["envoy"].pid), 1),
        "extproc_worker_mb": [round(rss_mb(w), 1) for w in workers],
        "extproc_worker_pss_mb": [round(pss_mb(w), 1) for w in workers],
    }


def write_fleet(folder: Path, providers: int, policies: int, base_url: str) -> tuple[Path, Path]:
    provs, pols = fleet(providers, 5, policies, 5, base_url, keyed=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "providers.yaml").write_text(yaml.safe_dump_all(provs, sort_keys=False))
    (folder / "policies.yaml").write_text(yaml.safe_dump_all(pols, sort_keys=False))
    return folder / "providers.yaml", folder / "policies.yaml"


def fleet_gateway(files: tuple[Path, Path], workdir: Path, ca_file: Path | None = None) -> LocalGateway:
    """`signalbox up` on a written fleet, with the key its providers name in its environment
    (without it every request is refused: the streams run once measured only 503s);
    `ca_file`: the CA bundle TLS providers are verified against."""
    return LocalGateway(
        paths=[str(f) for f in files],
        port=0,
        workdir=workdir,
        start_fakes=False,
        env={KEY_ENV: "sk-fleet-key"},
        **({"upstream_ca_file": str(ca_file)} if ca_file else {}),
    )


def serves(gateway: LocalGateway, model: str, timeout: float = 60.0) -> float:
    """Seconds until `model` answers 200 (polled every 20 ms)."""
    start = time.monotonic()
    with httpx.Client(timeout=10) as client:
        while time.monotonic() - start < timeout:
            r = client.post(gateway.url + "/chat/completions", json={**BODY, "model": model})
            if r.status_code == 200:
                return time.monotonic() - start
            time.sleep(0.02)
    raise RuntimeError(f"{model} never answered 200 within {timeout} s")


def rest_to_envoy(gateway: LocalGateway, backend: Any) -> float:
    """Seconds from a 429 (with Retry-After: 30) recorded for `backend` until Envoy has its
    endpoint out (the ext_proc's ADS push; extproc.xds)."""
    cooldowns = Cooldowns(gateway.workdir / gatewayfiles.STATE_DIR / COOLDOWN_DB)
    stat = f"cluster.{backend.cluster}.membership_healthy"
    url = f"http://127.0.0.1:{gateway.admin_port}/stats"
    try:
        started = time.monotonic()
        cooldowns.observe(backend.id, 429, {"retry-after": "30"}, time.time())
        with httpx.Client(timeout=10) as client:
            while client.get(url, params={"filter": f"^{re.escape(stat)}$"}).text.strip() != f"{stat}: 0":
                if time.monotonic() - started > 60:
                    raise RuntimeError(f"{backend.id} still healthy in Envoy after 60 s")
                time.sleep(0.01)
        return round(time.monotonic() - started, 3)
    finally:
        cooldowns.close()


CHANGES = 3  # changes timed of each kind


def same_chains_policy(providers: int, index: int) -> dict[str, Any]:
    """Fleet policy 0 under another name and alias: its chains exist (no cluster changes)."""
    (policy,) = fleet_policies(1, providers, 5, 5)
    policy["metadata"]["name"] = f"r{index:05d}"
    policy["spec"]["match"]["models"] = [alias(index)]
    return policy


def new_chain_policy(providers: int, index: int) -> dict[str, Any]:
    """Fleet policy `index`, each backend moved to its provider's next model: chains no fleet
    policy has, so its change adds aggregate clusters."""
    (policy,) = fleet_policies(1, providers, 5, 5)
    policy["metadata"]["name"] = f"r{index:05d}"
    policy["spec"]["match"]["models"] = [alias(index)]
    policy["spec"]["strategy"] = "latency"  # decided: one chain per backend
    for k, ref in enumerate(policy["spec"]["backends"]):
        ref["provider"] = f"p{(index + k) % providers:05d}"
        ref["model"] = f"m{(k + 1) % 5}"
    return policy


def start_tls_fake(work: Path) -> tuple[subprocess.Popen, str, Path]:
    """The fake provider over HTTPS with a certificate for localhost from a test CA, and a CA
    file of the system bundle plus that CA: each TLS context Envoy builds from it costs what a
    hosted provider's does (bench.cluster_cost)."""
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    issued.private_key_pem.write_to_path(work / "fake.key")
    (work / "fake.pem").write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    bundle_file = work / "ca-bundle.pem"
    bundle_file.write_bytes(Path(SYSTEM_CA).read_bytes() + ca.cert_pem.bytes())
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "signalbox.cli", "fake-provider", "--id", "bench", "--port", "0"),
            *("--tls-cert", str(work / "fake.pem"), "--tls-key", str(work / "fake.key")),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    port = proc.stdout.readline().rsplit(":", 1)[1].strip().rstrip("/")
    return proc, f"https://localhost:{port}", bundle_file


def config(providers: int, policies: int, tls: bool = False) -> dict[str, Any]:
    """`tls`: every provider on one HTTPS fake (hosted providers speak TLS; their backends
    reach one origin per endpoint, envoygen.origins), verified against the system bundle."""
    work = Path(tempfile.mkdtemp(prefix="signalbox-scale-"))
    if tls:
        fake, upstream, ca_file = start_tls_fake(work)
    else:
        (fake, upstream), ca_file = start_fake(), None
    try:
        files = write_fleet(work / "fleet", providers, policies, upstream + "/v1")
        started = time.perf_counter()
        result = compile_files([str(f) for f in files])
        compile_s = time.perf_counter() - started
        cfg = result.config
        assert cfg is not None, result.problems
        started = time.perf_counter()
        resources = envoygen.resources(cfg, envoygen.GatewayOptions(credentials_dir="/run/keys", ads=True))
        generate_s = time.perf_counter() - started
        packed = bundle.pack(cfg, "signalbox-routing")
        out: dict[str, Any] = {
            "providers": providers,
            "backends": len(cfg.backends),
            "policies": policies,
            "compile_s": round(compile_s, 2),
            "envoy_generate_s": round(generate_s, 2),
            "clusters": len(resources["cds.json"]["resources"]),
            "cds_mb": round(len(json.dumps(resources["cds.json"])) / 1e6, 1),
            "lds_mb": round(len(json.dumps(resources["lds.json"])) / 1e6, 1),
            "config_json_mb": round(len(json_format.MessageToJson(cfg)) / 1e6, 2),
            "published_kb": round(packed.manifest["bytes"] / 1024, 1),
            "published_objects": 1 + len(packed.parts),
        }
        gateway = fleet_gateway(files, work / "gw", ca_file)
        started = time.perf_counter()
        try:
            gateway.start(timeout=600)
            serves(gateway, alias(0))
            out["up_ready_s"] = round(time.perf_counter() - started, 1)
            serves(gateway, alias(policies - 1))
            # The last policy's chains are the last clusters Envoy gets (over ADS, in batches).
            out["up_last_alias_s"] = round(time.perf_counter() - started, 1)
            out.update(memory(gateway))
            decided = [alias(i) for i in range(policies) if STRATEGIES[i % len(STRATEGIES)] in DECIDED_STRATEGIES]
            # A decided policy's chain reaches Envoy when its first request asks for it (on-demand
            # CDS): that request waits for it, the next does not.
            unserved = [a for a in decided if a != alias(policies - 1)][:FIRST_REQUESTS]
            first, second = first_requests(gateway, unserved)
            out["decided_first_request_ms"], out["decided_second_request_ms"] = first, second
            out["distinct_prompts_non_2xx"] = asyncio.run(distinct_prompts(gateway, decided, DISTINCT_PROMPTS))
            after = memory(gateway)
            out["extproc_worker_mb_after_distinct"] = after["extproc_worker_mb"]
            out["extproc_worker_pss_mb_after_distinct"] = after["extproc_worker_pss_mb"]
            out["envoy_mb_after_distinct"] = after["envoy_mb"]
            # Every alias twice: each backend cluster a request reaches gets a copy per Envoy
            # worker (made on first use) and keeps its connections open until they idle out.
            everyone = [alias(i) for i in range(policies)]
            out["every_alias_non_2xx"] = asyncio.run(distinct_prompts(gateway, everyone, 2 * len(everyone)))
            out["envoy_mb_after_every_alias"] = memory(gateway)["envoy_mb"]
            out["upstream_connections_after_every_alias"] = established_to(
                urlsplit(upstream).port or 443, gateway.processes["envoy"].pid
            )
            # What an attempt costs at this size: every attempt passes the skip matcher of every
            # keyed provider's credential injector (design notes). Alias 0 is compiled (weighted).
            script = lua(work / "alias0.lua", 0, alias=alias(0))
            url = gateway.url + "/chat/completions"
            wrk(url, 2, 16, script)  # warm-up
            measured = wrk(url, 5, 16, script)
            out["alias0_rps"], out["alias0_p50_ms"] = measured["rps"], measured["p50_ms"]
            out["alias0_non_2xx"] = measured["non_2xx"]
            out["rest_to_envoy_s"] = rest_to_envoy(gateway, cfg.backends[len(cfg.backends) // 2])
            # A policy more, from the file's change until its alias serves; CHANGES times each,
            # the median reported (one change varies by a tenth of a second or more here). One
            # kind routes over chains policy 0 has, so Envoy's clusters do not change; the other
            # over chains no policy has (each provider's next model): clusters are added.
            times: dict[str, list[float]] = {"one_policy_change_s": [], "new_chain_change_s": []}
            extra = files[1].read_text()
            index = policies
            for _ in range(CHANGES):
                for key, make in (
                    ("one_policy_change_s", same_chains_policy),
                    ("new_chain_change_s", new_chain_policy),
                ):
                    extra += "---\n" + yaml.safe_dump(make(providers, index), sort_keys=False)
                    started = time.perf_counter()
                    files[1].write_text(extra)
                    gateway.apply()
                    times[key].append(round(time.perf_counter() - started + serves(gateway, alias(index)), 2))
                    index += 1
            for key, measured in times.items():
                out[key] = statistics.median(measured)
                out[key.replace("_s", "_runs_s")] = measured
            # Right after a change that sends a policy elsewhere a worker also keeps the table
            # before it, for requests that arrived under the old routes (TableHolder.for_routes).
            out["extproc_worker_mb_after_changes"] = memory(gateway)["extproc_worker_mb"]
        finally:
            gateway.stop()
        return out
    finally:
        fake.terminate()


# How many decided aliases `first_requests` times.
FIRST_REQUESTS = 60


def first_requests(gateway: LocalGateway, aliases: list[str]) -> tuple[float, float]:
    """Median milliseconds of the first request to each of `aliases` (none asked before: its
    chain is asked for on the way) and of a second one right after it."""
    first, second = [], []
    with httpx.Client(timeout=30) as client:
        for model in aliases:
            for times in (first, second):
                started = time.perf_counter()
                r = client.post(f"{gateway.url}/chat/completions", json={"model": model, **_HI})
                times.append((time.perf_counter() - started) * 1000)
                r.raise_for_status()
    return round(statistics.median(first), 1), round(statistics.median(second), 1)


_HI = {"messages": [{"role": "user", "content": "hi"}]}


# The strategies whose requests the ext_proc decides (every one of them classifies the prompt).
DECIDED_STRATEGIES = ("cost", "latency", "least-busy")


async def distinct_prompts(gateway: LocalGateway, aliases: list[str], count: int) -> int:
    """Send `count` different prompts (16 at a time) over `aliases`; the answers that were not
    2xx. Each is unlike the others (a number of its own), as real traffic is."""
    failed = 0
    limit = asyncio.Semaphore(16)
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(i: int) -> None:
            nonlocal failed
            words = [_PROMPT_WORDS[(i * 7 + k * 13) % len(_PROMPT_WORDS)] for k in range(5 + i % 40)]
            body = {
                "model": aliases[i % len(aliases)],
                "messages": [{"role": "user", "content": f"{' '.join(words)} {i}"}],
            }
            async with limit:
                r = await client.post(gateway.url + "/chat/completions", json=body)
            failed += not r.is_success

        await asyncio.gather(*(one(i) for i in range(count)))
    return failed


def _active_streams(gateway: LocalGateway) -> int:
    """Requests Envoy's listener holds open now (its own gauge)."""
    url = f"http://127.0.0.1:{gateway.admin_port}/stats?filter=^http.signalbox.downstream_rq_active$"
    text = httpx.get(url, timeout=5).text
    return int(text.split(":")[1]) if ":" in text else 0


def _h2load_counts(output: str) -> dict[str, int]:
    """h2load's "requests: N total, ..., S succeeded, F failed, E errored, T timeout" line."""
    line = next((x for x in output.splitlines() if x.startswith("requests:")), None)
    if line is None:
        raise RuntimeError(f"h2load did not run:\n{output}")
    return {part.split()[1]: int(part.split()[0]) for part in line.split(":", 1)[1].split(",")}


async def _streams(
    gateway: LocalGateway, model: str, count: int, seconds: float, workdir: Path, ramp: int = RAMP_PER_SECOND
) -> dict[str, Any]:
    """`count` HTTP/1.1 connections, one streaming request each, all opened at once by h2load
    (C, so the client is not what limits the test); memory sampled while they are held."""
    body = workdir / f"{model}.json"
    body.write_text(json.dumps({**BODY, "model": model, "stream": True}))
    # Opened at RAMP_PER_SECOND (clients arrive over seconds, not in one instant): the streams
    # outlive the ramp, so all of them are open at once for most of their length.
    argv = ["h2load", "--h1", "-n", str(count), "-c", str(count), "-t", "2", "-d", str(body)]
    if ramp:
        argv += ["--rate", str(min(ramp, count)), "--rate-period", "1s"]
    argv += ["-H", "content-type: application/json", "-H", f"x-fake-chunks: {int(seconds)}"]
    argv += ["-H", "x-fake-chunk-delay-ms: 1000", gateway.url + "/chat/completions"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    peak: dict[str, Any] = {"held": 0}
    reader = asyncio.create_task(proc.communicate())
    while not reader.done():
        held = await asyncio.to_thread(_active_streams, gateway)
        if held > peak["held"]:
            peak = {"held": held, **memory(gateway)}
        await asyncio.sleep(1)
    output = (await reader)[0].decode()
    counts = _h2load_counts(output)
    failed = count - counts.get("succeeded", 0)
    status = next((x for x in output.splitlines() if x.startswith("status codes:")), "")
    run = {"streams": count, "seconds": seconds, "failed": failed, "status_codes": status, "at_peak": peak}
    # Also when nothing failed: retries to another worker (a refused connection) hide trouble.
    run["trouble"] = await asyncio.to_thread(_trouble, gateway)
    return run


_TROUBLE = ("eject", "overflow", "fail", "timeout", "reset", "cancel", "none_healthy", "retry", "5xx")


def _trouble(gateway: LocalGateway) -> dict[str, dict[str, int]]:
    """Envoy's counters of what went wrong, and of the retries that saved a request: between it
    and the ext_proc (`extproc`), summed over the providers' clusters (`providers`), and on
    its listener (`listener`)."""
    text = httpx.get(f"http://127.0.0.1:{gateway.admin_port}/stats", timeout=10).text
    out: dict[str, dict[str, int]] = {"extproc": {}, "providers": {}, "listener": {}}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if not (value.strip().isdigit() and int(value) and any(w in name for w in _TROUBLE)):
            continue
        if name.startswith(f"cluster.{envoygen.EXTPROC_CLUSTER}."):
            out["extproc"][name.split(".", 2)[2]] = int(value)
        elif name.startswith("cluster.b."):  # backend clusters: b.<namespace>.<provider>.<model>.<stat>
            stat = name.split(".", 5)[5]
            out["providers"][stat] = out["providers"].get(stat, 0) + int(value)
        elif name.startswith("http.signalbox."):
            out["listener"][name.removeprefix("http.signalbox.")] = int(value)
    return out


def _time_wait_sockets() -> int:
    """TCP sockets in TIME_WAIT on this machine (state 06 in /proc/net/tcp and tcp6)."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            total += sum(1 for line in fh if line.split()[3:4] == ["06"])
    return total


def _ports_settled(streams: int, deadline_s: float = 180.0) -> None:
    """Wait until the last run's closed connections have left TIME_WAIT (60 s on Linux). A run
    of 5,000 streams leaves about 10,000; two runs back to back left 35,000, more than the
    28,000 ephemeral ports, and the next run's connections failed (up to 199 of 5,000 streams,
    counted as the gateway's)."""
    started = time.monotonic()
    while _time_wait_sockets() > streams and time.monotonic() - started < deadline_s:
        time.sleep(1)


def streams(
    count: int, seconds: float, strategies: list[str], ramp: int = RAMP_PER_SECOND, tls: bool = False
) -> dict[str, Any]:
    """One fresh gateway per strategy (an earlier run's idle provider connections and memory
    would be counted against the next), the same fake provider for all; `tls`: over HTTPS, as
    hosted providers stream (each stream's provider connection through its origin)."""
    raise_open_files_limit()  # before the fake starts: it holds one socket per stream too
    work = Path(tempfile.mkdtemp(prefix="signalbox-streams-"))
    if tls:
        fake, upstream, ca_file = start_tls_fake(work)
    else:
        (fake, upstream), ca_file = start_fake(), None
    out: dict[str, Any] = {}
    try:
        files = write_fleet(work / "fleet", 10, len(STRATEGIES), upstream + "/v1")
        for strategy in strategies:
            _ports_settled(count)
            gateway = fleet_gateway(files, work / strategy, ca_file)
            gateway.start(timeout=120)
            try:
                model = alias(STRATEGIES.index(strategy))
                serves(gateway, model)  # a setup that refuses every request measures nothing
                idle = memory(gateway)
                run = asyncio.run(_streams(gateway, model, count, seconds, work, ramp))
            finally:
                gateway.stop()
            run["idle"] = idle
            peak = run["at_peak"]
            if peak["held"]:
                held = peak["held"]
                run["envoy_kb_per_stream"] = round((peak["envoy_mb"] - idle["envoy_mb"]) * 1024 / held, 1)
                extra = sum(peak["extproc_worker_mb"]) - sum(idle["extproc_worker_mb"])
                run["extproc_kb_per_stream"] = round(extra * 1024 / held, 2)
            out[strategy] = run
            print(strategy, json.dumps(run), flush=True)
        return out
    finally:
        fake.terminate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cfg = sub.add_parser("config")
    cfg.add_argument("--providers", type=int, default=2000)
    cfg.add_argument("--policies", type=int, default=0, help="default: as many as providers")
    cfg.add_argument("--tls", action="store_true", help="providers over HTTPS (one endpoint, the system CA bundle)")
    st = sub.add_parser("streams")
    st.add_argument("--streams", type=int, default=5000)
    st.add_argument("--seconds", type=float, default=30)
    st.add_argument("--strategies", default=",".join(STRATEGIES))
    st.add_argument("--ramp", type=int, default=RAMP_PER_SECOND, help="streams opened per second (0: all at once)")
    st.add_argument("--tls", action="store_true", help="the provider over HTTPS (the system CA bundle)")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args(argv)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.command == "config":
        run = config(args.providers, args.policies or args.providers, args.tls)
        results.setdefault("config", {})[f"{args.providers}{' tls' if args.tls else ''}"] = run
    else:
        run = streams(args.streams, args.seconds, args.strategies.split(","), args.ramp, args.tls)
        results[("streams" if args.ramp else "burst") + (" tls" if args.tls else "")] = run
    print(json.dumps(run, indent=2))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
