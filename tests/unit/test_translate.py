"""Translation between OpenAI Chat Completions and Anthropic Messages (extproc.translate): what
a client sends and what a provider answers are untrusted, so every entry point is driven with
hypothesis as well as with the shapes the two API references define."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalbox import fakeprovider
from signalbox.core.errors import MalformedRequest, RequestError, UnsupportedFeature
from signalbox.extproc.translate import Translation, parse_route, sse

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
# Chat's and Messages' fields, then the Responses API's.
KEYS = st.sampled_from(
    [
        "model",
        "messages",
        "system",
        "max_tokens",
        "stream",
        "tools",
        "tool_choice",
        "stop",
        "n",
        "content",
        "role",
        "input",
        "instructions",
        "text",
        "store",
    ]
)
BODIES = st.dictionaries(KEYS, JSON, max_size=6)
TO_ANTHROPIC, TO_OPENAI = Translation("openai", "anthropic"), Translation("anthropic", "openai")
TO_CHAT_FROM_RESPONSES = Translation("responses", "openai")
TO_ANTHROPIC_FROM_RESPONSES = Translation("responses", "anthropic")
TO_GEMINI = Translation("openai", "gemini")
TOOL_FOR_JSON = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
EVERY = [
    TO_ANTHROPIC,
    TO_OPENAI,
    TO_CHAT_FROM_RESPONSES,
    TO_ANTHROPIC_FROM_RESPONSES,
    TO_GEMINI,
    Translation("anthropic", "gemini"),
    Translation("responses", "gemini"),
    Translation("openai", "bedrock"),
    Translation("anthropic", "bedrock"),
    Translation("responses", "bedrock"),
]


@settings(max_examples=300, deadline=None)
@given(body=BODIES | JSON, to=st.sampled_from(EVERY))
def test_any_request_body_is_translated_or_refused_with_a_4xx(body, to):
    try:
        out = to.request(json.dumps(body).encode())
    except RequestError as err:
        assert 400 <= err.status < 500 and err.message
        return
    assert isinstance(json.loads(out), dict)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64), to=st.sampled_from(EVERY))
def test_bytes_that_are_not_json_are_a_malformed_request(raw, to):
    try:
        json.loads(raw)
    except ValueError:
        with pytest.raises(MalformedRequest):
            to.request(raw)


@settings(max_examples=300, deadline=None)
@given(
    raw=st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode()),
    status=st.sampled_from([200, 400, 429, 500, 529]),
)
def test_any_provider_answer_becomes_json_in_the_clients_shape(raw, status):
    chat = json.loads(TO_ANTHROPIC.answer(raw))  # an Anthropic backend's, for an OpenAI client
    messages = json.loads(TO_OPENAI.answer(raw))  # an OpenAI backend's, for an Anthropic client
    assert chat.get("object") == "chat.completion" or isinstance(chat["error"]["message"], str)
    assert messages.get("type") == "message" or (
        messages["type"] == "error" and isinstance(messages["error"]["message"], str)
    )


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=40), max_size=8))
def test_stream_translators_take_any_bytes_and_emit_only_well_formed_events(chunks):
    for to in EVERY:
        stream = to.stream()
        out = b"".join(stream.feed(c) for c in chunks) + stream.end()
        reader = sse.Reader()
        events = reader.feed(out)
        assert reader.close() == []  # nothing but whole events
        for event in events:
            assert event.data == "[DONE]" or isinstance(json.loads(event.data), dict)


def test_a_chat_request_becomes_the_messages_the_api_reference_describes():
    body = {
        "model": "claude",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
        ],
        "max_completion_tokens": 99,
        "stop": "END",
        "user": "u1",
        "parallel_tool_calls": False,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "seed": 7,
    }
    out = json.loads(TO_ANTHROPIC.request(json.dumps(body).encode()))
    assert out == {
        "model": "claude",
        "system": [{"type": "text", "text": "be brief"}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                ],
            }
        ],
        "max_tokens": 99,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u1"},
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    }


@settings(max_examples=150, deadline=None)
@given(
    extra=st.fixed_dictionaries(
        {},
        optional={
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0, 1),
            "seed": st.integers(0, 2**31),
            "presence_penalty": st.floats(-2, 2),
            "frequency_penalty": st.floats(-2, 2),
            "stop": st.text(min_size=1, max_size=5) | st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4),
            "user": st.text(max_size=10),
            "max_tokens": st.integers(1, 10_000),
            "stream": st.booleans(),
            "reasoning_effort": st.sampled_from(["low", "medium", "high"]),
            "parallel_tool_calls": st.booleans(),
        },
    ),
    responses=st.booleans(),
)
def test_what_openai_clients_send_by_default_reaches_anthropic_in_fields_its_api_takes(extra, responses):
    """The fields SDKs and frameworks set on every request (LangChain sends temperature 0.7)
    become a Messages request the current Anthropic API accepts: the fake's check is the
    Anthropic SDK's own request types, which no longer hold sampling parameters."""
    if responses:
        body = {
            "model": "m",
            "input": "hi",
            **{k: v for k, v in extra.items() if k in ("temperature", "top_p", "stream")},
        }
        out = json.loads(TO_ANTHROPIC_FROM_RESPONSES.request(json.dumps(body).encode()))
    else:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
        out = json.loads(TO_ANTHROPIC.request(json.dumps(body).encode()))
    assert fakeprovider.request_problems("anthropic", out) == []


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"n": 3}, "'n'"),
        ({"logprobs": True}, "'logprobs'"),
        ({"response_format": {"type": "json_object"}, "tools": [TOOL_FOR_JSON]}, "'response_format' with 'tools'"),
        ({"audio": {}}, "'audio'"),
    ],
)
def test_what_anthropic_cannot_express_is_refused_by_name(extra, named):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(UnsupportedFeature) as caught:
        TO_ANTHROPIC.request(json.dumps(body).encode())
    assert named in caught.value.message


