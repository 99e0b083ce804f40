"""OpenAI chat <-> AWS Bedrock's Converse API (issue 14): requests held to botocore's own model of
the operation, event streams decoded with botocore's own decoder however they are cut, and the
fake Bedrock's signature check held to botocore's own signer (so the dataplane tests' "the fake
accepted the signature" means what it says)."""

from __future__ import annotations

import hashlib
import json

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st

from signalbox import fakebedrock
from signalbox.core.errors import RequestError, UnsupportedFeature
from signalbox.extproc.translate import Translation, sse
from signalbox.extproc.translate.bedrock import model_of, stream_path

from .test_translate import BODIES, JSON, TEXTS, _chunks, _split

TO_BEDROCK = Translation("openai", "bedrock")
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
PNG = "iVBORw0KGgo="


def converse(body: dict, stream: bool = False) -> dict:
    to = Translation("openai", "bedrock")
    sent = json.loads(to.request(json.dumps(body).encode()))
    assert fakebedrock.request_problems("m.x-v1:0", stream, sent) == []
    return sent


def test_a_chat_request_becomes_a_converse_request_bedrock_accepts():
    sent = converse(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": "let me look",
                    "tool_calls": [
                        {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": '{"a":1}'}}
                    ],
                },
                {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
                {"role": "user", "content": "and so?"},
            ],
            "max_completion_tokens": 64,
            "top_p": 0.9,
            "stop": ["END"],
            "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "seed": 7,  # a hint Converse has no field for: dropped
        }
    )
    assert sent["system"] == [{"text": "be brief"}]
    assert sent["messages"][0] == {
        "role": "user",
        "content": [{"text": "what is this?"}, {"image": {"format": "png", "source": {"bytes": PNG}}}],
    }
    assert sent["messages"][1]["content"][1] == {
        "toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {"a": 1}}
    }
    # The tool result and the user's next words are one user turn (Converse alternates roles).
    assert sent["messages"][2] == {
        "role": "user",
        "content": [{"toolResult": {"toolUseId": "t1", "content": [{"text": "sunny"}]}}, {"text": "and so?"}],
    }
    assert sent["inferenceConfig"] == {"maxTokens": 64, "topP": 0.9, "stopSequences": ["END"]}
    assert sent["toolConfig"]["toolChoice"] == {"tool": {"name": "get_weather"}}


def test_json_schema_output_is_converses_structured_output():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    sent = converse(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "where?"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
        }
    )
    structure = sent["outputConfig"]["textFormat"]["structure"]["jsonSchema"]
    assert json.loads(structure["schema"]) == schema and structure["name"] == "place"


def test_what_converse_cannot_express_makes_the_backend_ineligible():
    for body in (
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
        },
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "audio": {"voice": "x"}},
    ):
        try:
            TO_BEDROCK.request(json.dumps(body).encode())
        except UnsupportedFeature as err:
            assert err.status == 400
        else:
            raise AssertionError(f"translated: {body}")


@settings(max_examples=300, deadline=None)
@given(body=BODIES | JSON)
def test_any_chat_body_becomes_converse_or_a_4xx(body):
    try:
        out = TO_BEDROCK.request(json.dumps(body).encode())
    except RequestError as err:
        assert 400 <= err.status < 500 and err.message
        return
    assert isinstance(json.loads(out), dict)


def test_paths_and_the_model_they_name():
    path = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
    assert stream_path(path) == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse-stream"
    assert stream_path(path + "?x=1") == path.replace("converse", "converse-stream") + "?x=1"
    assert model_of(path) == model_of(stream_path(path)) == "anthropic.claude-3-haiku-20240307-v1:0"
    assert model_of("/chat/completions") is None


def test_a_converse_answer_and_error_in_the_clients_shape():
    answer = fakebedrock.answer("hi", "get_weather", {"city": "Paris"}, "tu1")
    answer["usage"]["cacheReadInputTokens"] = 5
    to = Translation("openai", "bedrock")
    to.path_model = "m.x"
    chat = json.loads(to.answer(json.dumps(answer).encode()))
    assert chat["model"] == "m.x" and chat["choices"][0]["message"]["content"] == "hi"
    assert chat["choices"][0]["finish_reason"] == "tool_calls"
    assert json.loads(chat["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert chat["usage"]["prompt_tokens"] == 15 and chat["usage"]["prompt_tokens_details"]["cached_tokens"] == 5
    error = json.loads(to.answer(b'{"message": "Too many requests, please wait before trying again."}'))
    assert error["error"]["message"] == "Too many requests, please wait before trying again."
    as_anthropic = json.loads(Translation("anthropic", "bedrock").answer(b'{"message": "Input is too long"}'))
    assert as_anthropic["type"] == "error" and as_anthropic["error"]["message"] == "Input is too long"


def _stream(texts: list[str], tool: bool) -> bytes:
    event = fakebedrock.event
    out = event("messageStart", {"role": "assistant"})
    for text in texts:
        out += event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text}})
    if tool:
        out += event(
            "contentBlockStart", {"contentBlockIndex": 1, "start": {"toolUse": {"toolUseId": "t", "name": "f"}}}
        )
        for piece in ('{"a"', ": 1}"):
            out += event("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": piece}}})
    out += event("messageStop", {"stopReason": "tool_use" if tool else "end_turn"})
    return out + event("metadata", {"usage": {"inputTokens": 5, "outputTokens": 3, "totalTokens": 8}})


