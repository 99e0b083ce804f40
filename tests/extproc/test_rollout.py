"""Shadow and canary rollouts through the servicer (a real gRPC stream), issue 17: a canary's
share and stickiness, and a shadow that never changes or fails what the live policy serves."""

from __future__ import annotations

import json
from collections import Counter

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import json_format

from signalbox.core import rollouts
from signalbox.core.compiler import compile_config
from signalbox.extproc.reload import TableHolder
from signalbox.extproc.server import Processor, serve
from tests.factories import backend, model, policy, provider

from .test_grpc import exchange, router_message

BODY = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode()


def config(rollout: dict | None, candidate_healthy: bool = True, candidate_timeout_ms: int = 60_000):
    providers = [
        provider("a", "http://127.0.0.1:9001/v1", [model("m", inputPricePer1M=2.0, outputPricePer1M=8.0)]),
        provider(
            "b",
            "http://127.0.0.1:9002/v1",
            [model("m", inputPricePer1M=1.0, outputPricePer1M=1.0)],
            healthy=candidate_healthy,
        ),
    ]
    policies = [
        policy("live", ["auto"], [backend("a", "m")], rollout=rollout),
        policy("next", ["auto-next"], [backend("b", "m")], timeoutMs=candidate_timeout_ms),
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


def finished(answer, status: int) -> accesslog_pb2.HTTPAccessLogEntry:
    """Envoy's access log entry of the request `answer` decided, answered with `status`."""
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.common_properties.metadata.filter_metadata["signalbox"].CopyFrom(
        answer.dynamic_metadata.fields["signalbox"].struct_value
    )
    entry.common_properties.custom_tags["backend"] = "default/b/m"
    entry.response.response_code.value = status
    return entry


async def report(channel, entries) -> None:
    stub = als_pb2_grpc.AccessLogServiceStub(channel)
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend(entries)
    await stub.StreamAccessLogs(iter([message]))


async def test_a_canary_whose_candidate_fails_too_often_pauses_and_resumes_when_the_candidate_changes():
    rollout = {"candidate": "next", "mode": "canary", "percent": 100, "maxErrorRate": 0.5, "minRequests": 4}
    holder = TableHolder()
    holder.install(config(rollout))
    processor = Processor(holder, max_body_bytes=1 << 20)
    server, port = await serve(holder, "127.0.0.1:0", max_body_bytes=1 << 20, processor=processor)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = ep_grpc.ExternalProcessorStub(channel)
    epoch = holder.current.by_id["default/live"].rollout.epoch
    try:
        decided = [(await exchange(stub, router_message(BODY, {"x-user-id": f"u{i}"})))[0] for i in range(5)]
        assert {meta(a)["rollout"] for a in decided} == {"canary:next"}
        # Two answered, then failures: 2 of 4 is not past 50 %, 3 of 5 is.
        await report(channel, [finished(decided[0], 200), finished(decided[1], 200)])
        await report(channel, [finished(decided[2], 503), finished(decided[3], 429)])
        assert not processor.rollouts.paused(epoch)
        assert meta((await exchange(stub, router_message(BODY)))[0])["rollout"] == "canary:next"
        await report(channel, [finished(decided[4], 502)])
        figures = processor.rollouts.figures(epoch)
        assert (figures[rollouts.CANDIDATE], figures[rollouts.CANDIDATE_ERRORS]) == (5, 3)
        assert figures[rollouts.PAUSED] > 0
        assert processor.metrics.registry.get_sample_value(
            "signalbox_rollout_pauses_total", {"policy": "live", "candidate": "next"}
        )
        (after,) = await exchange(stub, router_message(BODY))
        assert (meta(after)["rollout"], meta(after)["policy"]) == ("paused:next", "live")
        # Editing the candidate starts a new epoch: the canary runs again, with fresh figures.
        holder.install(config(rollout, candidate_timeout_ms=30_000))
        assert holder.current.by_id["default/live"].rollout.epoch != epoch
        assert meta((await exchange(stub, router_message(BODY)))[0])["rollout"] == "canary:next"
        assert processor.rollouts.local().keys() == set()  # the old epoch's figures were dropped
    finally:
        await channel.close()
        await server.stop(None)


async def test_a_shadow_whose_candidate_cannot_decide_pauses_after_its_minimum():
    rollout = {"candidate": "next", "maxErrorRate": 0.1, "minRequests": 3}
    holder = TableHolder()
    holder.install(config(rollout, candidate_healthy=False))
    processor = Processor(holder, max_body_bytes=1 << 20)
    server, port = await serve(holder, "127.0.0.1:0", max_body_bytes=1 << 20, processor=processor)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = ep_grpc.ExternalProcessorStub(channel)
    try:
        notes = [meta((await exchange(stub, router_message(BODY)))[0])["rollout"] for _ in range(5)]
        assert notes == ["shadow:next:error"] * 3 + ["paused:next"] * 2
        figures = processor.rollouts.figures(holder.current.by_id["default/live"].rollout.epoch)
        assert (figures[rollouts.REQUESTS], figures[rollouts.CANDIDATE_ERRORS]) == (3, 3)
    finally:
        await channel.close()
        await server.stop(None)


async def test_a_shadow_counts_differing_decisions_and_both_sides_estimated_cost():
    holder = TableHolder()
    holder.install(config({"candidate": "next"}))
    processor = Processor(holder, max_body_bytes=1 << 20)
    server, port = await serve(holder, "127.0.0.1:0", max_body_bytes=1 << 20, processor=processor)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = ep_grpc.ExternalProcessorStub(channel)
    try:
        answers = [(await exchange(stub, router_message(BODY)))[0] for _ in range(4)]
        await report(channel, [finished(answers[0], 500)])  # the live side failed once
        figures = processor.rollouts.figures(holder.current.by_id["default/live"].rollout.epoch)
        assert figures[rollouts.REQUESTS] == figures[rollouts.CANDIDATE] == figures[rollouts.DIFFERS] == 4
        assert figures[rollouts.LIVE_ERRORS] == 1 and figures[rollouts.CANDIDATE_ERRORS] == 0
        assert figures[rollouts.LIVE_USD] > figures[rollouts.CANDIDATE_USD] > 0  # the candidate's model is cheaper
        # The differing decisions and each side's estimated cost, by the request's class.
        class_key = meta(answers[0])["class"].split(";")[0].removeprefix("class=")
        labels = {"policy": "live", "candidate": "next", "class_key": class_key}
        registry = processor.metrics.registry
        assert (
            registry.get_sample_value(
                "signalbox_rollout_decisions_total", {**labels, "mode": "shadow", "outcome": "differs"}
            )
            == 4
        )
        assert registry.get_sample_value(
            "signalbox_rollout_estimated_cost_usd_total", {**labels, "side": "candidate"}
        ) == pytest.approx(figures[rollouts.CANDIDATE_USD])
    finally:
        await channel.close()
        await server.stop(None)
