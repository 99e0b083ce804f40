"""What a bug, a bad answer or a bad config does to the servicer: never a dropped stream, a
dead reload task or a failed request because the classifier failed."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import grpc
import pytest
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import json_format

from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core.secrets import SecretValue
from signalbox.extproc import decide
from signalbox.extproc.llm_tier import LlmClassifier
from signalbox.extproc.metrics import Metrics
from signalbox.extproc.reload import TableHolder
from signalbox.extproc.runtime import BackendRuntime, LlmTierConfig, ProviderRuntime
from signalbox.extproc.server import Processor, serve

from .test_grpc import body_msg, exchange, headers_msg, routing_config

BODY = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
async def servicer():
    holder = TableHolder()
    holder.install(routing_config())
    processor = Processor(holder, max_body_bytes=1 << 20)
    server, port = await serve(holder, "127.0.0.1:0", max_body_bytes=1 << 20, processor=processor)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield ep_grpc.ExternalProcessorStub(channel), processor
    await channel.close()
    await server.stop(None)


async def test_an_internal_error_is_a_500_with_the_request_id_not_a_dropped_stream(servicer, monkeypatch, caplog):
    stub, processor = servicer
    calls = {"n": 0}
    real_prepare = decide.prepare

    def broken_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the decision code")
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(decide, "prepare", broken_once)
    headers = {":method": "POST", ":path": "/v1/chat/completions", "x-request-id": "req-4711"}
    responses = await exchange(stub, headers_msg(headers), body_msg(BODY))
    final = responses[-1].immediate_response
    assert final.status.code == 500
    error = json.loads(final.body)["error"]
    assert error["code"] == "internal_error" and "req-4711" in error["message"]
    assert "req-4711" in caplog.text and "a bug in the decision code" in caplog.text
    assert processor.metrics.internal_errors._value.get() == 1
    # The servicer is unharmed: the next request on it is routed.
    again = await exchange(stub, headers_msg(headers), body_msg(BODY))
    assert again[-1].WhichOneof("response") == "request_body"


def test_a_config_the_data_plane_cannot_load_keeps_the_last_good_table(tmp_path):
    holder = TableHolder(metrics=Metrics())
    good = routing_config(generation=3)
    holder.install(good)
    broken = pb.RoutingConfig()
    broken.CopyFrom(good)
    broken.generation = 4
    # Written by hand (the compiler would refuse it): a rule the data plane cannot compile.
    broken.policies[0].rules.append(pb.Rule(name="bad", patterns=["(unclosed"], min_tokens=-1, max_tokens=-1))
    path = tmp_path / "routing.json"
    path.write_text(json_format.MessageToJson(broken))
    assert holder.load_file(path) is False
    assert holder.current.generation == 3
    assert "unclosed" in holder.last_error or "RuleError" in holder.last_error
    assert holder.reload_failures == 1
    path.write_text(json_format.MessageToJson(good))
    assert holder.load_file(path) is True and holder.last_error == ""


# ----------------------------------------------------------------------------- LLM tier answers

KEY = "sk-classifier-secret"


def _config(url: str) -> LlmTierConfig:
    host, port = url.split("//")[1].split(":")
    provider = ProviderRuntime(
        "default/judge", "judge", False, "http", f"{host}:{port}", "/v1", "", "authorization", SecretValue(KEY)
    )
    backend = BackendRuntime("default/judge/j", provider, "j", "judge-1", 0, 0, 0.5, 8000, frozenset(), 100)
    return LlmTierConfig(backend, timeout_s=2.0, min_confidence=0.6, cache_size=0)


@pytest.mark.parametrize(
    "answer",
    [
        {"choices": []},
        {"choices": [{"message": {"content": None}}]},
        {"choices": [{"message": {"content": "not json at all"}}]},
        {"choices": [{"message": {"content": '["a list"]'}}]},
        {"choices": [{"message": {"content": '{"task_type": "dance", "complexity": "simple"}'}}]},
        {"choices": [{"message": {}}]},
        {"unexpected": True},
        [],
        "a string",
    ],
)
async def test_the_llm_tier_never_fails_a_request_whatever_the_classifier_answers(aiohttp_server_factory, answer):
    async def classifier_answer(request: web.Request) -> web.Response:
        return web.json_response(answer)

    assert await _ask_classifier(aiohttp_server_factory, classifier_answer) == (None, 1)


async def _ask_classifier(server_factory, handler) -> tuple[object, int]:
    """The LLM tier asks a classifier served by `handler`: (its answer, failures counted)."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    url = await server_factory(app)
    classifier = LlmClassifier()
    try:
        return await classifier.classify(_config(url), "what is this", 3), classifier.failures
    finally:
        await classifier.close()


