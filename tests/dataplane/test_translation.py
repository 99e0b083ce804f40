"""Clients of either API, backends of either API (issue 14): the official OpenAI and Anthropic
SDKs against a real Envoy and ext_proc, and fake providers that check what they receive
against the SDKs' own type models (a translated request the provider's API does not define
is the fake's 400, which fails the test)."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import openai
import pytest

from signalbox.fakeprovider import TORN_TEXT, provider_request_id
from tests.factories import backend, dump, model, policy, provider

from .conftest import CLIENT_TOKEN, logged, start_gateway

pytestmark = pytest.mark.dataplane

CLAUDE_KEY = "sk-ant-claude-secret-51c9"
GEMINI_KEY = "AIza-gemini-secret-77b2"
CAPS = {"capabilities": ["streaming", "tools", "vision"], "contextWindow": 100000}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ANTHROPIC_TOOL = {
    "name": "get_weather",
    "description": "Weather of a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
FAIL_FLAKY1 = {"x-fake-status": "503", "x-fake-only": "flaky1"}
FAIL_FLAKY2 = {"x-fake-status": "503", "x-fake-only": "flaky2"}


def resources(fakes) -> str:
    return dump(
        # alpha speaks Anthropic's Messages API; beta OpenAI's.
        provider(
            "claude",
            fakes["alpha"].url + "/v1",
            [model("c1", upstreamName="claude-fake", inputPricePer1M=1, **CAPS)],
            type="anthropic",
            auth={"env": "CLAUDE_KEY"},
        ),
        provider("gpt", fakes["beta"].url + "/v1", [model("o1", upstreamName="gpt-fake", inputPricePer1M=5, **CAPS)]),
        provider(
            "claude-down",
            fakes["flaky1"].url + "/v1",
            [model("c2", upstreamName="claude-two", **CAPS)],
            type="anthropic",
        ),
        provider("gpt-down", fakes["flaky2"].url + "/v1", [model("o2", upstreamName="gpt-two", **CAPS)]),
        # Backends the error tests make fail (a 429 rests a backend: kept apart from the rest).
        provider(
            "claude-err", fakes["gamma"].url + "/v1", [model("e1", upstreamName="claude-err", **CAPS)], type="anthropic"
        ),
        provider("gpt-err", fakes["delta"].url + "/v1", [model("e2", upstreamName="gpt-err", **CAPS)]),
        # The same server again, told it refuses stream_options; two prices for a decided policy.
        provider(
            "gpt-plain",
            fakes["delta"].url + "/v1",
            [
                model("p1", upstreamName="gpt-plain", **CAPS),
                model("p2", upstreamName="gpt-dear", inputPricePer1M=9, **CAPS),
            ],
            streamUsage=False,
        ),
        policy("gpt-plain", ["gpt-plain"], [backend("gpt-plain", "p1")]),
        policy(
            "gpt-plain-cost",
            ["gpt-plain-cost"],
            [backend("gpt-plain", "p1"), backend("gpt-plain", "p2")],
            strategy="cost",
        ),
        policy("claude-err", ["claude-err"], [backend("claude-err", "e1")]),
        policy("gpt-err", ["gpt-err"], [backend("gpt-err", "e2")]),
        # epsilon speaks Gemini's API.
        provider(
            "gem",
            fakes["epsilon"].url + "/v1beta",
            [model("g1", upstreamName="gemini-fake", **CAPS)],
            type="gemini",
            auth={"env": "GEMINI_KEY"},
        ),
        policy("gem", ["gem"], [backend("gem", "g1")]),
        policy(
            "gem-then-gpt",
            ["gem-then-gpt"],
            [backend("gem", "g1"), backend("gpt", "o1", priority=1)],
            strategy="failover",
        ),
        policy("claude", ["claude"], [backend("claude", "c1")]),
        policy("gpt", ["gpt"], [backend("gpt", "o1")]),
        policy(
            "claude-first",
            ["claude-first"],
            [backend("claude", "c1"), backend("gpt", "o1", priority=1)],
            strategy="failover",
        ),
        # Compiled chains whose first backend fails, across API families both ways.
        policy(
            "claude-then-gpt",
            ["claude-then-gpt"],
            [backend("claude-down", "c2"), backend("gpt", "o1", priority=1)],
            strategy="failover",
        ),
        policy(
            "gpt-then-claude",
            ["gpt-then-claude"],
            [backend("gpt-down", "o2"), backend("claude", "c1", priority=1)],
            strategy="failover",
        ),
        # Decided by the ext_proc (cost reads the prompt): claude is the cheaper.
        policy("cheapest", ["cheapest"], [backend("claude", "c1"), backend("gpt", "o1")], strategy="cost"),
    )


@pytest.fixture(scope="module")
def gateway(fakes, tmp_path_factory):
    gw = start_gateway(
        tmp_path_factory.mktemp("gw"), resources(fakes), env={"CLAUDE_KEY": CLAUDE_KEY, "GEMINI_KEY": GEMINI_KEY}
    )
    yield gw
    gw.stop()


@pytest.fixture(autouse=True)
def _strict(fakes):
    """Every fake checks OpenAI requests against the SDK's types too; alpha wants its key."""
    for name in ("beta", "flaky2"):
        fakes[name].behave(strict=True)
    fakes["alpha"].behave(api_key=CLAUDE_KEY)
    fakes["epsilon"].behave(api_key=GEMINI_KEY)


