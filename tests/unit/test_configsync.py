"""The gateway side of a ConfigMap change: good data is written, bad data changes nothing."""

import json
from pathlib import Path

import kubernetes

from signalbox.configsync import ConfigSync
from signalbox.core import bundle, envoygen
from signalbox.core.compiler import compile_config
from signalbox.core.envoygen import GatewayOptions
from signalbox.extproc.reload import read_config
from signalbox.gatewayfiles import CONFIG_FILE
from tests.factories import backend, model, policy, provider


def config_data(generation: int, alias: str = "auto", schema_version: int | None = None) -> dict[str, str | None]:
    cfg = compile_config(
        [provider("p", "http://127.0.0.1:1/v1", [model("m")])],
        [policy("x", [alias], [backend("p", "m")])],
        generation=generation,
    ).config
    if schema_version is not None:
        cfg.schema_version = schema_version
    return bundle.pack(cfg, "cm").configmap_data()


def test_good_configmap_is_written_and_bad_ones_change_nothing(tmp_path):
    sync = ConfigSync(
        kubernetes.client.ApiClient(), "ns", "cm", tmp_path, GatewayOptions(extproc_sockets=("/run/x.sock",))
    )
    assert sync.apply(config_data(1))
    config_file = tmp_path / CONFIG_FILE
    written = config_file.read_bytes()
    listener = json.loads(Path(envoygen.resource_file(f"{tmp_path}/envoy", "lds.json")).read_text())
    assert read_config(config_file).generation == 1
    assert listener["resources"][0]["name"] == "signalbox_gateway"

    broken = {**config_data(2, alias="other"), bundle.INLINE_KEY: "{broken"}
    assert not sync.apply(broken)
    assert not sync.apply({**config_data(2, alias="other"), bundle.MANIFEST_KEY: "{broken"})
    assert not sync.apply(config_data(2, alias="other", schema_version=99))
    assert not sync.apply({})
    assert config_file.read_bytes() == written
    assert [g for g, _ in sync.applied] == [1]

    assert sync.apply(config_data(3, alias="fast"))
    assert "fast" in {alias for p in read_config(config_file).policies for alias in p.aliases}
