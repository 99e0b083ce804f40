"""Accounting over a real gRPC access-log stream (grpc.aio, Envoy's own protos): what Envoy's
JSON/SSE readers and access logger report becomes tokens, cost, durations, budget spend and,
for learning policies, outcomes."""

from __future__ import annotations

import time

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from hypothesis import example, given, settings
from hypothesis import strategies as st

from signalbox.core.compiler import compile_config
from signalbox.extproc.accesslog import estimated
from signalbox.extproc.decisions import DecisionSigner
from signalbox.extproc.metrics import Metrics
from signalbox.extproc.reload import TableHolder
from signalbox.extproc.server import Processor, serve
from tests.factories import backend, model, policy, provider


def table() -> TableHolder:
    providers = [
        provider("a", "http://127.0.0.1:9001/v1", [model("m", inputPricePer1M=2.0, outputPricePer1M=8.0)]),
        provider("b", "http://127.0.0.1:9002/v1", [model("m", inputPricePer1M=1.0, outputPricePer1M=1.0)]),
    ]
    result = compile_config(providers, [policy("p", ["auto"], [backend("a", "m"), backend("b", "m", priority=1)])])
    assert result.ok
    holder = TableHolder()
    holder.install(result.config)
    return holder


def entry(backend_id: str, usage: tuple[int, int] | None, content_type: str = "application/json", **metadata):
    e = accesslog_pb2.HTTPAccessLogEntry()
    fields = {
        "decision": DecisionSigner().token("p", "chat/simple", "default/a/m"),
        "policy_id": "default/p",
        **metadata,
    }
    if usage is not None:
        fields.update(prompt_tokens=usage[0], completion_tokens=usage[1])  # numbers, as Envoy's readers leave them
    e.common_properties.metadata.filter_metadata["signalbox"].update(fields)
    e.common_properties.custom_tags["backend"] = backend_id
    e.common_properties.time_to_first_upstream_rx_byte.FromMilliseconds(40)
    e.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(900)
    e.response.response_headers["content-type"] = content_type
    return e


@pytest.fixture
async def sink():
    holder = table()
    processor = Processor(holder, metrics=Metrics())
    server, port = await serve(holder, "127.0.0.1:0", max_body_bytes=1024, processor=processor)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield als_pb2_grpc.AccessLogServiceStub(channel), processor
    await channel.close()
    await server.stop(None)


def sample(processor: Processor, name: str, **labels: str) -> float | None:
    return processor.metrics.registry.get_sample_value(name, labels)


async def send(stub, entries: list[accesslog_pb2.HTTPAccessLogEntry], log_name: str = "") -> None:
    """`entries` in one message of an access-log stream (named `log_name`, as Envoy's first
    message names its log), to the stream's end."""
    message = als_pb2.StreamAccessLogsMessage()
    if log_name:
        message.identifier.log_name = log_name
    message.http_logs.log_entry.extend(entries)
    call = stub.StreamAccessLogs()
    await call.write(message)
    await call.done_writing()
    await call


async def test_a_batch_of_entries_becomes_tokens_cost_durations_and_spend(sink):
    stub, processor = sink
    await send(
        stub,
        [
            entry("default/a/m", (10, 7)),
            entry("default/b/m", (10, 5), content_type="text/event-stream"),  # failed over to b, streamed
            entry("default/a/m", None),  # the provider answered an error: no usage
        ],
        log_name="signalbox",
    )

    genai_a = {"gen_ai_request_model": "m", "gen_ai_provider_name": "openai_compatible", "provider": "a"}
    assert sample(processor, "gen_ai_client_token_usage_total", gen_ai_token_type="input", policy="p", **genai_a) == 10
    assert sample(processor, "signalbox_cost_usd_total", policy="p", provider="b", model="m") == pytest.approx(15e-6)
    assert sample(processor, "gen_ai_server_request_duration_seconds_count", **genai_a) == 2
    ttft = {"gen_ai_request_model": "m", "gen_ai_provider_name": "openai_compatible", "provider": "b"}
    assert sample(processor, "gen_ai_server_time_to_first_token_seconds_sum", **ttft) == pytest.approx(0.04)
    (spent,) = [usd for _, usd, _ in processor.ledger.buckets("default/p", time.time())]
    assert spent == pytest.approx((10 * 2 + 7 * 8) / 1e6 + 15e-6)


