"""Tier 3 through the real servicer: a fake provider plays the classifier model."""

import json
import time

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import json_format

from signalbox.core.compiler import compile_config
from signalbox.extproc.reload import TableHolder
from signalbox.extproc.server import Processor, serve
from signalbox.fakeprovider import serving
from tests.factories import backend, model, policy, provider

from .test_grpc import CHAT, body_msg, exchange, headers_msg

# No rule fires and the built-in model is unsure (below the tier's default 0.6): the premise of
# every test here, checked below, since a retrained model may grow sure of any words ("zebra
# umbrella orchestra" became qa at 0.60).
UNRECOGNISED = "qwerty zxcv plonk"


@pytest.mark.parametrize("suffix", ["", " again", " once more"])
def test_the_unrecognised_texts_leave_the_earlier_tiers_unsure(suffix):
    from signalbox.extproc import default_routes
    from signalbox.extproc.classify import DEFAULT_RULES, features
    from signalbox.extproc.tiers import classify_tiers

    body = {"messages": [{"role": "user", "content": UNRECOGNISED + suffix}]}
    got = classify_tiers(features(body), DEFAULT_RULES, default_routes.router(), default_routes.MIN_RULES_CONFIDENCE)
    assert got.confidence < 0.6, got


@pytest.fixture
async def judge():
    """A fake provider in this event loop."""
    async with serving("judge") as fake:
        yield fake


@pytest.fixture
async def stub(judge, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-judge")
    judge.behaviour.api_key = "sk-judge"
    providers = [
        provider("small", "http://127.0.0.1:9001/v1", [model("s")]),
        provider("big", "http://127.0.0.1:9002/v1", [model("b")]),
        provider("judge", judge.url + "/v1", [model("j", upstreamName="judge-1")], auth={"env": "JUDGE_KEY"}),
    ]
    pol = policy(
        "p",
        ["auto"],
        [backend("small", "s"), backend("big", "b")],
        strategy="classified",
        routes=[{"taskTypes": ["math"], "backends": ["big/b"]}, {"backends": ["small/s"]}],
        classification={"llm": {"provider": "judge", "model": "j", "timeoutMs": 200}},
    )
    result = compile_config(providers, [pol])
    assert result.ok, result.problems
    holder = TableHolder()
    holder.install(result.config)
    processor = Processor(holder, max_body_bytes=1 << 20)
    server, port = await serve(holder, "127.0.0.1:0", max_body_bytes=1 << 20, processor=processor)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield ep_grpc.ExternalProcessorStub(channel)
    await channel.close()
    await server.stop(None)
    await processor.llm.close()


async def route(stub, text):
    payload = json.dumps({"model": "auto", "messages": [{"role": "user", "content": text}]}).encode()
    started = time.monotonic()
    _, response = await exchange(stub, headers_msg(CHAT), body_msg(payload))
    meta = json_format.MessageToDict(response.dynamic_metadata)["signalbox"]
    return meta["reason"], time.monotonic() - started


async def test_llm_answer_decides_the_class_and_is_cached(stub, judge):
    judge.behaviour.content = '{"task_type": "math", "complexity": "expert"}'
    reason, _ = await route(stub, UNRECOGNISED)
    assert reason == "classified:math/expert"
    asked = judge.requests[-1]
    assert asked["model"] == "judge-1" and asked["headers"]["Authorization"] == "Bearer sk-judge"
    calls = judge.count
    assert (await route(stub, UNRECOGNISED))[0] == "classified:math/expert"
    assert judge.count == calls  # answered from the cache


async def test_llm_timeout_falls_back_without_failing_the_request(stub, judge):
    judge.behaviour.content = '{"task_type": "math", "complexity": "expert"}'
    judge.behaviour.delay_ms = 2000
    reason, elapsed = await route(stub, UNRECOGNISED + " again")
    assert reason.startswith("classified:") and "math" not in reason
    assert elapsed < 1.0  # the 200 ms timeout, not the judge's 2 s


async def test_llm_garbage_answer_is_ignored(stub, judge):
    judge.behaviour.content = "I think it is probably maths?"
    reason, _ = await route(stub, UNRECOGNISED + " once more")
    assert "math" not in reason


async def test_confident_rules_skip_the_llm(stub, judge):
    judge.behaviour.content = '{"task_type": "math", "complexity": "expert"}'
    reason, _ = await route(stub, "Good morning! How are you?")
    assert reason.startswith("classified:chat") and judge.count == 0