def only(fake) -> dict:
    got = fake.requests()
    assert len(got) == 1, got
    return got[0]


def translations(gateway) -> float:
    total = 0.0
    for line in httpx.get(f"{gateway.admin_url}/metrics").text.splitlines():
        if line.startswith("signalbox_translations_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def no_client_key_upstream(*fakes) -> None:
    for fake in fakes:
        for r in fake.requests():
            assert CLIENT_TOKEN not in json.dumps(r["headers"]), r["headers"]


# ------------------------------------------------------------------ OpenAI client, Anthropic backend


def test_openai_sdk_gets_a_chat_completion_from_an_anthropic_backend(oai, fakes):
    raw = oai.chat.completions.with_raw_response.create(
        model="claude",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_tokens=50,
    )
    answer = raw.parse()
    assert raw.headers["x-signalbox-provider"] == "claude"
    assert answer.choices[0].message.content == "[alpha] answer from claude-fake"
    assert answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (10, 7)
    got = only(fakes["alpha"])
    assert got["path"] == "/v1/messages" and got["api"] == "anthropic"
    assert got["body"]["system"] == [{"type": "text", "text": "be brief"}]
    assert got["body"]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    assert got["body"]["max_tokens"] == 50 and "stream_options" not in got["body"]
    assert got["headers"]["x-api-key"] == CLAUDE_KEY and got["headers"]["anthropic-version"]
    assert "Authorization" not in got["headers"] and "authorization" not in got["headers"]
    no_client_key_upstream(fakes["alpha"])


def test_openai_sdk_streams_from_an_anthropic_backend_as_it_arrives(oai, fakes):
    # The SDK's first stream builds its models (slow on a busy machine): not what is timed.
    for _ in oai.chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}], stream=True):
        pass
    fakes["alpha"].reset()
    fakes["alpha"].behave(api_key=CLAUDE_KEY)
    arrivals, text, usage, finish = [], "", None, None
    stream = oai.chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-fake-chunks": "5", "x-fake-chunk-delay-ms": "150"},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                arrivals.append(time.monotonic())
                text += choice.delta.content
            finish = choice.finish_reason or finish
    assert text == "chunk0 chunk1 chunk2 chunk3 chunk4 "
    assert finish == "stop"
    assert (usage.prompt_tokens, usage.completion_tokens) == (10, 5)
    # Chunk by chunk, never buffered whole: 150 ms apart at the provider, about that at the client.
    assert arrivals[-1] - arrivals[0] >= 0.45, arrivals
    assert only(fakes["alpha"])["body"]["stream"] is True


def test_openai_tools_round_trip_through_an_anthropic_backend(oai, fakes):
    history = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    answer = oai.chat.completions.create(
        model="claude",
        messages=history,
        tools=[TOOL],
        tool_choice="auto",
        extra_headers={"x-fake-tool-call": "get_weather"},
    )
    call = answer.choices[0].message.tool_calls[0]
    assert answer.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    body = only(fakes["alpha"])["body"]
    assert body["tools"] == [ANTHROPIC_TOOL] and body["tool_choice"] == {"type": "auto"}
    assert body["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}
    ]
    assert body["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"}]