def test_anthropic_server_tools_and_documents_have_no_openai_equivalent():
    tool = {"model": "m", "max_tokens": 5, "messages": [], "tools": [{"type": "web_search_20250305", "name": "w"}]}
    with pytest.raises(UnsupportedFeature, match="server tool"):
        TO_OPENAI.request(json.dumps(tool).encode())
    document = {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "text", "data": "x"}}]}],
    }
    with pytest.raises(UnsupportedFeature, match="document"):
        TO_OPENAI.request(json.dumps(document).encode())


TEXTS = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)


@settings(max_examples=100, deadline=None)
@given(turns=st.lists(st.tuples(st.sampled_from(["user", "assistant"]), TEXTS), min_size=1, max_size=6), system=TEXTS)
def test_text_conversations_survive_the_round_trip(turns, system):
    chat = {
        "model": "m",
        "messages": [{"role": "system", "content": system}] + [{"role": r, "content": t} for r, t in turns],
        "max_tokens": 10,
    }
    there = TO_ANTHROPIC.request(json.dumps(chat).encode())
    back = json.loads(TO_OPENAI.request(there))
    assert back["messages"][0] == {"role": "system", "content": system}
    rest = back["messages"][1:]
    # Consecutive turns of one role are one turn in Anthropic's API; their texts stay in order.
    user = [part["text"] for m in rest if m["role"] == "user" for part in m["content"]]
    assert user == [t for r, t in turns if r == "user"]
    assistant = "\n".join(m["content"] for m in rest if m["role"] == "assistant")
    assert assistant == "\n".join(t for r, t in turns if r == "assistant")


def _anthropic_events(texts: list[str], tool: bool) -> bytes:
    def ev(name: str, data: dict) -> bytes:
        return sse.encode({"type": name, **data}, name)

    out = ev("message_start", {"message": {"id": "msg_1", "model": "claude", "usage": {"input_tokens": 12}}})
    out += ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    out += b": keep-alive\n\n" + ev("ping", {})
    for text in texts:
        out += ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})
    out += ev("content_block_stop", {"index": 0})
    if tool:
        out += ev("content_block_start", {"index": 1, "content_block": {"type": "tool_use", "id": "t1", "name": "f"}})
        out += ev("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"a":'}})
        out += ev("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": "1}"}})
        out += ev("content_block_stop", {"index": 1})
    reason = "tool_use" if tool else "end_turn"
    out += ev("message_delta", {"delta": {"stop_reason": reason}, "usage": {"output_tokens": 9}})
    return out + ev("message_stop", {})


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _chunks(out: bytes) -> list[dict]:
    return [json.loads(e.data) for e in sse.Reader().feed(out) if e.data != "[DONE]"]


