"""The gateway side of a ConfigMap change: good data is written, bad data changes nothing."""

import json

import kubernetes
from google.protobuf import json_format

from signalbox.configsync import CONFIG_KEY, ConfigSync
from signalbox.core.compiler import compile_config
from signalbox.core.envoygen import GatewayOptions
from tests.factories import backend, model, policy, provider


def config_json(generation: int, alias: str = "auto", schema_version: int | None = None) -> str:
    cfg = compile_config(
        [provider("p", "http://127.0.0.1:1/v1", [model("m")])],
        [policy("x", [alias], [backend("p", "m")])],
        generation=generation,
    ).config
    if schema_version is not None:
        cfg.schema_version = schema_version
    return json_format.MessageToJson(cfg)


def test_good_configmap_is_written_and_bad_ones_change_nothing(tmp_path):
    sync = ConfigSync(
        kubernetes.client.ApiClient(), "ns", "cm", tmp_path, GatewayOptions(extproc_sockets=("/run/x.sock",))
    )
    assert sync.apply({CONFIG_KEY: config_json(1)})
    written = (tmp_path / "config" / "routing-config.json").read_text()
    listener = json.loads((tmp_path / "envoy" / "lds.json").read_text())
    assert json.loads(written)["generation"] == "1"
    assert listener["resources"][0]["name"] == "signalbox_gateway"

    assert not sync.apply({CONFIG_KEY: "{broken"})
    assert not sync.apply({CONFIG_KEY: config_json(2, schema_version=99)})
    assert not sync.apply({})
    assert (tmp_path / "config" / "routing-config.json").read_text() == written
    assert [g for g, _ in sync.applied] == [1]

    assert sync.apply({CONFIG_KEY: config_json(3, alias="fast")})
    assert "fast" in (tmp_path / "config" / "routing-config.json").read_text()
