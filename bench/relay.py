"""What the stream relay costs (`make bench-relay`, issue 13).

One gateway with two decided aliases over the same backend of one fake provider (cost routing:
one ext_proc message per request either way): one with `failover.onBrokenStream: error`, whose
streams pass the stream relay (the ext_proc's HTTP side reads every event, and the request goes
through the listener twice), one with the default `close`. JSON answers are not relayed and
should cost the same. Plain Envoy forwards the same requests to the same fake in the same round.
Measured for JSON answers and streams of 100 chunks: throughput ÷ plain Envoy and the median
latency added.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.factories import backend, dump, model, policy, provider

from . import dataplane

CHUNKS = 100
ALIASES = ("decided-close", "decided-relayed")


def resources(workdir: Path, upstream: str) -> Path:
    out = workdir / "resources"
    out.mkdir()
    models = [model("m", upstreamName="bench-model")]
    (out / "bench.yaml").write_text(
        dump(
            provider("p", upstream + "/v1", models),
            policy("decided-close", ["decided-close"], [backend("p", "m")], strategy="cost"),
            policy(
                "decided-relayed",
                ["decided-relayed"],
                [backend("p", "m")],
                strategy="cost",
                failover={"onBrokenStream": "error"},
            ),
        )
    )
    return out


def main(argv: list[str] | None = None) -> int:
    return dataplane.compare_aliases(__doc__, argv, "relay", resources, ALIASES, CHUNKS)


if __name__ == "__main__":
    sys.exit(main())
