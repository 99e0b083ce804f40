"""A generated fleet the size platform teams reach: P providers of M models each and P
policies of B backends, every strategy represented, for the scale benchmark and the
large-config round-trip test.

Policy i routes alias `fleet-<i>` over models of providers i, i+1, ... (so every chain is
distinct: nothing here is shared that a real fleet would not share), cycling through the
strategies. `python -m bench.fleet --out DIR` writes it as YAML for `signalbox validate/up`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

API = "signalbox.io/v1alpha1"
STRATEGIES = ("weighted", "failover", "round-robin", "fastest", "cost", "latency", "least-busy")


def alias(i: int) -> str:
    return f"fleet-{i:05d}"


# The environment variable every provider of a keyed fleet reads its key from.
KEY_ENV = "FLEET_PROVIDER_KEY"


def providers(
    count: int, models: int, base_url: str, namespace: str = "default", keyed: bool = False
) -> list[dict[str, Any]]:
    """`keyed`: every provider has a key (as real ones do), read from KEY_ENV."""
    return [
        {
            "apiVersion": API,
            "kind": "AIProvider",
            "metadata": {"name": f"p{i:05d}", "namespace": namespace},
            "spec": {
                "type": "openai-compatible",
                "baseUrl": base_url,
                **({"auth": {"env": KEY_ENV}} if keyed else {}),
                "models": [
                    {"name": f"m{j}", "inputPricePer1M": 0.1 * (j + 1), "outputPricePer1M": 0.4 * (j + 1)}
                    for j in range(models)
                ],
            },
        }
        for i in range(count)
    ]


def policies(
    count: int, provider_count: int, models: int, backends: int, namespace: str = "default"
) -> list[dict[str, Any]]:
    out = []
    for i in range(count):
        strategy = STRATEGIES[i % len(STRATEGIES)]
        refs = [
            {"provider": f"p{(i + k) % provider_count:05d}", "model": f"m{k % models}", "priority": k, "weight": 1}
            for k in range(backends)
        ]
        out.append(
            {
                "apiVersion": API,
                "kind": "RoutingPolicy",
                "metadata": {"name": f"r{i:05d}", "namespace": namespace},
                "spec": {"match": {"models": [alias(i)]}, "strategy": strategy, "backends": refs},
            }
        )
    return out


def fleet(
    provider_count: int = 2000,
    models: int = 5,
    policy_count: int = 2000,
    backends: int = 5,
    base_url: str = "",
    keyed: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(AIProvider objects, RoutingPolicy objects), as kubectl would send them."""
    url = base_url or "http://127.0.0.1:9/v1"
    return providers(provider_count, models, url, keyed=keyed), policies(policy_count, provider_count, models, backends)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--providers", type=int, default=2000)
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--policies", type=int, default=2000)
    parser.add_argument("--backends", type=int, default=5)
    parser.add_argument("--base-url", default="")
    args = parser.parse_args(argv)
    provs, pols = fleet(args.providers, args.models, args.policies, args.backends, args.base_url)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "providers.yaml").write_text(yaml.safe_dump_all(provs, sort_keys=False))
    (args.out / "policies.yaml").write_text(yaml.safe_dump_all(pols, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