@settings(max_examples=100, deadline=None)
@given(
    texts=st.lists(TEXTS, min_size=1, max_size=5),
    tool=st.booleans(),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_an_anthropic_stream_becomes_the_same_chat_chunks_however_it_is_cut(texts, tool, cuts):
    data = _anthropic_events(texts, tool)
    stream = TO_ANTHROPIC.stream()
    out = b"".join(stream.feed(c) for c in _split(data, cuts)) + stream.end()
    assert out.endswith(b"data: [DONE]\n\n")
    chunks = _chunks(out)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "".join(texts)
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == ["tool_calls" if tool else "stop"]
    assert chunks[-1]["usage"]["prompt_tokens"] == 12 and chunks[-1]["usage"]["completion_tokens"] == 9
    calls = [t for c in chunks if c["choices"] for t in c["choices"][0]["delta"].get("tool_calls") or []]
    if tool:
        assert calls[0]["id"] == "t1" and calls[0]["function"]["name"] == "f"
        assert "".join(t["function"]["arguments"] for t in calls) == '{"a":1}'
    else:
        assert calls == []


def _chat_chunks(texts: list[str], tool: bool, done: bool) -> bytes:
    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return sse.encode(
            {"id": "c1", "model": "gpt", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        )

    out = chunk({"role": "assistant", "content": ""})
    for text in texts:
        out += chunk({"content": text})
    if tool:
        out += chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
                ]
            }
        )
        out += chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":1}'}}]})
    out += chunk({}, "tool_calls" if tool else "stop")
    out += sse.encode({"id": "c1", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 6}})
    return out + (b"data: [DONE]\n\n" if done else b"")