async def test_the_real_cost_replaces_what_each_request_held_whatever_its_end(sink):
    stub, processor = sink
    now = time.time()
    for hold in ("answered", "failed", "stale"):
        processor.ledger.hold("default/p", hold, 0.5, until=now + 60)
    assert processor.ledger.in_flight("default/p", now) == 1.5
    await send(
        stub,
        [
            entry("default/a/m", (10, 7), hold="answered"),
            entry("default/a/m", None, hold="failed"),  # an error: no usage, nothing spent
            entry("default/gone/m", (1, 1), hold="stale"),  # a backend the config no longer has
        ],
    )
    assert processor.ledger.in_flight("default/p", now) == 0.0
    (spent,) = [usd for _, usd, _ in processor.ledger.buckets("default/p", time.time())]
    assert spent == pytest.approx((10 * 2 + 7 * 8) / 1e6)


async def test_entries_that_are_not_ours_or_are_garbled_are_skipped_and_the_stream_goes_on(sink):
    stub, processor = sink
    unrouted = accesslog_pb2.HTTPAccessLogEntry()  # e.g. /v1/models: no decision
    garbled = entry("default/a/m", None, decision="not-a-token")
    await send(stub, [unrouted, garbled, entry("default/gone/m", (1, 1)), entry("default/a/m", (1, 0))])
    assert (
        sample(
            processor,
            "gen_ai_client_token_usage_total",
            gen_ai_token_type="input",
            policy="p",
            gen_ai_request_model="m",
            gen_ai_provider_name="openai_compatible",
            provider="a",
        )
        == 1
    )


async def test_a_compiled_route_is_counted_by_the_policy_its_route_names(sink):
    """No decision metadata on the compiled path: the route's policy arrives as a custom tag."""
    stub, processor = sink
    compiled = accesslog_pb2.HTTPAccessLogEntry()
    compiled.common_properties.custom_tags.update({"backend": "default/b/m", "compiled_policy": "default/p"})
    compiled.common_properties.metadata.filter_metadata["signalbox"].update(
        {"alias": "auto", "prompt_tokens": 4, "completion_tokens": 2}
    )
    compiled.common_properties.upstream_request_attempt_count = 2  # failed over to b
    refused = accesslog_pb2.HTTPAccessLogEntry()  # an alias was read, the ext_proc refused it
    refused.common_properties.metadata.filter_metadata["signalbox"].update({"alias": "nope"})
    await send(stub, [compiled, refused])
    routed = {"policy": "p", "provider": "b", "model": "m", "strategy": "weighted", "outcome": "routed"}
    assert sample(processor, "signalbox_requests_total", tier="compiled", **routed) == 1
    assert sample(processor, "signalbox_cost_usd_total", policy="p", provider="b", model="m") == pytest.approx(6e-6)
    assert sample(processor, "signalbox_failover_attempts_total", provider="b", model="m") == 1


def test_learning_policies_learn_outcomes_from_the_access_log(tmp_path):
    from signalbox.extproc.accesslog import AccessLogSink
    from signalbox.extproc.ledger import SpendLedger
    from signalbox.extproc.strategies import SelectionState

    providers = [provider(n, f"http://127.0.0.1:900{i}/v1", [model("m")]) for i, n in enumerate("ab")]
    learner = policy("p", ["auto"], [backend("a", "m"), backend("b", "m")], strategy="cost", learning={"enabled": True})
    holder = TableHolder()
    holder.install(compile_config(providers, [learner]).config)
    state = SelectionState()
    sink = AccessLogSink(holder, Metrics(), SpendLedger(tmp_path / "spend.db"), state)
    failed_over = entry("default/b/m", (1, 1))  # decided for a, answered by b
    failed_over.response.response_code.value = 200
    sink.account(failed_over)
    assert state.success_rate("p", "chat/simple", "default/a/m") < 1.0  # a had to fail over
    assert state.success_rate("p", "chat/simple", "default/b/m") == 1.0
    refused = entry("default/a/m", None)
    refused.response.response_code.value = 429
    sink.account(refused)
    assert state.outcomes[("p", "chat/simple", "default/a/m")][1] == 2  # two failures now


