"""Shadow and canary rollouts through the servicer (a real gRPC stream), issue 17: a canary's
share and stickiness, and a shadow that never changes or fails what the live policy serves."""

from __future__ import annotations

import json
from collections import Counter

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


def config(rollout: dict, candidate_healthy: bool = True):
    providers = [
        provider("a", "http://127.0.0.1:9001/v1", [model("m")]),
        provider("b", "http://127.0.0.1:9002/v1", [model("m")], healthy=candidate_healthy),
    ]
    policies = [
        policy("live", ["auto"], [backend("a", "m")], rollout=rollout),
        policy("next", ["auto-next"], [backend("b", "m")]),
    ]
    result = compile_config(providers, policies)
    assert result.ok, result.problems
    return result.config


async def servicer(cfg):
    holder = TableHolder()
    holder.install(cfg)
    server, port = await serve(holder, "127.0.0.1:0", max_body_bytes=1 << 20)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, channel, ep_grpc.ExternalProcessorStub(channel)


def meta(answer) -> dict:
    return json_format.MessageToDict(answer.dynamic_metadata)["signalbox"]


async def test_a_canary_serves_its_share_and_keeps_each_caller_on_one_side():
    cfg = config({"candidate": "next", "mode": "canary", "percent": 20, "stickyHeader": "x-user-id"})
    assert not any(p.compiled for p in cfg.policies if p.name == "live")
    server, channel, stub = await servicer(cfg)
    try:
        sides: Counter[str] = Counter()
        for user in range(2000):
            (answer,) = await exchange(stub, router_message(BODY, {"x-user-id": f"user-{user}"}))
            m = meta(answer)
            sides[m["rollout"]] += 1
            # The candidate serves its side: its policy, its backend's target.
            assert (m["policy"], m["rollout"]) in {("next", "canary:next"), ("live", "live")}
        assert 0.17 <= sides["canary:next"] / 2000 <= 0.23, sides
        for user in ("user-7", "user-1234"):
            seen = {
                meta((await exchange(stub, router_message(BODY, {"x-user-id": user})))[0])["rollout"] for _ in range(5)
            }
            assert len(seen) == 1  # sticky
    finally:
        await channel.close()
        await server.stop(None)


async def test_a_shadow_changes_nothing_served_and_a_broken_candidate_fails_nothing():
    plain_server, plain_channel, plain = await servicer(config(None))
    shadow_server, shadow_channel, shadowed = await servicer(config({"candidate": "next"}))
    broken_server, broken_channel, broken = await servicer(config({"candidate": "next"}, candidate_healthy=False))
    try:
        (without,) = await exchange(plain, router_message(BODY))
        (with_shadow,) = await exchange(shadowed, router_message(BODY))
        (with_broken,) = await exchange(broken, router_message(BODY))
        for answer in (with_shadow, with_broken):
            assert answer.request_body.response.body_mutation.body == without.request_body.response.body_mutation.body
            assert meta(answer)["target"] == meta(without)["target"] and meta(answer)["policy"] == "live"
        assert meta(with_shadow)["rollout"] == "shadow:next:default/b/m:differs"
        assert meta(with_broken)["rollout"] == "shadow:next:error"  # no healthy backend: recorded, not raised
        assert "rollout" not in meta(without)
    finally:
        for channel, server in (
            (plain_channel, plain_server),
            (shadow_channel, shadow_server),
            (broken_channel, broken_server),
        ):
            await channel.close()
            await server.stop(None)


def test_a_rollout_names_an_existing_candidate_other_than_itself():
    providers = [provider("a", "http://127.0.0.1:9001/v1", [model("m")])]
    own = compile_config(providers, [policy("live", ["auto"], [backend("a", "m")], rollout={"candidate": "live"})])
    assert [p.message for p in own.problems] == ["a policy cannot be its own candidate"]
    missing = compile_config(providers, [policy("live", ["auto"], [backend("a", "m")], rollout={"candidate": "nope"})])
    assert [(p.path, p.reason) for p in missing.problems] == [("spec.rollout.candidate", "RefNotFound")]


@pytest.mark.parametrize("percent", [0, 100])
def test_a_canary_at_the_ends_of_its_range_is_all_live_or_all_candidate(percent):
    from signalbox.extproc import rollout

    served = {rollout.serves_candidate("default/live", f"k{i}", percent) for i in range(500)}
    assert served == {bool(percent)}
