"""What a rollout costs the decided path (`make bench-rollouts`, issue 17).

One gateway with the bench's `decided` policy (cost routing in the ext_proc) and two copies of
it on their own aliases: `shadowed`, whose spec.rollout shadows a candidate (a cost policy
of its own, so every request is decided twice, and both decisions are counted in the rollout
figures), and `canaried`, a canary at 100 % (the candidate serves: one decision, plus the
counts and the pause check). Rounds alternate the aliases under wrk against the same fake
upstream; the report gives each alias's median throughput ÷ `decided` in the same round
(target for the shadow: at least 0.90) and the p50 latency it adds.
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
SHADOWED, CANARIED, CANDIDATE = "shadowed", "canaried", "candidate"
ALIASES = (dataplane.DECIDED, SHADOWED, CANARIED)


def resources(workdir: Path, upstream: str) -> Path:
    out = workdir / "resources"
    out.mkdir()
    pricing = {"inputPricePer1M": 0.5, "outputPricePer1M": 1.5}
    both = [backend("one", "m"), backend("two", "m")]
    (out / "bench.yaml").write_text(
        dump(
            provider("one", upstream + "/v1", [model("m", upstreamName="bench-model", **pricing)]),
            provider("two", upstream + "/v1", [model("m", upstreamName="bench-model", inputPricePer1M=3)]),
            policy(dataplane.DECIDED, [dataplane.DECIDED], both, strategy="cost"),
            policy(SHADOWED, [SHADOWED], both, strategy="cost", rollout={"candidate": CANDIDATE}),
            policy(
                CANARIED,
                [CANARIED],
                both,
                strategy="cost",
                rollout={"candidate": CANDIDATE, "mode": "canary", "percent": 100},
            ),
            policy(CANDIDATE, [CANDIDATE], list(reversed(both)), strategy="cost", timeoutMs=30_000),
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    args = dataplane.round_args(__doc__, argv)
    work = Path(tempfile.mkdtemp(prefix="signalbox-rollouts-"))
    fake, upstream = dataplane.start_fake()
    gateway = LocalGateway(
        paths=[str(resources(work, upstream))], port=0, workdir=work / "gw", start_fakes=False, envoy_concurrency=1
    )
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        gateway.start()
        url = gateway.url + "/chat/completions"
        scripts = {alias: dataplane.lua(work / f"{alias}.lua", 0, alias=alias) for alias in ALIASES}
        for alias in ALIASES:
            dataplane.wrk(url, 1, args.connections, scripts[alias])  # warm-up
        for n in range(args.rounds):
            for alias in ALIASES:
                result = dataplane.wrk(url, args.seconds, args.connections, scripts[alias])
                if result["non_2xx"]:
                    raise RuntimeError(f"{alias}: {result['non_2xx']} non-2xx answers")
                runs.setdefault(alias, []).append(result)
                print(f"round {n} {alias:9} {result['rps']:7.0f} rps, p50 {result['p50_ms']:.2f} ms", flush=True)
    finally:
        gateway.stop()
        fake.terminate()
    base = runs[dataplane.DECIDED]
    report = []
    for alias in ALIASES:
        values = runs[alias]
        ratio = statistics.median(v["rps"] / b["rps"] for v, b in zip(values, base, strict=True))
        added = statistics.median(v["p50_ms"] - b["p50_ms"] for v, b in zip(values, base, strict=True))
        report.append(
            {
                "alias": alias,
                "rps": round(statistics.median(v["rps"] for v in values)),
                "throughput_ratio_vs_decided": round(ratio, 3),
                "added_p50_ms_vs_decided": round(added, 3),
            }
        )
        print(f"{alias:9} ÷ decided {ratio:.3f}, +{added:.2f} ms p50")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rollouts.json").write_text(
        json.dumps({"rounds": args.rounds, "seconds": args.seconds, "results": report}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
