"""What the time-to-first-token deadline costs (`make bench-first-token`, issue 13).

One gateway with two compiled failover aliases over the same backend of one fake provider: one
with `failover.firstTokenTimeoutMs` (each attempt's answer headers wait in an upstream ext_proc
until its first body bytes: two gRPC messages per attempt), one without. Plain Envoy forwards
the same requests to the same fake in the same round. Measured for JSON answers and streams of
100 chunks, in alternating rounds: throughput ÷ plain Envoy and the median latency added.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from signalbox.local import LocalGateway
from tests.factories import backend, dump, model, policy, provider

from . import dataplane

RESULTS = Path(__file__).parent / "results"
CHUNKS = 100
ALIASES = ("plain-deadlines", "first-token")


def resources(workdir: Path, upstream: str) -> Path:
    out = workdir / "resources"
    out.mkdir()
    failover = {"perTryTimeoutMs": 30000}
    (out / "bench.yaml").write_text(
        dump(
            provider("p", upstream + "/v1", [model("m", upstreamName="bench-model")]),
            policy("plain-deadlines", ["plain-deadlines"], [backend("p", "m")], strategy="failover", failover=failover),
            policy(
                "first-token",
                ["first-token"],
                [backend("p", "m")],
                strategy="failover",
                failover={"firstTokenTimeoutMs": 30000},
            ),
        )
    )
    return out


def script(path: Path, alias: str, stream: bool) -> Path:
    body = {"model": alias, "messages": [{"role": "user", "content": "Summarize Hamlet."}], "max_tokens": 64}
    headers = 'wrk.headers["Content-Type"] = "application/json"\n'
    if stream:
        body["stream"] = True
        headers += f'wrk.headers["x-fake-chunks"] = "{CHUNKS}"\n'
    path.write_text(f'wrk.method = "POST"\n{headers}wrk.body = [[{json.dumps(body)}]]\n')
    return path


def main(argv: list[str] | None = None) -> int:
    args = dataplane.round_args(__doc__, argv)
    work = Path(tempfile.mkdtemp(prefix="signalbox-first-token-"))
    fake, upstream = dataplane.start_fake()
    plain, plain_port = dataplane.plain_envoy(upstream, work, 1)
    files = resources(work, upstream)
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for n in range(args.rounds):
            gateway = LocalGateway(
                paths=[str(files)], port=0, workdir=work / f"gw-{n}", start_fakes=False, envoy_concurrency=1
            )
            gateway.start()
            try:
                for alias in ALIASES:
                    for shape in ("json", "streamed"):
                        lua = script(work / f"{alias}-{shape}.lua", alias, shape == "streamed")
                        plain_url = f"http://127.0.0.1:{plain_port}/v1/chat/completions"
                        ours = dataplane.against_plain(
                            gateway.url + "/chat/completions", plain_url, args.seconds, args.connections, lua, alias
                        )
                        runs.setdefault((alias, shape), []).append(ours)
                        print(
                            f"round {n} {alias:15} {shape:8} {ours['rps']:7.0f} rps (plain {ours['plain_rps']:7.0f}), "
                            f"p50 {ours['p50_ms']:.2f} ms",
                            flush=True,
                        )
            finally:
                gateway.stop()
    finally:
        plain.terminate()
        fake.terminate()
    report = []
    for (alias, shape), values in sorted(runs.items()):
        ratio = statistics.median(v["rps"] / v["plain_rps"] for v in values)
        added = statistics.median(v["p50_ms"] - v["plain_p50_ms"] for v in values)
        report.append(
            {
                "alias": alias,
                "shape": shape,
                "throughput_ratio": round(ratio, 3),
                "added_p50_ms": round(added, 3),
                "rps": round(statistics.median(v["rps"] for v in values)),
            }
        )
        print(f"{alias:15} {shape:8} gateway/plain {ratio:.3f}, +{added:.2f} ms p50")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "first_token.json").write_text(
        json.dumps({"rounds": args.rounds, "seconds": args.seconds, "chunks": CHUNKS, "results": report}, indent=2)
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