async def test_the_llm_tier_never_follows_a_redirect_with_the_key(aiohttp_server_factory):
    seen: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("authorization", ""))
        return web.json_response({"choices": [{"message": {"content": '{"task_type":"code","complexity":"simple"}'}}]})

    other = web.Application()
    other.router.add_post("/steal", elsewhere)
    other_url = await aiohttp_server_factory(other)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(other_url + "/steal")

    assert (await _ask_classifier(aiohttp_server_factory, redirect))[0] is None
    assert seen == []


@pytest.fixture
async def aiohttp_server_factory():
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


# ----------------------------------------------------------------------------- admin API


@pytest.mark.parametrize(
    ("exposed", "token", "sent", "status"),
    [
        (False, "", None, 200),  # loopback only: this host may call
        (True, "", None, 403),  # exposed without a token: privileged endpoints are off
        (True, "s3cret", None, 403),
        (True, "s3cret", "Bearer wrong", 403),
        (True, "s3cret", "Bearer s3cret", 200),
    ],
)
async def test_privileged_admin_endpoints_need_the_token_when_exposed(exposed, token, sent, status):
    from signalbox.extproc import admin

    holder = TableHolder()
    holder.install(routing_config())
    processor = Processor(holder, max_body_bytes=1 << 20)
    runner = web.AppRunner(admin.build_app(processor, token, exposed=exposed))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    headers = {"authorization": sent} if sent else {}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/route", data=BODY, headers=headers) as r:
                assert r.status == status, await r.text()
                if status == 403:
                    assert (await r.json())["error"]["code"] == "forbidden"
            async with http.get(f"{url}/metrics") as r:
                assert r.status == 200  # read-only endpoints stay open
    finally:
        await runner.cleanup()
    assert admin.is_loopback("127.0.0.1") and admin.is_loopback("::1") and not admin.is_loopback("0.0.0.0")