PLACE = {
    "name": "place",
    "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.mark.parametrize("stream", [False, True])
def test_json_output_from_an_anthropic_backend(oai, fakes, stream):
    """OpenAI's `response_format` on an Anthropic backend: a forced tool carries the JSON, which
    the client gets as the answer's text."""
    args = {
        "model": "claude",
        "messages": [{"role": "user", "content": "where?"}],
        "response_format": {"type": "json_schema", "json_schema": PLACE},
    }
    if stream:
        chunks = list(oai.chat.completions.create(**args, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        answer = oai.chat.completions.create(**args)
        text, finish = answer.choices[0].message.content, [answer.choices[0].finish_reason]
    assert json.loads(text) == {"city": "Paris"} and finish == ["stop"]
    body = only(fakes["alpha"])["body"]
    assert body["tool_choice"] == {"type": "tool", "name": "json_output"}
    assert body["tools"][0]["input_schema"] == PLACE["schema"]


def test_an_anthropic_backends_error_reaches_an_openai_client_in_openais_shape(oai, fakes):
    with pytest.raises(openai.RateLimitError) as caught:
        oai.chat.completions.create(
            model="claude-err", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-fake-status": "429"}
        )
    assert caught.value.body["type"] == "rate_limit_error"
    assert "steered to fail with 429" in caught.value.body["message"]


def test_what_anthropic_cannot_express_is_a_400_naming_it_or_the_next_backend(oai, fakes):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}], n=2)
    assert caught.value.code == "unsupported_feature" and "'n'" in caught.value.message
    assert fakes["alpha"].requests() == []
    # With an OpenAI backend later in the chain, that backend answers instead.
    raw = oai.chat.completions.with_raw_response.create(
        model="claude-first", messages=[{"role": "user", "content": "hi"}], n=2
    )
    assert raw.headers["x-signalbox-provider"] == "gpt"
    assert only(fakes["beta"])["body"]["n"] == 2


# ------------------------------------------------------------------ Anthropic client, OpenAI backend


def test_anthropic_sdk_gets_a_message_from_an_openai_backend(ant, fakes, gateway):
    raw = ant.messages.with_raw_response.create(
        model="gpt", max_tokens=64, system="be brief", messages=[{"role": "user", "content": "hello"}]
    )
    message = raw.parse()
    assert raw.headers["x-signalbox-provider"] == "gpt"
    assert message.content[0].text == "[beta] answer from gpt-fake"
    assert message.stop_reason == "end_turn" and message.role == "assistant"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (10, 7)
    got = only(fakes["beta"])
    assert got["path"] == "/v1/chat/completions"
    assert got["body"]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert got["body"]["max_tokens"] == 64
    no_client_key_upstream(fakes["beta"])