@settings(max_examples=100, deadline=None)
@given(
    texts=st.lists(TEXTS, min_size=1, max_size=5),
    tool=st.booleans(),
    done=st.booleans(),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_chat_chunks_become_anthropics_event_sequence_however_they_are_cut(texts, tool, done, cuts):
    data = _chat_chunks(texts, tool, done)
    stream = TO_OPENAI.stream()
    out = b"".join(stream.feed(c) for c in _split(data, cuts)) + stream.end()
    events = sse.Reader().feed(out)
    names = [e.name for e in events]
    assert all(e.name == json.loads(e.data)["type"] for e in events)
    # The order Anthropic's reference gives, even when the provider never sent [DONE].
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    opened = [json.loads(e.data)["index"] for e in events if e.name == "content_block_start"]
    closed = [json.loads(e.data)["index"] for e in events if e.name == "content_block_stop"]
    assert opened == closed == list(range(len(opened)))
    deltas = [json.loads(e.data)["delta"] for e in events if e.name == "content_block_delta"]
    assert "".join(d.get("text", "") for d in deltas) == "".join(texts)
    assert "".join(d.get("partial_json", "") for d in deltas) == ('{"a":1}' if tool else "")
    final = json.loads(events[-2].data)
    assert final["delta"]["stop_reason"] == ("tool_use" if tool else "end_turn")
    assert (final["usage"]["input_tokens"], final["usage"]["output_tokens"]) == (4, 6)


def test_errors_keep_their_meaning_across_the_apis():
    openai_error = {"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}
    assert json.loads(TO_OPENAI.answer(json.dumps(openai_error).encode())) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }
    anthropic_error = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    chat = json.loads(TO_ANTHROPIC.answer(json.dumps(anthropic_error).encode()))
    assert chat["error"]["message"] == "busy" and chat["error"]["type"] == "overloaded_error"
    # A proxy's HTML page is an error too, its text kept.
    assert json.loads(TO_OPENAI.answer(b"<html>502 Bad Gateway</html>"))["error"]["message"].startswith("<html>")


@pytest.mark.parametrize(
    ("first", "stream"),
    [
        (b"data: {}", True),
        (b"event: message_start\n", True),
        (b": ping\n\n", True),
        (b'{"id": 1}', False),
        (b"\n  {", False),
        (b"<html>", False),
    ],
)
def test_a_stream_is_told_from_json_by_its_first_bytes(first, stream):
    assert TO_OPENAI.is_stream(first) is stream


def test_the_marker_names_two_different_known_apis():
    assert parse_route("openai>anthropic") == ("openai", "anthropic", True)
    assert parse_route("anthropic>openai;no_usage") == ("anthropic", "openai", False)
    for bad in ("", "openai", "openai>openai", "x>anthropic", "anthropic>"):
        assert parse_route(bad) is None


def test_event_data_keeps_characters_python_would_split_lines_at():
    """SSE lines end at CR/LF only: U+0085 and U+2028 inside JSON text are data (hypothesis found
    a stream translator that dropped such a chunk)."""
    payload = json.dumps({"text": "a\x85b\u2028c"}, ensure_ascii=False)
    (event,) = sse.Reader().feed(f"event: x\ndata: {payload}\n\n".encode())
    assert event.json() == {"text": "a\x85b\u2028c"}


# ---------------------------------------------------------------------------- Responses API

TO_CHAT_FROM_RESPONSES, TO_ANTHROPIC_FROM_RESPONSES = (
    Translation("responses", "openai"),
    Translation("responses", "anthropic"),
)


def test_a_responses_request_becomes_chat_and_anthropic_messages():
    body = {
        "model": "m",
        "instructions": "be brief",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ],
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
        "max_output_tokens": 50,
        "store": True,
    }
    chat = json.loads(TO_CHAT_FROM_RESPONSES.request(json.dumps(body).encode()))
    assert chat["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    assert chat["max_tokens"] == 50 and chat["tools"][0]["function"]["name"] == "get_weather"
    messages = json.loads(TO_ANTHROPIC_FROM_RESPONSES.request(json.dumps(body).encode()))
    assert messages["system"] == [{"type": "text", "text": "be brief"}]
    assert messages["messages"][1]["content"][0] == {
        "type": "tool_use",
        "id": "c1",
        "name": "get_weather",
        "input": {"city": "Paris"},
    }


@pytest.mark.parametrize("field", ["previous_response_id", "conversation", "background"])
def test_what_needs_state_on_the_provider_is_refused_by_name(field):
    body = {"model": "m", "input": "hi", field: "resp_1" if field != "background" else True}
    with pytest.raises(UnsupportedFeature, match=field):
        TO_CHAT_FROM_RESPONSES.request(json.dumps(body).encode())


def _validated_events(out: bytes) -> list:
    """Each event checked against the OpenAI SDK's model of its type."""
    import typing

    from openai.types.responses import ResponseStreamEvent

    models = {}
    for model in typing.get_args(typing.get_args(ResponseStreamEvent)[0]):
        for kind in typing.get_args(model.model_fields["type"].annotation):
            models[kind] = model
    events = [json.loads(e.data) for e in sse.Reader().feed(out)]
    return [models[e["type"]].model_validate(e) for e in events]


@settings(max_examples=50, deadline=None)
@given(
    texts=st.lists(TEXTS, min_size=1, max_size=4),
    tool=st.booleans(),
    done=st.booleans(),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    anthropic=st.booleans(),
)
def test_a_stream_becomes_responses_events_the_sdk_accepts(texts, tool, done, cuts, anthropic):
    """Chat chunks (or Anthropic events, through chat) as the Responses API's events, each one
    validated against the OpenAI SDK's own event models."""
    to = TO_ANTHROPIC_FROM_RESPONSES if anthropic else TO_CHAT_FROM_RESPONSES
    data = _anthropic_events(texts, tool) if anthropic else _chat_chunks(texts, tool, done)
    stream = to.stream()
    out = b"".join(stream.feed(c) for c in _split(data, cuts)) + stream.end()
    events = _validated_events(out)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "".join(texts)
    final = events[-1].response
    assert final.output_text == "".join(texts)
    calls = [item for item in final.output if item.type == "function_call"]
    if tool:
        assert json.loads(calls[0].arguments) == {"a": 1}
    else:
        assert calls == []
    assert final.usage.output_tokens == (9 if anthropic else 6)


def test_an_answer_becomes_a_response_the_sdk_accepts():
    from openai.types.responses import Response

    chat = {
        "id": "c",
        "model": "gpt",
        "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "hello"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    response = Response.model_validate(json.loads(TO_CHAT_FROM_RESPONSES.answer(json.dumps(chat).encode())))
    assert response.output_text == "hello" and response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (3, 2)
    message = {
        "type": "message",
        "id": "m",
        "model": "claude",
        "role": "assistant",
        "stop_reason": "end_turn",
        "content": [{"type": "text", "text": "hi"}],
        "usage": {"input_tokens": 4, "output_tokens": 1},
    }
    response = Response.model_validate(json.loads(TO_ANTHROPIC_FROM_RESPONSES.answer(json.dumps(message).encode())))
    assert response.output_text == "hi" and response.usage.input_tokens == 4


# ---------------------------------------------------------------------------- Gemini backends


def test_a_chat_request_becomes_a_gemini_generate_content_request():
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "weather?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
        "max_tokens": 20,
        "stop": ["END"],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
        "tool_choice": "required",
        "stream": True,
    }
    assert json.loads(TO_GEMINI.request(json.dumps(body).encode())) == {
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "contents": [
            {
                "role": "user",
                "parts": [{"text": "weather?"}, {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}],
            },
            {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
            # A tool result names its function in Gemini's API: found from the call's id.
            {
                "role": "user",
                "parts": [{"functionResponse": {"name": "get_weather", "response": {"content": "sunny"}}}],
            },
        ],
        "generationConfig": {"maxOutputTokens": 20, "stopSequences": ["END"]},
        "tools": [{"functionDeclarations": [{"name": "get_weather", "parametersJsonSchema": {"type": "object"}}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY"}},
    }
    assert TO_GEMINI.streaming


def test_gemini_streams_on_its_own_method():
    from signalbox.extproc.translate.gemini import stream_path

    assert stream_path("/v1beta/models/g:generateContent") == "/v1beta/models/g:streamGenerateContent?alt=sse"
    assert stream_path("/v/models/g:generateContent?x=1") == "/v/models/g:streamGenerateContent?x=1&alt=sse"


def _gemini_events(texts: list[str], tool: bool) -> bytes:
    out = b""
    for text in texts:
        chunk = {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}}], "modelVersion": "g"}
        out += f"data: {json.dumps(chunk, ensure_ascii=False)}\r\n\r\n".encode()
    parts = [{"functionCall": {"name": "f", "args": {"a": 1}}}] if tool else []
    last = {
        "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 3, "totalTokenCount": 8},
    }
    return out + f"data: {json.dumps(last)}\r\n\r\n".encode()


@settings(max_examples=100, deadline=None)
@given(
    texts=st.lists(TEXTS, min_size=1, max_size=5),
    tool=st.booleans(),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_a_gemini_stream_becomes_chat_chunks_however_it_is_cut(texts, tool, cuts):
    stream = TO_GEMINI.stream()
    out = b"".join(stream.feed(c) for c in _split(_gemini_events(texts, tool), cuts)) + stream.end()
    assert out.endswith(b"data: [DONE]\n\n")
    chunks = _chunks(out)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "".join(texts)
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == ["tool_calls" if tool else "stop"]
    assert (chunks[-1]["usage"]["prompt_tokens"], chunks[-1]["usage"]["completion_tokens"]) == (5, 3)
    calls = [t for c in chunks if c["choices"] for t in c["choices"][0]["delta"].get("tool_calls") or []]
    assert [json.loads(t["function"]["arguments"]) for t in calls] == ([{"a": 1}] if tool else [])


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("CONTINUATION", "length"),
        ("SAFETY", "content_filter"),
        ("IMAGE_SAFETY", "content_filter"),
        ("IMAGE_PROHIBITED_CONTENT", "content_filter"),
        ("MODEL_ARMOR", "content_filter"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
        ("SOMETHING_NEW", "stop"),
    ],
)
def test_a_gemini_finish_reason_keeps_its_meaning_for_chat_clients(reason, finish):
    """A filtered answer must read as filtered (content_filter; Anthropic clients get refusal),
    not as a natural stop, whatever Gemini filtered: text, images, Model Armor."""
    answer = {
        "candidates": [{"content": {"role": "model", "parts": [{"text": "x"}]}, "finishReason": reason}],
        "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1, "totalTokenCount": 2},
    }
    assert json.loads(TO_GEMINI.answer(json.dumps(answer).encode()))["choices"][0]["finish_reason"] == finish


def test_gemini_errors_keep_their_meaning():
    error = {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}
    assert json.loads(TO_GEMINI.answer(json.dumps(error).encode()))["error"]["type"] == "RESOURCE_EXHAUSTED"
    as_anthropic = json.loads(Translation("anthropic", "gemini").answer(json.dumps(error).encode()))
    assert as_anthropic == {"type": "error", "error": {"type": "rate_limit_error", "message": "quota"}}


def test_system_turns_among_anthropic_messages_become_chat_system_messages():
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    }
    chat = json.loads(TO_OPENAI.request(json.dumps(body).encode()))
    assert chat["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


# ---------------------------------------------------------------------------- JSON output on Anthropic


def test_json_output_on_an_anthropic_backend_is_a_forced_tool_whose_input_is_the_answer():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "where?"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    }
    to = Translation("openai", "anthropic")
    sent = json.loads(to.request(json.dumps(body).encode()))
    assert sent["tools"] == [
        {"name": "json_output", "description": sent["tools"][0]["description"], "input_schema": schema}
    ]
    assert sent["tool_choice"] == {"type": "tool", "name": "json_output"}
    message = {
        "type": "message",
        "id": "m1",
        "model": "claude",
        "role": "assistant",
        "stop_reason": "tool_use",
        "content": [{"type": "tool_use", "id": "t", "name": "json_output", "input": {"city": "Paris"}}],
        "usage": {"input_tokens": 3, "output_tokens": 4},
    }
    answer = json.loads(to.answer(json.dumps(message).encode()))
    choice = answer["choices"][0]
    assert json.loads(choice["message"]["content"]) == {"city": "Paris"}
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    # Streamed: the tool's input arrives as the answer's text, in pieces.
    events = b"".join(
        sse.encode({"type": n, **d}, n)
        for n, d in [
            ("message_start", {"message": {"id": "m1", "model": "claude", "usage": {"input_tokens": 3}}}),
            (
                "content_block_start",
                {"index": 0, "content_block": {"type": "tool_use", "id": "t", "name": "json_output"}},
            ),
            ("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"city":'}}),
            ("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta", "partial_json": ' "Paris"}'}}),
            ("message_delta", {"delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 4}}),
            ("message_stop", {}),
        ]
    )
    stream = to.stream()
    chunks = _chunks(stream.feed(events) + stream.end())
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert json.loads(text) == {"city": "Paris"}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == [
        "stop"
    ]
    assert not any(c["choices"][0]["delta"].get("tool_calls") for c in chunks if c["choices"])


def test_json_output_needs_an_object_schema_on_an_anthropic_backend():
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "n?"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}},
    }
    with pytest.raises(UnsupportedFeature, match="type is object"):
        Translation("openai", "anthropic").request(json.dumps(body).encode())


