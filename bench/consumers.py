"""What consumers and their limits cost (`make bench-consumers`, issue 15).

The bench policies (`dataplane.bench_resources`: `compiled`, Envoy alone, and `decided`, cost
routing in the ext_proc) under three gateways, in alternating rounds on one machine:

- `anonymous`: no consumer declared (as before consumers existed);
- `consumer`: one Consumer with a tokens-per-minute limit (high enough never to refuse, so every
  request is identified, admitted and charged), counters in the embedded SQLite store;
- `consumer-redis`: the same with the counters in a real redis-server (Unix socket).

Each is measured with wrk against the same fake upstream as plain Envoy in the same round:
throughput ÷ plain Envoy, and ÷ the anonymous gateway on the same alias. With a consumer, the
`compiled` alias is decided too (the ext_proc checks the key's hash and the limits).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from signalbox.core.keys import generate_key
from signalbox.local import LocalGateway
from tests.factories import consumer, dump
from tests.redis_server import RedisServer

from . import dataplane

RESULTS = Path(__file__).parent / "results"
KEY = generate_key()
VARIANTS = ("anonymous", "consumer", "consumer-redis")


def with_consumer(resources: Path, into: Path) -> Path:
    into.mkdir()
    (into / "bench.yaml").write_text(
        (resources / "bench.yaml").read_text()
        + "---\n"
        + dump(consumer("bench", apiKey={"env": "BENCH_KEY"}, limits={"tokensPerMinute": 10**12}))
    )
    return into


def script(path: Path, alias: str, key: str) -> Path:
    dataplane.lua(path, 0, alias=alias)
    if key:
        path.write_text(path.read_text() + f'wrk.headers["Authorization"] = "Bearer {key}"\n')
    return path


def main(argv: list[str] | None = None) -> int:
    args = dataplane.round_args(__doc__, argv)
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    with dataplane.plain_bench("consumers") as (work, upstream, plain_port):
        (work / "redis").mkdir()
        redis = RedisServer(work / "redis").start()
        anonymous = dataplane.bench_resources(work, upstream)
        keyed = with_consumer(anonymous, work / "keyed")
        try:
            for n in range(args.rounds):
                for variant in VARIANTS:
                    gateway = LocalGateway(
                        paths=[str(anonymous if variant == "anonymous" else keyed)],
                        port=0,
                        workdir=work / f"{variant}-{n}",
                        start_fakes=False,
                        envoy_concurrency=1,
                        env={"BENCH_KEY": KEY},
                        redis_url=redis.url if variant == "consumer-redis" else "",
                    )
                    with dataplane.serving(gateway):
                        for alias in (dataplane.COMPILED, dataplane.DECIDED):
                            lua = script(work / f"{variant}-{alias}.lua", alias, "" if variant == "anonymous" else KEY)
                            urls = (
                                gateway.url + "/chat/completions",
                                f"http://127.0.0.1:{plain_port}/v1/chat/completions",
                            )
                            dataplane.measure(runs, (variant, alias), f"{variant:14} {alias:8}", n, urls, args, lua)
        finally:
            redis.stop()
    report = []
    for (variant, alias), values in sorted(runs.items()):
        anon = runs[("anonymous", alias)]
        ratio, _added_to_plain, rps = dataplane.versus_plain(values)
        vs_anon = statistics.median(v["rps"] / a["rps"] for v, a in zip(values, anon, strict=True))
        added = statistics.median(v["p50_ms"] - a["p50_ms"] for v, a in zip(values, anon, strict=True))
        report.append(
            {
                "variant": variant,
                "alias": alias,
                "throughput_ratio_vs_plain": round(ratio, 3),
                "throughput_ratio_vs_anonymous": round(vs_anon, 3),
                "added_p50_ms_vs_anonymous": round(added, 3),
                "rps": rps,
            }
        )
        print(
            f"{variant:14} {alias:8} gateway/plain {ratio:.3f}, ÷ anonymous {vs_anon:.3f}, "
            f"+{added:.2f} ms p50 vs anonymous"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "consumers.json").write_text(
        json.dumps({"rounds": args.rounds, "seconds": args.seconds, "results": report}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