def test_anthropic_sdk_streams_from_an_openai_backend_as_it_arrives(ant, fakes):
    # The SDK's first stream builds its models (slow on a busy machine): not what is timed.
    with ant.messages.stream(model="gpt", max_tokens=8, messages=[{"role": "user", "content": "x"}]) as warm:
        warm.get_final_message()
    fakes["beta"].reset()
    fakes["beta"].behave(strict=True)
    arrivals, text = [], ""
    with ant.messages.stream(
        model="gpt",
        max_tokens=64,
        messages=[{"role": "user", "content": "count"}],
        extra_headers={"x-fake-chunks": "4", "x-fake-chunk-delay-ms": "150"},
    ) as stream:
        for piece in stream.text_stream:
            arrivals.append(time.monotonic())
            text += piece
        final = stream.get_final_message()
    assert text.startswith("chunk0 ") and text.endswith("chunk3 ")
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 4 and final.usage.input_tokens == 10
    assert arrivals[-1] - arrivals[0] >= 0.3, arrivals
    body = only(fakes["beta"])["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_anthropic_tools_round_trip_through_an_openai_backend(ant, fakes):
    message = ant.messages.create(
        model="gpt",
        max_tokens=64,
        tools=[ANTHROPIC_TOOL],
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
        ],
        extra_headers={"x-fake-tool-call": "get_weather"},
    )
    assert message.stop_reason == "tool_use"
    use = next(b for b in message.content if b.type == "tool_use")
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    body = only(fakes["beta"])["body"]
    assert body["tools"] == [TOOL]
    assert body["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}


def test_a_streamed_tool_call_reaches_each_sdk_whole_from_the_other_api(oai, ant, fakes):
    """A tool call streamed in pieces (OpenAI: the arguments split across chunks; Anthropic:
    `input_json_delta` events) is assembled by the client's SDK as one call with its input."""
    weather = [{"role": "user", "content": "weather in Paris?"}]
    with ant.messages.stream(
        model="gpt",
        max_tokens=64,
        tools=[ANTHROPIC_TOOL],
        messages=weather,
        extra_headers={"x-fake-tool-call": "get_weather"},
    ) as stream:
        message = stream.get_final_message()
    use = next(b for b in message.content if b.type == "tool_use")
    assert message.stop_reason == "tool_use" and (use.name, use.input) == ("get_weather", {"city": "Paris"})
    assert only(fakes["beta"])["stream"] is True
    chunks = list(
        oai.chat.completions.create(
            model="claude",
            messages=weather,
            tools=[TOOL],
            stream=True,
            extra_headers={"x-fake-tool-call": "get_weather"},
        )
    )
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in pieces)) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_an_anthropic_client_gets_the_gateways_errors_in_anthropics_shape(ant):
    with pytest.raises(anthropic.NotFoundError) as caught:
        ant.messages.create(model="no-such-alias", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "not_found_error"
    assert "no-such-alias" in caught.value.body["error"]["message"]
    with pytest.raises(anthropic.RateLimitError) as limited:
        ant.messages.create(
            model="gpt-err",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-status": "429"},
        )
    assert limited.value.body["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("alias", ["gpt-plain", "gpt-plain-cost"])
def test_an_anthropic_request_malformed_in_its_own_api_is_its_400_on_any_path(ant, fakes, alias):
    """An Anthropic request without `max_tokens` (which Anthropic's API requires) to OpenAI
    backends only: the client is told its mistake in its API's shape, on the compiled path
    (the attempt's translation refuses it) as on the decided one (the router phase does), and
    no provider is sent anything."""
    before = len(fakes["delta"].requests())
    with pytest.raises(anthropic.BadRequestError) as caught:
        ant.post(
            "/v1/messages",
            body={"model": alias, "messages": [{"role": "user", "content": "hi"}]},
            cast_to=httpx.Response,
        )
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in caught.value.body["error"]["message"]
    assert "no backend" not in caught.value.body["error"]["message"]
    assert len(fakes["delta"].requests()) == before


# ------------------------------------------------------------------ Responses API clients


@pytest.mark.parametrize(("alias", "fake", "served"), [("gpt", "beta", "gpt-fake"), ("claude", "alpha", "claude-fake")])
def test_openai_sdk_responses_from_either_backend(oai, fakes, alias, fake, served):
    raw = oai.responses.with_raw_response.create(
        model=alias, instructions="be brief", input="hello", max_output_tokens=40
    )
    response = raw.parse()
    assert response.output_text == f"[{fakes[fake].id}] answer from {served}"
    assert response.status == "completed"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (10, 7)
    got = only(fakes[fake])
    assert got["path"] == ("/v1/messages" if fake == "alpha" else "/v1/chat/completions")
    if fake == "beta":
        assert got["body"]["messages"] == [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
        ]


@pytest.mark.parametrize("alias", ["gpt", "claude"])
def test_openai_sdk_streams_responses_as_they_arrive(oai, fakes, alias):
    # The SDK builds its Response models on first use (a few hundred ms on a slow machine):
    # once before the timed stream, so that what is timed is the gateway.
    with oai.responses.stream(model=alias, input="warm up") as warm:
        warm.get_final_response()
    arrivals, text, final = [], "", None
    with oai.responses.stream(
        model=alias, input="count", extra_headers={"x-fake-chunks": "4", "x-fake-chunk-delay-ms": "150"}
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                arrivals.append(time.monotonic())
                text += event.delta
        final = stream.get_final_response()
    assert text == "chunk0 chunk1 chunk2 chunk3 " and final.output_text == text
    assert final.usage.output_tokens == 4
    assert arrivals[-1] - arrivals[0] >= 0.3, arrivals
    assert len(fakes["alpha" if alias == "claude" else "beta"].requests()) == 2


def test_responses_function_calls_round_trip(oai, fakes):
    response = oai.responses.create(
        model="claude",
        input=[
            {"role": "user", "content": "weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ],
        tools=[{"type": "function", "name": "get_weather", "parameters": TOOL["function"]["parameters"]}],
        extra_headers={"x-fake-tool-call": "get_weather"},
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    body = only(fakes["alpha"])["body"]
    assert body["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}
    ]
    assert body["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"}]


def test_responses_state_the_gateway_does_not_keep_is_a_clear_400(oai, fakes):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model="gpt", input="and then?", previous_response_id="resp_123")
    assert caught.value.code == "unsupported_feature" and "previous_response_id" in caught.value.message
    assert fakes["beta"].requests() == []


# ------------------------------------------------------------------ Gemini backends


def test_openai_sdk_gets_a_chat_completion_from_a_gemini_backend(oai, fakes):
    answer = oai.chat.completions.create(
        model="gem",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_tokens=30,
        tools=[TOOL],
        extra_headers={"x-fake-tool-call": "get_weather"},
    )
    assert answer.choices[0].message.content == "[epsilon] answer from gemini-fake"
    call = answer.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert answer.choices[0].finish_reason == "tool_calls"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (10, 7)
    got = only(fakes["epsilon"])
    assert got["path"] == "/v1beta/models/gemini-fake:generateContent"
    assert got["headers"]["x-goog-api-key"] == GEMINI_KEY and "authorization" not in {k.lower() for k in got["headers"]}
    assert got["body"]["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    assert got["body"]["contents"] == [{"role": "user", "parts": [{"text": "hello"}]}]
    assert got["body"]["generationConfig"] == {"maxOutputTokens": 30}
    assert got["body"]["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
    no_client_key_upstream(fakes["epsilon"])


@pytest.mark.parametrize("client", ["openai", "anthropic"])
def test_a_gemini_stream_reaches_either_sdk_as_it_arrives(oai, ant, fakes, client):
    headers = {"x-fake-chunks": "4", "x-fake-chunk-delay-ms": "150"}
    arrivals, text = [], ""
    if client == "openai":
        for _ in oai.chat.completions.create(model="gem", messages=[{"role": "user", "content": "x"}], stream=True):
            pass  # the SDK's first stream builds its models: not what is timed
        stream = oai.chat.completions.create(
            model="gem", messages=[{"role": "user", "content": "count"}], stream=True, extra_headers=headers
        )
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    arrivals.append(time.monotonic())
                    text += choice.delta.content
    else:
        with ant.messages.stream(model="gem", max_tokens=8, messages=[{"role": "user", "content": "x"}]) as warm:
            warm.get_final_message()
        with ant.messages.stream(
            model="gem", max_tokens=64, messages=[{"role": "user", "content": "count"}], extra_headers=headers
        ) as stream:
            for piece in stream.text_stream:
                arrivals.append(time.monotonic())
                text += piece
            assert stream.get_final_message().usage.output_tokens == 4
    assert text == "chunk0 chunk1 chunk2 chunk3 "
    assert arrivals[-1] - arrivals[0] >= 0.3, arrivals
    assert fakes["epsilon"].requests()[-1]["path"] == "/v1beta/models/gemini-fake:streamGenerateContent?alt=sse"


def test_a_gemini_primary_that_fails_is_retried_on_an_openai_backend(oai, fakes):
    raw = oai.chat.completions.with_raw_response.create(
        model="gem-then-gpt",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-status": "503", "x-fake-only": "epsilon"},
    )
    assert raw.headers["x-signalbox-provider"] == "gpt"
    assert len(fakes["epsilon"].requests()) == 1 and len(fakes["beta"].requests()) == 1


def test_anthropic_token_counting_where_the_backend_can_answer_it(ant, fakes):
    counted = ant.messages.count_tokens(model="claude", messages=[{"role": "user", "content": "hello"}])
    assert counted.input_tokens == 42  # the fake Anthropic provider's own count
    assert only(fakes["alpha"])["path"] == "/v1/messages/count_tokens"
    # A chain whose first backend is not Anthropic's: that one is not eligible, the Anthropic
    # member counts (the decided path), and the first is never tried.
    counted = ant.messages.count_tokens(model="gpt-then-claude", messages=[{"role": "user", "content": "x"}])
    assert counted.input_tokens == 42 and fakes["flaky2"].requests() == []
    # No backend that can count: a 400 in Anthropic's shape, nothing sent upstream.
    with pytest.raises(anthropic.BadRequestError) as caught:
        ant.messages.count_tokens(model="gpt", messages=[{"role": "user", "content": "hello"}])
    assert "token counting" in caught.value.body["error"]["message"]
    assert fakes["beta"].requests() == []


# ------------------------------------------------------------------ same API: no translation


def test_an_anthropic_client_reaches_an_anthropic_backend_untranslated(ant, fakes, gateway):
    before = translations(gateway)
    message = ant.messages.create(model="claude", max_tokens=32, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "[alpha] answer from claude-fake"
    got = only(fakes["alpha"])
    assert got["body"] == {"model": "claude-fake", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
    assert got["headers"]["x-api-key"] == CLAUDE_KEY
    assert translations(gateway) == before
    no_client_key_upstream(fakes["alpha"])


# ------------------------------------------------------------------ failover across API families


@pytest.mark.parametrize("stream", [False, True])
def test_an_anthropic_primary_that_fails_is_retried_on_an_openai_backend(oai, ant, fakes, stream):
    raw = oai.chat.completions.with_raw_response.create(
        model="claude-then-gpt", messages=[{"role": "user", "content": "hi"}], extra_headers=FAIL_FLAKY1
    )
    assert raw.headers["x-signalbox-provider"] == "gpt"
    assert raw.parse().choices[0].message.content == "[beta] answer from gpt-fake"
    # The Anthropic client's request went to the Anthropic primary as it was, then translated.
    if stream:
        with ant.messages.stream(
            model="claude-then-gpt",
            max_tokens=20,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers=FAIL_FLAKY1,
        ) as s:
            text = "".join(s.text_stream)
        assert text.startswith("chunk0 ")
    else:
        message = ant.messages.create(
            model="claude-then-gpt",
            max_tokens=20,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers=FAIL_FLAKY1,
        )
        assert message.content[0].text == "[beta] answer from gpt-fake"
    tried = [r["api"] for r in fakes["flaky1"].requests()]
    assert tried == ["anthropic", "anthropic"]
    assert [r["path"] for r in fakes["beta"].requests()] == ["/v1/chat/completions"] * 2


@pytest.mark.parametrize("stream", [False, True])
def test_an_openai_primary_that_fails_is_retried_on_an_anthropic_backend(oai, ant, fakes, stream):
    if stream:
        chunks = oai.chat.completions.create(
            model="gpt-then-claude",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers=FAIL_FLAKY2,
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.startswith("chunk0 ")
    else:
        answer = oai.chat.completions.create(
            model="gpt-then-claude", messages=[{"role": "user", "content": "hi"}], extra_headers=FAIL_FLAKY2
        )
        assert answer.choices[0].message.content == "[alpha] answer from claude-fake"
    message = ant.messages.create(
        model="gpt-then-claude", max_tokens=20, messages=[{"role": "user", "content": "hi"}], extra_headers=FAIL_FLAKY2
    )
    assert message.content[0].text == "[alpha] answer from claude-fake"
    assert [r["path"] for r in fakes["flaky2"].requests()] == ["/v1/chat/completions"] * 2
    assert [r["path"] for r in fakes["alpha"].requests()] == ["/v1/messages"] * 2


def test_a_decided_policy_translates_too(ant, oai, fakes):
    raw = oai.chat.completions.with_raw_response.create(model="cheapest", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-signalbox-reason"].startswith("cost")
    assert raw.parse().choices[0].message.content.startswith("[")
    message = ant.messages.create(model="cheapest", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text.startswith("[")
    served = {r["api"] for f in (fakes["alpha"], fakes["beta"]) for r in f.requests()}
    assert served <= {"anthropic", "openai"} and served


def test_translated_usage_is_accounted(gateway, oai, ant):
    """The request log (what budgets and metrics read) has the provider's token counts for
    translated answers and streams, in either client API."""
    raw = oai.chat.completions.with_raw_response.create(model="claude", messages=[{"role": "user", "content": "hi"}])
    ids = {raw.headers["x-request-id"]: (10, 7)}
    with ant.messages.stream(
        model="gpt", max_tokens=20, messages=[{"role": "user", "content": "hi"}], extra_headers={"x-fake-chunks": "3"}
    ) as s:
        s.get_final_message()
        ids[s.response.headers["x-request-id"]] = (10, 3)
    lines = logged(gateway, ids)
    assert {i: (e["prompt_tokens"], e["completion_tokens"]) for i, e in lines.items()} == ids


def test_answers_a_provider_would_compress_are_counted_and_translated(gateway, fakes, oai, ant):
    """The SDKs accept gzip, and providers (behind their CDN) then gzip their answers, as the
    fakes do. The gateway asks every attempt's answer unencoded, so translation and token
    accounting read JSON, not compressed bytes (before: translated answers failed and no token
    was counted, so budgets never moved)."""
    direct = httpx.post(fakes["gamma"].url + "/v1/chat/completions", json={"model": "gpt-fake", "messages": []})
    assert direct.headers.get("content-encoding") == "gzip"  # what a provider does when let

    ids = {}
    for alias in ("gpt", "claude", "cheapest"):
        raw = oai.chat.completions.with_raw_response.create(model=alias, messages=[{"role": "user", "content": "hi"}])
        assert raw.parse().choices[0].message.content
        ids[raw.headers["x-request-id"]] = alias
    raw_message = ant.messages.with_raw_response.create(
        model="gpt", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw_message.parse().content[0].text
    ids[raw_message.headers["x-request-id"]] = "gpt (Messages)"

    for name in ("alpha", "beta"):
        sent = [{k.lower(): v for k, v in r["headers"].items()}.get("accept-encoding") for r in fakes[name].requests()]
        assert sent and set(sent) == {"identity"}, (name, sent)
    counted = {i: e["completion_tokens"] for i, e in logged(gateway, ids).items()}
    assert all(tokens > 0 for tokens in counted.values()), counted


@pytest.mark.parametrize(
    ("client_api", "alias"), [("openai", "gpt"), ("openai", "claude"), ("anthropic", "gpt"), ("anthropic", "claude")]
)
def test_streams_torn_anywhere_arrive_whole_and_are_counted(gateway, fakes, oai, ant, client_api, alias):
    """Proxies and CDNs pass a provider's stream on in pieces that split events, lines and UTF-8
    characters. Passed through or translated, the client gets every character of the answer,
    and the request log has the provider's token counts."""
    torn = {"x-fake-fault": json.dumps({"kind": "torn"}), "x-fake-chunks": "4"}
    expected = "".join(f"chunk{i} {TORN_TEXT} " for i in range(4))
    if client_api == "openai":
        raw = oai.chat.completions.with_raw_response.create(
            model=alias, messages=[{"role": "user", "content": "hi"}], stream=True, extra_headers=torn
        )
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        request_id = raw.headers["x-request-id"]
    else:
        with ant.messages.stream(
            model=alias, max_tokens=20, messages=[{"role": "user", "content": "hi"}], extra_headers=torn
        ) as s:
            text = "".join(s.text_stream)
            request_id = s.response.headers["x-request-id"]
    assert text == expected
    line = logged(gateway, [request_id])[request_id]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (10, 4)


def test_a_provider_that_refuses_stream_options_gets_none_and_streams(gateway, fakes, oai, ant):
    """Some OpenAI-compatible APIs refuse `stream_options` (a 422), which the gateway adds to
    every stream to count its tokens: with `streamUsage: false` it sends none (not even a
    client's), compiled, decided or translated, and the stream is served."""
    fakes["delta"].behave(refuse_fields=["stream_options"])
    asked = {"stream_options": {"include_usage": True}}
    for alias in ("gpt-plain", "gpt-plain-cost"):
        chunks = oai.chat.completions.create(
            model=alias, messages=[{"role": "user", "content": "hi"}], stream=True, extra_body=asked
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    with ant.messages.stream(model="gpt-plain", max_tokens=20, messages=[{"role": "user", "content": "hi"}]) as s:
        assert "".join(s.text_stream)
    sent = fakes["delta"].requests()
    assert len(sent) == 3 and all("stream_options" not in r["body"] and r["stream"] for r in sent)
    # The control: the same server as a provider that takes the field (the default).
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="gpt-err", messages=[{"role": "user", "content": "hi"}], stream=True)


def test_each_attempt_line_keeps_the_providers_own_answer_id(gateway, fakes, oai):
    """Providers name each answer (OpenAI's x-request-id, Anthropic's request-id), and their
    support asks for it. The client's response carries the gateway's id (the one its request
    log line has); the attempt line keeps the provider's."""
    seen = {}
    for alias, fake in (("gpt", "beta"), ("claude", "alpha")):
        raw = oai.chat.completions.with_raw_response.create(model=alias, messages=[{"role": "user", "content": "hi"}])
        seen[raw.headers["x-request-id"]] = provider_request_id(fake, 1)
    kept = {i: e["provider_request_id"] for i, e in logged(gateway, seen, event="attempt").items()}
    assert kept == seen