async def test_the_admin_apis_own_refusals_are_json_errors_not_plain_text_pages():
    """An unknown path, a wrong method and a body over the limit: the JSON error shape every
    other answer of the gateway has, which a client (or `jq`) can read."""
    from signalbox.extproc import admin

    holder = TableHolder()
    holder.install(routing_config())
    runner = web.AppRunner(admin.build_app(Processor(holder, max_body_bytes=1024)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as http:
            for method, path, data, status, code in (
                ("GET", "/v1/nothing", None, 404, "unknown_url"),
                ("DELETE", "/v1/models", None, 405, "unknown_url"),
                ("POST", "/v1/route", b"x" * 4096, 413, "request_too_large"),
            ):
                async with http.request(method, f"{url}{path}", data=data) as r:
                    assert r.content_type == "application/json", (path, await r.text())
                    assert (await r.json())["error"]["code"] == code
                    assert r.status == (404 if status == 405 else status)
    finally:
        await runner.cleanup()


async def test_latency_and_open_requests_come_from_the_access_log_not_a_held_stream():
    """A `latency` policy with learning used to return after the response headers: its
    latency average and in-flight count were never updated. Now the router phase ends its
    stream with its one answer and the request's access log entry, whichever worker gets it,
    closes the open request and feeds the latency average."""
    from envoy.data.accesslog.v3 import accesslog_pb2

    from signalbox.core.compiler import compile_config
    from signalbox.extproc.accesslog import AccessLogSink
    from tests.factories import backend, model, policy, provider

    providers = [provider("a", "http://127.0.0.1:9001/v1", [model("m")])]
    policies = [
        policy("lat", ["lat"], [backend("a", "m")], strategy="latency", learning={"enabled": True}),
        policy("busy", ["busy"], [backend("a", "m")], strategy="least-busy"),
    ]
    holder = TableHolder()
    holder.install(compile_config(providers, policies).config)
    processor = Processor(holder, max_body_bytes=1 << 20)
    server, port = await serve(holder, "127.0.0.1:0", max_body_bytes=1 << 20, processor=processor)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = ep_grpc.ExternalProcessorStub(channel)
    sink = AccessLogSink(holder, processor.metrics, processor.ledger, processor.state, processor.open)
    try:
        for alias in ("lat", "busy"):
            headers = {":method": "POST", ":path": "/v1/chat/completions", "x-request-id": f"req-{alias}"}
            call = stub.Process()
            await call.write(headers_msg(headers))
            await call.read()
            await call.write(body_msg(json.dumps({"model": alias, "messages": []}).encode()))
            routed = await call.read()
            assert routed.WhichOneof("response") == "request_body"
            assert await call.code() == grpc.StatusCode.OK  # ended by the server: nothing held
            meta = json_format.MessageToDict(routed.dynamic_metadata)["signalbox"]
            entry = accesslog_pb2.HTTPAccessLogEntry()
            entry.request.request_id = f"req-{alias}"
            entry.response.response_code.value = 200
            entry.common_properties.custom_tags["backend"] = "default/a/m"
            entry.common_properties.metadata.filter_metadata["signalbox"].update(meta)
            entry.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(120)
            if alias == "busy":
                assert processor.open.counts(time.time()) == {"default/a/m": 1}  # open while it runs
            sink.account(entry)
        assert processor.open.counts(time.time()) == {}  # closed by its access log entry
        assert "default/a/m" in processor.state.latency_ms  # latency learned
        assert any(key[2] == "default/a/m" for key in processor.state.outcomes)  # and the outcome
    finally:
        await channel.close()
        await server.stop(None)


async def test_readiness_waits_for_a_loaded_config_and_survives_a_failed_reload(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from signalbox.extproc.main import health_only_server

    holder = TableHolder()
    server, port = await health_only_server("127.0.0.1:0", holder)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    check = health_pb2_grpc.HealthStub(channel).Check
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        assert holder.load_file(tmp_path / "missing.json") is False
        assert (await check(health_pb2.HealthCheckRequest())).status != serving  # nothing to serve yet
        holder.install(routing_config())
        for _ in range(100):
            if (await check(health_pb2.HealthCheckRequest())).status == serving:
                break
            await asyncio.sleep(0.01)
        assert (await check(health_pb2.HealthCheckRequest())).status == serving
        assert holder.load_file(tmp_path / "missing.json") is False  # a bad reload keeps readiness
        assert (await check(health_pb2.HealthCheckRequest())).status == serving
    finally:
        await channel.close()
        await server.stop(None)


def test_a_stream_envoy_closed_first_is_counted_not_logged_as_an_error():
    import logging

    from grpc._cython import cygrpc

    from signalbox.extproc.main import _PeerClosedFirst

    metrics = Metrics()
    guard = _PeerClosedFirst(metrics)

    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, "", 0, "raised", None, (type(exc), exc, None))

    late_status = cygrpc.ExecuteBatchError('Failed "execute_batch": (<cygrpc.SendStatusFromServerOperation at 0x1>,)')
    lost_answer = cygrpc.ExecuteBatchError(
        'Failed "execute_batch": (<cygrpc.SendMessageOperation at 0x1>, <cygrpc.SendStatusFromServerOperation at 0x2>)'
    )
    assert guard.filter(record(late_status)) is False  # harmless: dropped, counted
    assert guard.filter(record(lost_answer)) is True  # an answer was lost: still logged
    assert guard.filter(record(RuntimeError("other"))) is True
    assert metrics.streams_closed_by_envoy._value.get() == 1