def test_every_stop_reason_of_anthropics_api_has_a_chat_finish_reason_of_its_own():
    """A stop reason left to the default reads as a normal end: a cut answer
    (`model_context_window_exceeded`, filled context window) must say `length`, as max_tokens
    does. Every reason the pinned Anthropic SDK knows is mapped on purpose, to a reason OpenAI's
    SDK knows."""
    import typing

    import anthropic.types
    from openai.types.chat.chat_completion import Choice

    from signalbox.extproc.translate.anthropic import _FINISH_TO_STOP, _STOP_TO_FINISH

    reasons = set(typing.get_args(anthropic.types.StopReason))
    finishes = set(typing.get_args(Choice.model_fields["finish_reason"].annotation))
    assert reasons <= set(_STOP_TO_FINISH) and set(_STOP_TO_FINISH.values()) <= finishes
    assert finishes <= set(_FINISH_TO_STOP) and set(_FINISH_TO_STOP.values()) <= reasons  # and back
    assert _STOP_TO_FINISH["model_context_window_exceeded"] == _STOP_TO_FINISH["max_tokens"] == "length"


def test_every_stop_reason_of_bedrocks_converse_api_is_mapped_on_purpose():
    """As for Anthropic's: every stopReason of botocore's model of the Converse API (the
    signer's own service model) has its chat finish reason written down."""
    import botocore.session

    from signalbox.extproc.translate.bedrock import _FINISH

    model = botocore.session.get_session().get_service_model("bedrock-runtime")
    assert set(model.shape_for("StopReason").enum) <= set(_FINISH)


@pytest.mark.parametrize(
    ("provider_error", "anthropic_type"),
    [
        # vLLM's error (newer and older shapes): the OpenAI SDK's exception name as the type.
        ({"error": {"message": "bad", "type": "BadRequestError", "param": None, "code": 400}}, "invalid_request_error"),
        ({"object": "error", "message": "bad", "type": "NotFoundError", "code": 404}, "not_found_error"),
        # A type nobody knows, with the HTTP status as the code.
        ({"error": {"message": "bad", "type": "server_said_no", "code": "400"}}, "invalid_request_error"),
        ({"error": {"message": "bad", "type": "server_said_no", "code": "529"}}, "overloaded_error"),
        ({"error": {"message": "bad", "type": "server_said_no"}}, "api_error"),
    ],
)
def test_an_openai_compatible_servers_error_reaches_an_anthropic_client_with_its_meaning(
    provider_error, anthropic_type
):
    out = json.loads(TO_OPENAI.answer(json.dumps(provider_error).encode()))
    assert out == {"type": "error", "error": {"type": anthropic_type, "message": "bad"}}
