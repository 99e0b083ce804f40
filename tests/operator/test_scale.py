"""A large generated fleet round-trips through the path a cluster uses: compile, publish in
parts to the (emulated) API, config-sync's files, a real Envoy and ext_proc serving the first
and the last alias; then a change republishes it and the parts no manifest names are gone."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import httpx
import pytest

from bench.fleet import KEY_ENV, alias, fleet
from signalbox import pod
from signalbox.core import bundle, envoygen
from signalbox.core.compiler import compile_config
from signalbox.extproc.reload import read_config
from signalbox.gatewayfiles import CONFIG_FILE
from signalbox.local import envoy_binary
from signalbox.operator.reconciler import OperatorConfig, Reconciler

from .conftest import CM_NAME, CM_NAMESPACE, config_sync_children, envoy_listeners

pytestmark = pytest.mark.dataplane
# Large enough that the models listing outgrows Envoy's default 4 KiB direct response (which
# once made Envoy reject the whole listener), and that keys in an SDS subscription per provider
# (an inotify instance or two each) outgrew the kernel's default 128 and aborted Envoy; small
# enough to start in seconds here.
PROVIDERS = POLICIES = 200
FLEET_KEY = "sk-fleet-0123456789"
OBJECT_CHARS = 4_000  # forces parts; the default limit is 900,000 characters per object


async def configmaps(cluster) -> dict[str, dict]:
    items = await asyncio.to_thread(cluster.api.core.list_namespaced_config_map, CM_NAMESPACE)
    return {i.metadata.name: i.to_dict() for i in items.items}


async def test_a_large_fleet_is_published_in_parts_and_served_by_envoy(k8s, cluster, fake, tmp_path):
    providers, policies = fleet(PROVIDERS, 5, POLICIES + 2, 5, fake.url + "/v1", keyed=True)
    fake.behaviour.api_key = FLEET_KEY  # every request must carry its provider's key
    config = OperatorConfig(configmap_namespace=CM_NAMESPACE, configmap_name=CM_NAME, max_object_chars=OBJECT_CHARS)
    reconciler = Reconciler(config, cluster.api)
    first = compile_config(providers, policies[:POLICIES], generation=1).config
    await reconciler.publish(first)

    stored = await configmaps(cluster)
    manifest = bundle.read_manifest(stored[CM_NAME]["data"])
    assert len(manifest["parts"]) >= 3 and set(manifest["parts"]) < set(stored)
    assert bundle.INLINE_KEY not in stored[CM_NAME]["data"]
    assert all(len(json.dumps(cm["data"])) < 1024 * 1024 for cm in stored.values())

    admin_socket = str(tmp_path / "envoy-admin.sock")
    common = [f"--server={k8s.url}", f"--configmap={CM_NAMESPACE}/{CM_NAME}", f"--workdir={tmp_path}"]
    common += ["--listen-port=0", "--health-port=0", f"--admin-socket={admin_socket}"]
    cli = [sys.executable, "-m", "signalbox.cli"]
    env = {**os.environ, KEY_ENV: FLEET_KEY}  # the pod's environment names the providers' key
    init = await asyncio.create_subprocess_exec(*cli, "config-sync", "--once", *common, env=env)
    assert await init.wait() == 0
    assert len(read_config(tmp_path / CONFIG_FILE).policies) == POLICIES

    options = pod.options(str(tmp_path), listen_port=0, health_port=0, admin_socket=admin_socket)
    (tmp_path / "bootstrap.json").write_text(json.dumps(envoygen.bootstrap(options, f"{tmp_path}/envoy")))
    log = (tmp_path / "processes.log").open("ab")
    sidecar = await asyncio.create_subprocess_exec(
        *cli, "gateway-sidecar", *common, "--health-address=127.0.0.1:0", stdout=log, stderr=log, env=env
    )
    envoy = await asyncio.create_subprocess_exec(
        envoy_binary(), "-c", str(tmp_path / "bootstrap.json"), "--use-dynamic-base-id", "--disable-hot-restart",
        "--log-level", "warning", stdout=log, stderr=log,
    )  # fmt: skip
    try:
        bound = await envoy_listeners(cluster, admin_socket, {envoygen.LISTENER_NAME}, timeout=120)
        base = f"http://127.0.0.1:{bound[envoygen.LISTENER_NAME]}/v1"
        async with httpx.AsyncClient(timeout=30) as http:

            async def answers(model: str):
                body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
                r = await http.post(f"{base}/chat/completions", json=body)
                return r.status_code == 200 and r.headers["x-signalbox-policy"].endswith(f"r{int(model[6:]):05d}")

            assert await cluster.eventually(lambda: answers(alias(0)), timeout=30)
            # Envoy reads the routes from their file and gets the chains over ADS, in batches:
            # the last policy's chain can arrive a moment after the first's (its alias answers a
            # 503 routing_unavailable meanwhile, test_config_race).
            assert await cluster.eventually(lambda: answers(alias(POLICIES - 1)), timeout=30)
            listing = (await http.get(f"{base}/models")).json()
            assert len(listing["data"]) == POLICIES

            # One policy more: new parts, a new manifest; the gateway serves it, the old parts go.
            await reconciler.publish(compile_config(providers, policies[: POLICIES + 1], generation=2).config)
            assert await cluster.eventually(lambda: answers(alias(POLICIES)), timeout=30)
            stored = await configmaps(cluster)
            assert not set(manifest["parts"]) & set(stored)
            assert set(bundle.read_manifest(stored[CM_NAME]["data"])["parts"]) < set(stored)

            # The sidecar's config sync (a child process) killed, as a memory limit would: the
            # ext_proc serves on, a new child takes over, and the next change is followed.
            (first_sync,) = config_sync_children(sidecar.pid)
            os.kill(first_sync, signal.SIGKILL)
            assert await answers(alias(0))

            async def replaced():
                return [p for p in config_sync_children(sidecar.pid) if p != first_sync]

            assert await cluster.eventually(replaced, timeout=15)
            await reconciler.publish(compile_config(providers, policies, generation=3).config)
            assert await cluster.eventually(lambda: answers(alias(POLICIES + 1)), timeout=30)
            assert sidecar.returncode is None
    finally:
        for proc in (envoy, sidecar):
            if proc.returncode is None:
                proc.terminate()
        for proc in (envoy, sidecar):
            await asyncio.wait_for(proc.wait(), 15)


async def test_the_issues_fleet_round_trips_through_the_emulated_api_inline_and_in_parts(k8s, cluster):
    """2,000 providers x 5 models and 2,000 policies: 5 MB of JSON, one ConfigMap compressed;
    cut into parts under a lower limit, read back whole, and every object under 1 MiB."""
    providers, policies = fleet(2000, 5, 2000, 5)
    cfg = compile_config(providers, policies, generation=1).config
    for limit, objects in ((bundle.MAX_OBJECT_CHARS, 1), (100_000, 4)):
        config = OperatorConfig(configmap_namespace=CM_NAMESPACE, configmap_name=CM_NAME, max_object_chars=limit)
        await Reconciler(config, cluster.api).publish(cfg)
        stored = {n: cm for n, cm in (await configmaps(cluster)).items() if n.startswith(CM_NAME)}
        assert len(stored) >= objects and all(len(json.dumps(cm["data"])) < 1024 * 1024 for cm in stored.values())
        assert (await cluster.configmap())["config"]["policies"][-1]["aliases"] == [alias(1999)]