@settings(max_examples=100, deadline=None)
@given(
    texts=st.lists(TEXTS, min_size=1, max_size=5),
    tool=st.booleans(),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_an_event_stream_becomes_chat_chunks_however_it_is_cut(texts, tool, cuts):
    to = Translation("openai", "bedrock")
    to.streaming = True
    data = _stream(texts, tool)
    assert to.is_stream(data[:1])
    stream = to.stream()
    out = b"".join(stream.feed(c) for c in _split(data, cuts)) + stream.end()
    assert out.endswith(b"data: [DONE]\n\n")
    chunks = _chunks(out)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "".join(texts)
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == ["tool_calls" if tool else "stop"]
    assert (chunks[-1]["usage"]["prompt_tokens"], chunks[-1]["usage"]["completion_tokens"]) == (5, 3)
    calls = [t for c in chunks if c["choices"] for t in c["choices"][0]["delta"].get("tool_calls") or []]
    assert "".join(t["function"]["arguments"] for t in calls) == ('{"a": 1}' if tool else "")


def test_a_stream_that_breaks_ends_in_an_error_event_never_done():
    data = _stream(["one ", "two"], False)
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0xFF  # a CRC no longer matches
    for broken in (
        bytes(corrupt),
        _stream(["one "], False)[:40] + fakebedrock.exception("throttlingException", "slow down"),
        fakebedrock.event("messageStart", {"role": "assistant"})
        + fakebedrock.exception("modelStreamErrorException", "the model stopped"),
    ):
        stream = Translation("openai", "bedrock").stream()
        out = stream.feed(broken) + stream.end()
        assert b"[DONE]" not in out
        assert "error" in _chunks(out)[-1], out


def test_a_stream_without_its_metadata_event_is_still_finished():
    metadata = fakebedrock.event("metadata", {"usage": {"inputTokens": 5, "outputTokens": 3, "totalTokens": 8}})
    data = _stream(["one"], False)
    assert data.endswith(metadata)
    stream = Translation("openai", "bedrock").stream()
    out = stream.feed(data[: -len(metadata)]) + stream.end()
    assert out.endswith(b"data: [DONE]\n\n")
    assert [c["choices"][0]["finish_reason"] for c in _chunks(out) if c["choices"]] == [None, None, "stop"]


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(max_size=40), max_size=8))
def test_any_bytes_as_a_stream_give_only_well_formed_events(chunks):
    stream = Translation("openai", "bedrock").stream()
    out = b"".join(stream.feed(c) for c in chunks) + stream.end()
    for event in sse.Reader().feed(out):
        assert event.data == "[DONE]" or isinstance(json.loads(event.data), dict)


# ---------------------------------------------------------------------- the fake's signature check


def _signed(body: bytes, path: str = "/model/m.x-v1%3A0/converse", secret: str = "s3cret") -> dict[str, str]:
    request = AWSRequest(
        method="POST", url=f"http://127.0.0.1:9{path}", data=body, headers={"content-type": "application/json"}
    )
    SigV4Auth(Credentials("AKIA1", secret), "bedrock", "eu-west-1").add_auth(request)
    return {"host": "127.0.0.1:9", **dict(request.headers.items())}


def test_the_fake_accepts_what_botocore_signs_and_nothing_else():
    body, path = b'{"messages":[]}', "/model/m.x-v1%3A0/converse"
    secrets = {"AKIA1": "s3cret"}
    check = fakebedrock.signature_problem
    assert check("POST", "127.0.0.1:9", path, _signed(body), body, secrets) is None
    assert "does not match" in check("POST", "127.0.0.1:9", path, _signed(body, secret="other"), body, secrets)
    assert "does not match" in check("POST", "127.0.0.1:9", path, _signed(body), b'{"messages":[1]}', secrets)
    assert "does not match" in check("POST", "127.0.0.1:9", path + "-stream", _signed(body), body, secrets)
    assert "invalid" in check("POST", "127.0.0.1:9", path, _signed(body), body, {"AKIA2": "s3cret"})
    unsigned = {"host": "127.0.0.1:9", "x-amz-date": "20260101T000000Z"}
    assert "no SigV4" in check("POST", "127.0.0.1:9", path, unsigned, body, secrets)
    lying = {**_signed(body), "x-amz-content-sha256": hashlib.sha256(b"other").hexdigest()}
    assert "hash" in check("POST", "127.0.0.1:9", path, lying, body, secrets)
