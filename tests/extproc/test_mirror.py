"""Mirroring (issue 17): copies of a sampled share of a policy's requests to a backend being
qualified, through the real servicer and a fake provider in this event loop. The live answer
never waits for a copy; the copy carries the mirror backend's model and key, asks for no
stream, and its tokens and cost are counted apart."""

from __future__ import annotations

import asyncio
import contextlib
import json

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from signalbox.core.compiler import compile_config
from signalbox.core.errors import RequestError
from signalbox.extproc import mirror
from signalbox.extproc.reload import TableHolder
from signalbox.extproc.runtime import RuntimeTable
from signalbox.extproc.server import Processor, serve
from signalbox.fakeprovider import serving
from tests.factories import backend, model, policy, provider

from .test_grpc import exchange, router_message

ASK = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 9}


def config(shadow_url: str, percent: float = 100, **mirror_spec):
    providers = [
        provider("live", "http://127.0.0.1:9001/v1", [model("m")]),
        provider(
            "next",
            shadow_url + "/v1",
            [model("n", upstreamName="next-1", inputPricePer1M=1_000_000, outputPricePer1M=0)],
            auth={"env": "NEXT_KEY"},
        ),
        provider("claude", shadow_url, [model("c", upstreamName="claude-x")], type="anthropic"),
    ]
    pol = policy(
        "p",
        ["auto"],
        [backend("live", "m")],
        mirror={"provider": "next", "model": "n", "percent": percent, **mirror_spec},
    )
    result = compile_config(providers, [pol])
    assert result.ok, result.problems
    return result.config


@pytest.fixture
async def shadow(monkeypatch):
    monkeypatch.setenv("NEXT_KEY", "sk-next-key-0123456789")
    async with serving("next") as fake:
        yield fake


async def servicer(cfg):
    holder = TableHolder()
    holder.install(cfg)
    processor = Processor(holder, max_body_bytes=1 << 20)
    server, port = await serve(holder, "127.0.0.1:0", max_body_bytes=1 << 20, processor=processor)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return processor, server, channel, ep_grpc.ExternalProcessorStub(channel)


def sample(processor: Processor, name: str, **labels: str) -> float:
    return processor.metrics.registry.get_sample_value(name, labels) or 0.0


