"""The gateway's ConfigMap watch against kmock's API emulator: each version once, a quiet watch
resumed from its resourceVersion instead of listed (and delivered) again."""

from __future__ import annotations

import asyncio

import kubernetes

from signalbox import cmwatch
from signalbox.operator.kube import api_client

NS, NAME = "signalbox-system", "watched"


async def test_a_quiet_watch_resumes_from_its_version_and_delivers_each_version_once(k8s, monkeypatch):
    monkeypatch.setattr(cmwatch, "READ_TIMEOUT", 0.3)  # quiet watches end often: they must resume
    core = kubernetes.client.CoreV1Api(api_client(str(k8s.url)))
    body = {"metadata": {"name": NAME, "namespace": NS}, "data": {"v": "1"}}
    await asyncio.to_thread(core.create_namespaced_config_map, NS, body)
    seen: list[str] = []
    stop, state = asyncio.Event(), cmwatch.WatchState()
    task = asyncio.create_task(
        cmwatch.watch_configmap(core, NS, NAME, lambda data, version: seen.append(data["v"]), stop, state)
    )
    try:
        await _until(lambda: seen == ["1"], info=lambda: (seen, state))
        await _until(lambda: state.watches >= 4)  # three quiet ends, each resumed
        await asyncio.to_thread(core.patch_namespaced_config_map, NAME, NS, {"data": {"v": "2"}})
        await _until(lambda: seen[-1:] == ["2"])
        await _until(lambda: state.watches >= 7)
        assert seen == ["1", "2"]  # nothing delivered twice by the resumes
        assert state.lists == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def _until(check, timeout: float = 10.0, info=lambda: None) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"not reached in time: {info()}"
        await asyncio.sleep(0.02)


async def test_config_sync_reads_secrets_when_the_config_changes_or_to_refresh_not_per_event(k8s, tmp_path):
    from signalbox.configsync import ConfigSync
    from signalbox.core import bundle
    from signalbox.core.compiler import compile_config
    from signalbox.core.envoygen import GatewayOptions
    from tests.factories import backend, model, policy, provider

    client = api_client(str(k8s.url))
    core = kubernetes.client.CoreV1Api(client)
    secret = {"metadata": {"name": "key", "namespace": "default"}, "stringData": {"apiKey": "sk-one"}}
    secret["data"] = {"apiKey": "c2stb25l"}  # the emulator stores data as given: base64 of sk-one
    await asyncio.to_thread(core.create_namespaced_secret, "default", secret)
    auth = {"secretRef": {"name": "key", "key": "apiKey"}}
    cfg = compile_config(
        [provider("p", "http://127.0.0.1:1/v1", [model("m")], auth=auth)],
        [policy("x", ["auto"], [backend("p", "m")])],
        {("default", "key", "apiKey")},
    ).config
    data = bundle.pack(cfg, NAME).configmap_data()
    sync = ConfigSync(client, NS, NAME, tmp_path, GatewayOptions(extproc_sockets=("/run/x.sock",)))
    key_file = tmp_path / "secrets" / "default" / "key" / "apiKey"
    # The emulator answers in this event loop: the client's blocking calls go to a thread.
    for _ in range(5):  # the same ConfigMap data again (a resumed watch, a replayed event)
        assert await asyncio.to_thread(sync.apply, data)
    assert sync.secret_reads == 1 and key_file.read_text() == "sk-one"
    assert await asyncio.to_thread(sync.refresh_secrets) is False  # nothing rotated: nothing rewritten
    await asyncio.to_thread(
        core.patch_namespaced_secret, "key", "default", {"data": {"apiKey": "c2stdHdv"}}
    )  # rotated to sk-two
    assert await asyncio.to_thread(sync.refresh_secrets) is True and key_file.read_text() == "sk-two"
    assert len(sync.applied) == 2  # republished for the new key


def test_query_booleans_are_sent_as_the_kubernetes_api_documents_them():
    """`?watch=true`, not Python's `True`: kmock (and any strict server) answered a watch sent
    with `True` as a list, so config-sync never saw a change."""
    client = api_client("http://127.0.0.1:1")
    assert client.parameters_to_tuples({"watch": True, "allowWatchBookmarks": False, "limit": 5}, None) == [
        ("watch", "true"),
        ("allowWatchBookmarks", "false"),
        ("limit", 5),
    ]
