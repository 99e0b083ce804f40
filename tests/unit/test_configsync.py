"""The gateway side of a ConfigMap change: good data is written, bad data changes nothing."""

import json
from pathlib import Path

import kubernetes

from signalbox import gatewayfiles
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


async def test_the_first_write_waits_for_envoys_backends_but_not_forever(tmp_path, monkeypatch, caplog):
    """The init container wrote the backend clusters alone; the sidecar's first full write
    waits until Envoy has warmed them, and writes anyway if Envoy never answers."""
    import asyncio
    import time

    from signalbox import configsync

    options = GatewayOptions(extproc_sockets=("/run/x.sock",), ads=True, admin_socket=str(tmp_path / "no-envoy.sock"))
    sync = ConfigSync(kubernetes.client.ApiClient(), "ns", "cm", tmp_path, options)
    monkeypatch.setattr(configsync, "ENVOY_WARM_WAIT_S", 0.3)
    started = time.monotonic()
    await sync._envoy_warm(asyncio.Event())
    assert 0.3 <= time.monotonic() - started < 5
    assert "writing its files anyway" in caplog.text

    stopping = asyncio.Event()
    stopping.set()
    started = time.monotonic()
    await sync._envoy_warm(stopping)  # a sidecar told to stop does not wait
    assert time.monotonic() - started < 0.3


def test_the_init_container_writes_the_backend_clusters_alone(tmp_path):
    options = GatewayOptions(extproc_sockets=("/run/x.sock",), ads=True)
    sync = ConfigSync(kubernetes.client.ApiClient(), "ns", "cm", tmp_path, options)
    sync.starting = True  # as initialize() sets it around its one write
    assert sync.apply(config_data(1))
    listener = json.loads(Path(envoygen.resource_file(f"{tmp_path}/envoy", "lds.json")).read_text())
    clusters = gatewayfiles.read_envoy_file(tmp_path / "envoy", "cds.json")
    assert listener["resources"] == [] and [c["type"] for c in clusters["resources"]] == ["EDS"]
    sync.starting = False
    assert sync.apply(config_data(2, alias="other"))  # the sidecar's writes are whole
    listener = json.loads(Path(envoygen.resource_file(f"{tmp_path}/envoy", "lds.json")).read_text())
    assert listener["resources"][0]["name"] == "signalbox_gateway"