async def eventually(check, timeout: float = 5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not reached in time"
        await asyncio.sleep(0.01)


async def test_a_copy_goes_to_the_mirror_with_its_model_and_key_and_its_cost_is_counted_apart(shadow):
    shadow.behaviour.delay_ms = 300  # a slow mirror: the live answer must not wait for it
    processor, server, channel, stub = await servicer(config(shadow.url))
    try:
        (answer,) = await exchange(stub, router_message(json.dumps(ASK).encode()))
        meta = json_format.MessageToDict(answer.dynamic_metadata)["signalbox"]
        assert meta["target"].startswith("t.default.live.m.")  # the live decision, untouched
        assert sample(processor, "signalbox_mirror_in_flight") == 1  # answered while the copy is out
        assert not sample(
            processor, "signalbox_mirror_requests_total", policy="p", backend="default/next/n", outcome="2xx"
        )
        labels = {"policy": "p", "backend": "default/next/n"}
        await eventually(lambda: sample(processor, "signalbox_mirror_requests_total", **labels, outcome="2xx") == 1)
        (copy,) = shadow.requests
        assert copy["model"] == "next-1" and copy["stream"] is False and copy["stream_options"] is None
        assert copy["headers"]["Authorization"] == "Bearer sk-next-key-0123456789"
        assert copy["path"] == "/v1/chat/completions"
        tokens = sample(processor, "signalbox_mirror_tokens_total", **labels, direction="input")
        assert tokens > 0
        assert sample(processor, "signalbox_mirror_cost_usd_total", **labels) == pytest.approx(tokens)  # $1 a token
        assert sample(processor, "signalbox_mirror_in_flight") == 0
        # Apart: nothing of it in the policy's spend.
        assert processor.ledger.local(1e12) == {}
    finally:
        await channel.close()
        await server.stop(None)
        await processor.mirrors.close()


async def test_a_failing_or_saturated_mirror_is_counted_and_never_fails_the_live_request(shadow):
    shadow.behaviour.status = 500
    processor, server, channel, stub = await servicer(config(shadow.url, maxInFlight=1))
    labels = {"policy": "p", "backend": "default/next/n"}
    try:
        shadow.behaviour.delay_ms = 1000  # the first copy is still out when the others come
        answers = [(await exchange(stub, router_message(json.dumps(ASK).encode())))[0] for _ in range(3)]
        assert all(a.HasField("request_body") for a in answers)  # every live request decided
        assert sample(processor, "signalbox_mirror_requests_total", **labels, outcome="dropped") == 2
        await eventually(lambda: sample(processor, "signalbox_mirror_requests_total", **labels, outcome="5xx") == 1)
        assert sample(processor, "signalbox_mirror_cost_usd_total", **labels) == 0
    finally:
        await channel.close()
        await server.stop(None)
        await processor.mirrors.close()


async def test_a_mirror_samples_its_share(shadow):
    processor, server, channel, stub = await servicer(config(shadow.url, percent=25))
    processor.mirrors.rng.seed(7)
    try:
        for _ in range(400):
            await exchange(stub, router_message(json.dumps({**ASK, "stream": False}).encode()))
        await eventually(lambda: sample(processor, "signalbox_mirror_in_flight") == 0)
        sent = sample(processor, "signalbox_mirror_requests_total", policy="p", backend="default/next/n", outcome="2xx")
        assert 70 <= sent <= 130 and len(shadow.requests) == sent
    finally:
        await channel.close()
        await server.stop(None)
        await processor.mirrors.close()


def test_a_copy_for_another_api_family_is_translated_with_its_path_and_headers():
    table = RuntimeTable.from_config(config("http://127.0.0.1:9009"))
    claude = table.backends["default/claude/c"]
    url, headers, body = mirror.copy_request(claude, "/v1/chat/completions", json.dumps(ASK).encode())
    assert url == "http://127.0.0.1:9009/messages" and headers["anthropic-version"]
    sent = json.loads(body)
    assert sent["model"] == "claude-x" and sent["messages"][0]["content"] and not sent.get("stream")
    answer = {"type": "message", "role": "assistant", "content": [{"type": "text", "text": "x"}],
              "stop_reason": "end_turn", "usage": {"input_tokens": 7, "output_tokens": 3}}  # fmt: skip
    assert mirror.usage_of(claude, json.dumps(answer).encode()) == mirror.accounting.Usage(7, 3)


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_client_body_makes_a_copy_or_a_clean_refusal(raw):
    table = RuntimeTable.from_config(config("http://127.0.0.1:9009"))
    for backend_id in ("default/next/n", "default/claude/c"):
        with contextlib.suppress(ValueError, RequestError):  # the refusals maybe_copy counts
            mirror.copy_request(table.backends[backend_id], "/v1/chat/completions", raw)
        assert mirror.usage_of(table.backends[backend_id], raw) is None or raw.strip().startswith(b"{")


def test_a_mirror_names_a_declared_backend_and_makes_its_policy_decided():
    providers = [provider("live", "http://127.0.0.1:9001/v1", [model("m")])]
    missing = compile_config(
        providers, [policy("p", ["auto"], [backend("live", "m")], mirror={"provider": "live", "model": "nope"})]
    )
    assert [(p.path, p.reason) for p in missing.problems] == [("spec.mirror", "RefNotFound")]
    plain = compile_config(providers, [policy("p", ["auto"], [backend("live", "m")])])
    mirrored = compile_config(
        providers, [policy("p", ["auto"], [backend("live", "m")], mirror={"provider": "live", "model": "m"})]
    )
    assert plain.config.policies[0].compiled and not mirrored.config.policies[0].compiled
