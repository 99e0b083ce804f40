"""What the time-to-first-token deadline costs (`make bench-first-token`, issue 13).

One gateway with two compiled failover aliases over the same backend of one fake provider: one
with `failover.firstTokenTimeoutMs` (each attempt's answer headers wait in an upstream ext_proc
until its first body bytes: two gRPC messages per attempt), one without. Plain Envoy forwards
the same requests to the same fake in the same round. Measured for JSON answers and streams of
100 chunks, in alternating rounds: throughput ÷ plain Envoy and the median latency added.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.factories import backend, dump, model, policy, provider

from . import dataplane

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


def main(argv: list[str] | None = None) -> int:
    return dataplane.compare_aliases(__doc__, argv, "first-token", resources, ALIASES, CHUNKS)


if __name__ == "__main__":
    sys.exit(main())
