"""The gateway pod's runtime, as the chart wires it, minus the kubelet: the operator publishes to
the (emulated) API, `config-sync --once` prepares the files (init container), `gateway-sidecar`
runs the ext_proc and the ConfigMap watch, and a real Envoy runs the pod's bootstrap. A request
through it reaches a provider whose key exists only in a Kubernetes Secret."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from signalbox import pod
from signalbox.core import envoygen
from signalbox.local import envoy_binary
from signalbox.operator.reconciler import OperatorConfig
from tests.factories import backend, model, policy, provider

from .conftest import CM_NAME, CM_NAMESPACE, config_sync_children, envoy_listeners

API_KEY = "sk-pod-test-9f8e7d"
pytestmark = pytest.mark.dataplane


async def spawn(*argv: str, log: Path) -> asyncio.subprocess.Process:
    handle = log.open("ab")
    return await asyncio.create_subprocess_exec(*argv, stdout=handle, stderr=handle)


async def test_gateway_pod_serves_from_the_configmap_with_the_secrets_key(k8s, cluster, start_operator, fake, tmp_path):
    fake.behaviour.api_key = API_KEY
    await start_operator(
        OperatorConfig(configmap_namespace=CM_NAMESPACE, configmap_name=CM_NAME, debounce_seconds=0.05, probes=False)
    )
    await cluster.secret("fake-key", {"apiKey": API_KEY})
    await cluster.apply(
        provider(
            "fake",
            fake.url + "/v1",
            [model("m", upstreamName="fake-model", inputPricePer1M=1.0, outputPricePer1M=1.0)],
            auth={"secretRef": {"name": "fake-key", "key": "apiKey"}},
        )
    )
    # Decided (cost): its spend reaches the ledger the replica publishes (a compiled policy's
    # requests are counted in metrics only).
    await cluster.apply(policy("auto", ["auto"], [backend("fake", "m")], strategy="cost"))
    await cluster.eventually(cluster.configmap)

    # Every listener on port 0 and Envoy's admin on a Unix socket: Envoy reports what it bound
    # (no port picked here and raced for).
    ports = {"--listen-port": 0, "--health-port": 0}
    admin_socket = str(tmp_path / "envoy-admin.sock")
    common = [
        f"--server={k8s.url}",
        f"--configmap={CM_NAMESPACE}/{CM_NAME}",
        f"--workdir={tmp_path}",
        f"--admin-socket={admin_socket}",
        *(f"{k}={v}" for k, v in ports.items()),
    ]
    cli = [sys.executable, "-m", "signalbox.cli"]

    init = await spawn(*cli, "config-sync", "--once", *common, log=tmp_path / "init.log")
    assert await init.wait() == 0
    assert (
        Path(envoygen.resource_file(f"{tmp_path}/envoy", "lds.json")).exists()
        and (tmp_path / "secrets" / "default" / "fake-key" / "apiKey").exists()
    )

    bootstrap = pod.options(
        str(tmp_path),
        listen_port=ports["--listen-port"],
        health_port=ports["--health-port"],
        admin_socket=admin_socket,
    )
    (tmp_path / "bootstrap.json").write_text(json.dumps(envoygen.bootstrap(bootstrap, f"{tmp_path}/envoy")))
    sidecar = await spawn(
        *cli,
        "gateway-sidecar",
        *common,
        "--health-address=127.0.0.1:0",
        f"--replica-configmap={CM_NAMESPACE}/signalbox-replicas",
        "--replica=gw-0",
        "--replica-sync-interval=0.2",
        log=tmp_path / "sidecar.log",
    )
    envoy = await spawn(
        envoy_binary(),
        "-c",
        str(tmp_path / "bootstrap.json"),
        "--use-dynamic-base-id",
        "--log-level",
        "warning",
        "--disable-hot-restart",
        log=tmp_path / "envoy.log",
    )
    try:
        names = {envoygen.LISTENER_NAME, envoygen.HEALTH_LISTENER_NAME}
        bound = await envoy_listeners(cluster, admin_socket, names, timeout=20)
        health = f"http://127.0.0.1:{bound[envoygen.HEALTH_LISTENER_NAME]}"
        async with httpx.AsyncClient() as http:

            async def ready():
                try:
                    r = await http.get(f"{health}/ready")
                    return r.status_code == 200 and (tmp_path / "extproc.sock").exists()
                except httpx.HTTPError:
                    return False

            await cluster.eventually(ready, timeout=20)
            metrics = await http.get(f"{health}/stats/prometheus")
            assert metrics.status_code == 200 and "envoy_" in metrics.text
            assert (await http.get(f"{health}/config_dump")).status_code == 404

        base = f"http://127.0.0.1:{bound[envoygen.LISTENER_NAME]}/v1"
        async with openai.AsyncOpenAI(base_url=base, api_key="client-token", max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": "hello"}]
            )
            assert raw.parse().system_fingerprint == "probed" and raw.parse().model == "fake-model"
            assert raw.headers["x-signalbox-policy"] == "auto"

            changed = time.monotonic()
            await cluster.apply(policy("auto", ["auto", "fresh"], [backend("fake", "m")], strategy="cost"))

            async def served():
                try:
                    await client.chat.completions.create(model="fresh", messages=[{"role": "user", "content": "hi"}])
                    return True
                except openai.NotFoundError:
                    return False

            await cluster.eventually(served)
            print(f"spec change -> served through Envoy in {time.monotonic() - changed:.2f}s")

        async def published():
            cm = await cluster.api.configmap(CM_NAMESPACE, "signalbox-replicas")
            return cm and json.loads(cm["data"]["gw-0.json"])

        # The replica publishes its spend (17 tokens per answer at $1 per 1M) for the others.
        spent = sum((await cluster.eventually(published))["spend"]["default/auto"].values())
        assert spent > 0 and round(spent * 1e6) % 17 == 0
        for log in tmp_path.glob("*.log"):
            assert API_KEY not in log.read_text(), log
        # The ConfigMap watch and the Envoy files run in a child of the sidecar, not in the process
        # that decides requests (cli._config_sync_process); stopping the sidecar stops it.
        (sync,) = config_sync_children(sidecar.pid)
        sidecar.terminate()
        assert await asyncio.wait_for(sidecar.wait(), 15) == 0
        assert not Path(f"/proc/{sync}").exists()
    finally:
        for proc in (envoy, sidecar):
            if proc.returncode is None:
                proc.terminate()
        for proc in (envoy, sidecar):
            await asyncio.wait_for(proc.wait(), 15)
