"""`signalbox up` starts Envoy on the providers' backend clusters before the policies compile
(issue 12): Envoy takes seconds to make the 2,000-provider fleet's 10,000 backend clusters on its
main thread, which the start waits on, and a backend cluster is made from its provider alone."""

from __future__ import annotations

import pytest
import yaml

from signalbox import gatewayfiles
from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core import envoygen
from signalbox.core.compiler import compile_config
from signalbox.local import LocalGateway
from tests.factories import backend, model, policy, provider

PROVIDERS = [
    provider("alpha", "http://127.0.0.1:9001/v1", [model("a1"), model("a2")]),
    provider("beta", "https://api.example.com/v1", [model("b1")], auth={"env": "BETA_KEY"}),
]
POLICIES = [
    policy("smart", ["auto"], [backend("alpha", "a1"), backend("beta", "b1")], strategy="cost"),
    policy("plain", ["plain"], [backend("alpha", "a2")], strategy="failover"),
]


def gateway(tmp_path, docs, **options) -> LocalGateway:
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "in" / "resources.yaml").write_text(yaml.safe_dump_all(docs))
    return LocalGateway(paths=[str(tmp_path / "in")], port=0, workdir=tmp_path / "work", start_fakes=False, **options)


def test_the_backend_clusters_of_the_providers_alone_are_the_whole_configs(tmp_path):
    """What Envoy starts on is what the whole config gives it: nothing is sent twice."""
    gw = gateway(tmp_path, PROVIDERS + POLICIES)
    assert gw._providers_first()
    early = pb.RoutingConfig.FromString((gw.workdir / gatewayfiles.CONFIG_FILE).read_bytes())
    assert early.generation == 0 and not early.policies and len(early.backends) == 3  # the workers' first config
    whole = compile_config(PROVIDERS, POLICIES).config
    assert list(early.backends) == list(whole.backends) and list(early.providers) == list(whole.providers)
    other = LocalGateway(paths=[], port=0, workdir=tmp_path / "other", start_fakes=False)
    gatewayfiles.write_envoy_backends_first(whole, other.workdir, gw.options)
    clusters = envoygen.resource_file(str(gatewayfiles.ENVOY_DIR), "cds.json")
    assert (gw.workdir / clusters).read_bytes() == (other.workdir / clusters).read_bytes()


@pytest.mark.parametrize("case", ["failing open", "a provider that does not compile"])
def test_the_start_waits_for_the_whole_compile_where_it_must(tmp_path, case):
    """Failing open Envoy reads its clusters from the file, and no stream holds a backend back
    until the workers know its endpoint; a provider that does not compile is the whole compile's
    to report, with everything else wrong."""
    if case == "failing open":
        gw = gateway(tmp_path, PROVIDERS + POLICIES, failure_mode="open")
    else:
        gw = gateway(tmp_path, [provider("alpha", "not a url", [model("a1")]), *POLICIES])
    assert not gw._providers_first()
    assert not (gw.workdir / gatewayfiles.CONFIG_FILE).exists()
