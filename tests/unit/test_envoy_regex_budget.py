"""Every regex the generator puts in Envoy's routes and listener fits the RE2 program-size
budget Envoy enforces (`re2.max_program_size.error_level`, 100 by default): a larger one makes
Envoy reject the whole route table while `signalbox validate` says the config is fine (an Azure
client-path regex of size 127 once did). Measured with RE2 itself (google-re2), which counts a
little more than Envoy's build does: a margin, not a miss."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import re2

from signalbox.core import envoygen
from signalbox.core.compiler import compile_config
from tests.factories import backend, model, policy, provider

ENVOY_MAX_PROGRAM_SIZE = 100
STRATEGIES = ("weighted", "failover", "round-robin", "fastest", "cost", "latency", "least-busy")


def regexes(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "regex" and isinstance(value, str):
                yield value
            else:
                yield from regexes(value)
    elif isinstance(node, list):
        for value in node:
            yield from regexes(value)


@pytest.mark.parametrize("ads", [False, True])
@pytest.mark.parametrize("failure_mode", ["closed", "open"])
def test_every_route_and_listener_regex_fits_envoys_budget(ads, failure_mode):
    providers = [
        provider("a", "http://a:1/v1", [model("m"), model("n")]),
        provider("b", "https://b.example.com/v1", [model("m")], type="anthropic", auth={"env": "B"}),
    ]
    policies = [
        policy(f"p-{s}", [f"alias-{s}"], [backend("a", "m"), backend("b", "m", priority=1)], strategy=s)
        for s in STRATEGIES
    ]
    compiled = compile_config(providers, policies)
    cfg = compiled.config
    assert cfg is not None, compiled.problems
    options = envoygen.GatewayOptions(ads=ads, failure_mode=failure_mode)
    documents = envoygen.resources(cfg, options)
    found = [r for name, doc in documents.items() if name != "bootstrap" for r in regexes(doc)]
    assert found, "the routes hold regexes (compiled routes, Azure client paths)"
    sizes = {r: re2.compile(r).programsize for r in found}
    assert max(sizes.values()) <= ENVOY_MAX_PROGRAM_SIZE, sizes
