"""The tracing part of the generated Envoy config (issue 14): off unless a collector is named;
named, every request's listener traces to it with the decision's attributes and no prompt."""

from __future__ import annotations

import pytest

from signalbox.core import envoygen
from signalbox.core.compiler import compile_config
from signalbox.core.envoygen import tracing
from tests.factories import backend, model, policy, provider


def generated(**options):
    result = compile_config(
        [provider("a", "http://127.0.0.1:9001/v1", [model("m")])], [policy("p", ["auto"], [backend("a", "m")])]
    )
    opts = envoygen.GatewayOptions(**options)
    files = envoygen.resources(result.config, opts)
    (hcm,) = [f["typed_config"] for f in files["lds.json"]["resources"][0]["filter_chains"][0]["filters"]]
    return hcm, [c["name"] for c in files["cds.json"]["resources"]], envoygen.bootstrap(opts, "/tmp/x")


def test_no_collector_no_tracing():
    hcm, clusters, boot = generated()
    assert "tracing" not in hcm and envoygen.contract.OTLP_CLUSTER not in clusters and "layered_runtime" not in boot


def test_a_collector_gets_every_request_and_attempt_with_the_decision_and_never_a_body():
    hcm, clusters, boot = generated(otlp_endpoint="collector.observability:4317", trace_sampling_percent=5)
    assert envoygen.contract.OTLP_CLUSTER in clusters
    assert hcm["tracing"]["spawn_upstream_span"] and hcm["tracing"]["random_sampling"] == {"value": 5}
    tags = {t["tag"]: t["value"] for t in hcm["tracing"]["custom_tags"]}
    assert {"gen_ai.request.model", "gen_ai.usage.input_tokens", "signalbox.policy", "signalbox.backend"} <= set(tags)
    assert not any("BODY" in v or "REQ(" in v for v in tags.values())  # metadata and our headers only
    assert boot["layered_runtime"]["layers"][0]["static_layer"]["tracing.opentelemetry.flush_interval_ms"] == 1000


@pytest.mark.parametrize("endpoint", ["collector", "http://collector:4317", "collector:http", "c:70000", ":4317"])
def test_an_endpoint_is_host_and_port(endpoint):
    with pytest.raises(ValueError, match="host:port"):
        tracing.host_port(endpoint)
