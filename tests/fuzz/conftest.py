"""A routing table with every kind of policy the request path treats differently."""

from __future__ import annotations

import pytest

from signalbox.core.compiler import compile_config
from signalbox.extproc.runtime import RuntimeTable
from tests.factories import backend, model, policy, provider


def fuzz_config():
    caps = ["streaming", "tools", "vision", "json"]
    providers = [
        provider(
            "small",
            "http://127.0.0.1:1/v1",
            [model("s", quality=0.5, inputPricePer1M=0.1, outputPricePer1M=0.4, capabilities=caps)],
        ),
        provider(
            "large",
            "https://api.example.com/v1",
            [
                model("l", quality=0.9, inputPricePer1M=3, outputPricePer1M=15, capabilities=caps),
                model("e", capabilities=["embeddings"], inputPricePer1M=0.02),
            ],
            auth={"env": "FUZZ_KEY"},
        ),
    ]
    both = [backend("small", "s"), backend("large", "l")]
    policies = [
        policy("auto", ["auto"], both, strategy="cost"),
        policy("balanced", ["balanced"], [backend("small", "s", weight=3), backend("large", "l")]),
        policy(
            "by-task",
            ["by-task"],
            both,
            strategy="classified",
            routes=[{"taskTypes": ["code", "math"], "backends": ["large/l"]}],
        ),
        policy("budgeted", ["budgeted"], both, strategy="cost", budget={"hourlyUsd": 0.01}),
        policy("latency", ["latency"], both, strategy="latency", learning={"enabled": True}),
        policy("embed", ["embed"], [backend("large", "e"), backend("small", "s")], strategy="failover"),
    ]
    result = compile_config(providers, policies)
    assert result.ok, result.problems
    return result.config


@pytest.fixture(scope="session")
def table() -> RuntimeTable:
    return RuntimeTable.from_config(fuzz_config())
