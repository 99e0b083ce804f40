"""Policy limits through the servicer (a real gRPC stream): every caller together, with no
consumer declared; a request refused after admission gives its hold back."""

from __future__ import annotations

import json

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import json_format

from signalbox.core.compiler import compile_config
from signalbox.extproc.reload import TableHolder
from signalbox.extproc.server import serve
from tests.factories import backend, model, policy, provider

from .test_grpc import exchange, router_message

BODY = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode()


async def servicer(*policies, healthy=True):
    providers = [provider("a", "http://127.0.0.1:9001/v1", [model("m")], healthy=healthy)]
    holder = TableHolder()
    holder.install(compile_config(providers, list(policies)).config)
    server, port = await serve(holder, "127.0.0.1:0", max_body_bytes=1 << 20)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, channel, ep_grpc.ExternalProcessorStub(channel)


@pytest.fixture
async def limited():
    server, channel, stub = await servicer(policy("p", ["auto"], [backend("a", "m")], limits={"requestsPerMinute": 2}))
    yield stub
    await channel.close()
    await server.stop(None)


async def test_a_policy_limit_counts_every_caller_and_the_refusal_names_it(limited):
    answers = [(await exchange(limited, router_message(BODY)))[0] for _ in range(3)]
    first = json_format.MessageToDict(answers[0].dynamic_metadata)["signalbox"]
    assert first["limits"] == "policy:default/p" and first["limit_hold"] == "req-1"
    # What an answer that reports no usage is charged at (accesslog.estimated): prompt, max_tokens.
    prompt, max_output = (int(n) for n in first["expected"].split(","))
    assert prompt > 0 and max_output >= 0
    assert "consumer" not in first  # no consumer declared: nobody is identified
    refused = answers[2].immediate_response
    assert refused.status.code == 429
    error = json.loads(refused.body)["error"]
    assert error["code"] == "rate_limit_exceeded" and "policy p is limited to 2 requests per minute" in error["message"]
    assert any(h.header.key == "retry-after" for h in refused.headers.set_headers)


async def test_a_request_refused_after_admission_gives_its_hold_back():
    server, channel, stub = await servicer(
        policy("p", ["auto"], [backend("a", "m")], limits={"maxConcurrent": 1}), healthy=False
    )
    try:
        for _ in range(3):  # each 503 releases its slot: never a 429 from the one before
            (answer,) = await exchange(stub, router_message(BODY))
            assert answer.immediate_response.status.code == 503, answer
    finally:
        await channel.close()
        await server.stop(None)