async def test_attempts_that_say_not_now_put_their_backend_in_cooldown_for_every_decision():
    """The attempt log (the router's upstream log): a 429 with Retry-After rests its backend;
    the router phase then leaves it out of first choices, and the admin health check says 503."""
    from envoy.config.core.v3 import base_pb2

    from signalbox.extproc.cooldown import Cooldowns
    from signalbox.extproc.strategies import SelectionState

    holder = table()
    processor = Processor(holder, SelectionState(cooldowns=Cooldowns()), metrics=Metrics())
    server, port = await serve(holder, "127.0.0.1:0", max_body_bytes=1024, processor=processor)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = als_pb2_grpc.AccessLogServiceStub(channel)
        limited = accesslog_pb2.HTTPAccessLogEntry()
        limited.common_properties.custom_tags["backend"] = "default/a/m"
        limited.response.response_code.value = 429
        limited.response.response_headers["Retry-After"] = "30"
        unknown = accesslog_pb2.HTTPAccessLogEntry()  # no backend tag: skipped
        unknown.response.response_code.value = 429
        first = als_pb2.StreamAccessLogsMessage(
            identifier=als_pb2.StreamAccessLogsMessage.Identifier(
                node=base_pb2.Node(id="envoy"), log_name="signalbox-attempts"
            )
        )
        first.http_logs.log_entry.extend([unknown, limited])
        call = stub.StreamAccessLogs()
        await call.write(first)
        await call.done_writing()
        await call
    await server.stop(None)
    until, reason = processor.state.cooling()["default/a/m"]
    assert reason == "rate_limited" and until == pytest.approx(time.time() + 30, abs=2)
    assert sample(processor, "signalbox_backend_cooldowns_total", provider="a", model="m", reason="rate_limited") == 1
    # The accounting log is untouched by it: no request was counted.
    assert (
        sample(
            processor,
            "gen_ai_server_request_duration_seconds_count",
            gen_ai_request_model="m",
            gen_ai_provider_name="openai_compatible",
            provider="a",
        )
        is None
    )


async def test_a_stream_that_broke_after_it_started_is_counted_as_broken(sink):
    stub, processor = sink
    broken = entry("default/a/m", None, content_type="text/event-stream")
    broken.response.response_code.value = 200
    broken.common_properties.response_flags.upstream_protocol_error = True
    await send(stub, [broken, entry("default/a/m", (1, 1))])
    assert sample(processor, "signalbox_broken_responses_total", provider="a", model="m", flag="UPE") == 1


def answered(e: accesslog_pb2.HTTPAccessLogEntry, status: int, body_bytes: int) -> accesslog_pb2.HTTPAccessLogEntry:
    e.response.response_code.value = status
    e.response.response_body_bytes = body_bytes
    return e


async def test_an_answer_without_usage_is_charged_at_an_estimate_not_at_nothing(sink):
    # A provider with streamUsage false (or a server that never reports usage) answered: counted
    # as free, a budgeted policy could spend without end. Errors are still charged nothing.
    stub, processor = sink
    now = time.time()
    for hold in ("stream", "json", "error"):
        processor.ledger.hold("default/p", hold, 0.5, until=now + 60)
    await send(
        stub,
        [
            # 100 prompt tokens expected, max_tokens 50: a stream of 32,000 bytes is 200 events.
            answered(entry("default/a/m", None, "text/event-stream", hold="stream", expected="100,50"), 200, 32_000),
            # No max_tokens: a JSON answer of 400 bytes, about 100 tokens.
            answered(entry("default/a/m", None, hold="json", expected="100,0"), 200, 400),
            answered(entry("default/a/m", None, hold="error", expected="100,0"), 502, 400),
        ],
    )
    assert processor.ledger.in_flight("default/p", now) == 0.0
    (spent,) = [usd for _, usd, _ in processor.ledger.buckets("default/p", time.time())]
    assert spent == pytest.approx((100 * 2 + 50 * 8) / 1e6 + (100 * 2 + 100 * 8) / 1e6)
    assert sample(processor, "signalbox_usage_estimated_total", provider="a", model="m") == 2
    genai_a = {"gen_ai_request_model": "m", "gen_ai_provider_name": "openai_compatible", "provider": "a"}
    assert (
        sample(processor, "gen_ai_client_token_usage_total", gen_ai_token_type="output", policy="p", **genai_a) == 150
    )


@settings(max_examples=200, deadline=None)
@given(
    expected=st.text(max_size=30),
    status=st.integers(100, 599),
    body_bytes=st.integers(0, 1 << 40),
    streamed=st.booleans(),
)
@example(expected="1,-5", status=200, body_bytes=4000, streamed=False)
@example(expected="-1,5", status=200, body_bytes=4000, streamed=True)
@example(expected="12,7", status=204, body_bytes=0, streamed=False)
def test_an_estimate_is_never_negative_never_past_max_tokens_and_garbage_gives_none(
    expected, status, body_bytes, streamed
):
    e = answered(
        entry("default/a/m", None, "text/event-stream" if streamed else "application/json"), status, body_bytes
    )
    fields = e.common_properties.metadata.filter_metadata["signalbox"].fields
    fields["expected"].string_value = expected
    usage = estimated(e, fields)
    if usage is None:
        return
    assert 200 <= status < 300
    prompt, max_output = (int(part) for part in expected.split(","))
    assert usage.prompt_tokens == prompt >= 0 and usage.completion_tokens >= 0
    if max_output > 0:
        assert usage.completion_tokens <= max_output
    assert usage.completion_tokens <= body_bytes  # never more tokens than bytes
