"""The stream relay's pieces (extproc.relay): its signed decisions, what it reads of an answer
it passes on, the continuation it asks for and how it joins the client's stream. The relay end
to end, through Envoy with the official SDKs, is in tests/faults (onBrokenStream)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalbox.core.errors import ANTHROPIC_API, OPENAI_API, RESPONSES_API
from signalbox.extproc import relay
from signalbox.extproc.decisions import DecisionSigner
from signalbox.extproc.translate import sse

NOW = 1_800_000_000.0


def events(raw: bytes) -> list[sse.Event]:
    reader = sse.Reader()
    return reader.feed(raw) + reader.close()


def chat_chunk(content: str | None = None, role: str | None = None, cid: str = "c1", **delta) -> bytes:
    if content is not None:
        delta["content"] = content
    if role is not None:
        delta["role"] = role
    return sse.encode(
        {"id": cid, "object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": delta}]}
    )


def messages_event(kind: str, **data) -> bytes:
    return sse.encode({"type": kind, **data}, kind)


# ------------------------------------------------------------------ the relay's signed decision


def test_a_sealed_decision_opens_only_unchanged_in_time_and_for_the_relay():
    signer = DecisionSigner(b"k" * 32)
    token = relay.seal(signer, {"target": "t.a", "policy": "p"}, 30, NOW)
    assert signer.unseal(relay.RELAY_PURPOSE, token, NOW + 29) == {"target": "t.a", "policy": "p"}
    with pytest.raises(ValueError, match="expired"):
        signer.unseal(relay.RELAY_PURPOSE, token, NOW + 31)
    with pytest.raises(ValueError, match="signature"):
        DecisionSigner(b"x" * 32).unseal(relay.RELAY_PURPOSE, token, NOW)
    mac = token.split(".")[1]
    edited = relay.seal(signer, {"target": "t.b", "policy": "p"}, 30, NOW).split(".")[0]
    with pytest.raises(ValueError, match="signature"):
        signer.unseal(relay.RELAY_PURPOSE, f"{edited}.{mac}", NOW)
    with pytest.raises(ValueError):
        signer.unseal("other", token, NOW)
    # A decision token (the feedback's) is signed by the same key but never opens as a relay's.
    with pytest.raises(ValueError):
        signer.unseal(relay.RELAY_PURPOSE, signer.token("p", "chat/simple", "b"), NOW)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_header_value_a_client_sends_is_refused_as_a_valueerror(value):
    with pytest.raises(ValueError):
        DecisionSigner(b"k" * 32).unseal(relay.RELAY_PURPOSE, value, NOW)


# ------------------------------------------------------------------ what the relay reads


def test_the_transcript_keeps_a_chat_answers_text_id_and_end():
    t = relay.Transcript(OPENAI_API)
    for e in events(chat_chunk("Hel", role="assistant") + chat_chunk("lo") + sse.encode("[DONE]")):
        t.read(e)
    assert ("".join(t.text), t.answer_id, t.ended, t.continuable) == ("Hello", "c1", True, True)
    tool = relay.Transcript(OPENAI_API)
    for e in events(chat_chunk(tool_calls=[{"index": 0, "function": {"name": "f"}}])):
        tool.read(e)
    assert not tool.continuable  # a tool call half streamed cannot be taken up by another model


def test_the_transcript_keeps_a_messages_answers_text_and_what_opened_it():
    t = relay.Transcript(ANTHROPIC_API)
    raw = messages_event("message_start", message={"id": "msg_1"}) + messages_event(
        "content_block_start", index=0, content_block={"type": "text", "text": ""}
    )
    raw += messages_event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi "})
    for e in events(raw):
        t.read(e)
    assert ("".join(t.text), t.opened, t.ended, t.continuable) == (
        "Hi ",
        {"message_start", "content_block_start"},
        False,
        True,
    )
    assert not relay.Transcript(RESPONSES_API).continuable  # Responses streams get the error event


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8), st.sampled_from([OPENAI_API, ANTHROPIC_API, RESPONSES_API]))
def test_any_bytes_from_a_provider_are_read_and_spliced_without_raising(chunks, api):
    """What the relay reads comes from providers (through the translation): never trusted."""
    t = relay.Transcript(api)
    splicer = relay.Splicer(api, "c1", trimmed=True)
    reader = sse.Reader()
    for chunk in chunks:
        for e in reader.feed(chunk):
            t.read(e)
            assert isinstance(splicer.splice(e), bytes)


# ------------------------------------------------------------------ the continuation


def test_a_continuation_is_a_prefill_where_the_backend_takes_one_and_a_request_to_go_on_elsewhere():
    body = {"model": "alias", "messages": [{"role": "user", "content": "hi"}], "n": 1, "stream": True}
    prefill = relay.continuation_body(body, OPENAI_API, "Once upon ", prefill=True)
    assert prefill["messages"][-1] == {"role": "assistant", "content": "Once upon"}  # no trailing space
    assert "n" not in prefill and body["messages"] == [{"role": "user", "content": "hi"}]  # not mutated
    asked = relay.continuation_body(body, OPENAI_API, "Once upon ", prefill=False)
    assert asked["messages"][-2] == {"role": "assistant", "content": "Once upon "}
    assert asked["messages"][-1]["role"] == "user" and asked["messages"][-1]["content"] == relay.CONTINUE_INSTRUCTION
    claude = relay.continuation_body({"messages": []}, ANTHROPIC_API, "Once ", prefill=True)
    assert claude["messages"] == [{"role": "assistant", "content": [{"type": "text", "text": "Once"}]}]
    # Nothing reached the client yet: the request goes as it came.
    assert relay.continuation_body(body, OPENAI_API, " ", prefill=True) == body


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=10),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20), lambda c: st.lists(c, max_size=3)
        ),
        max_size=5,
    ),
    st.text(max_size=50),
    st.booleans(),
)
def test_any_client_body_gives_a_json_continuation_or_none(body, text, prefill):
    """The body is the client's: a continuation of any JSON object is JSON, or there is none."""
    out = relay.continuation_body(body, OPENAI_API, text, prefill)
    assert out is None or json.loads(json.dumps(out)) == out


def test_a_chat_continuation_joins_the_first_answer_under_its_id_without_a_second_role():
    splicer = relay.Splicer(OPENAI_API, "first", trimmed=True)
    out = b"".join(
        splicer.splice(e) for e in events(chat_chunk(" on", role="assistant", cid="second") + sse.encode("[DONE]"))
    )
    first, done = events(out)
    assert first.json()["id"] == "first" and first.json()["choices"][0]["delta"] == {"content": "on"}
    assert done.data == "[DONE]"


def test_a_messages_continuation_leaves_out_only_the_opening_the_client_has():
    raw = messages_event("message_start", message={"id": "msg_2"}) + messages_event(
        "content_block_start", index=0, content_block={"type": "text", "text": ""}
    )
    raw += messages_event("content_block_delta", index=0, delta={"type": "text_delta", "text": " a time"})
    raw += messages_event("message_stop")
    had_all = relay.Splicer(ANTHROPIC_API, "", trimmed=True, opened=frozenset({"message_start", "content_block_start"}))
    kinds = [e.name for e in events(b"".join(had_all.splice(e) for e in events(raw)))]
    assert kinds == ["content_block_delta", "message_stop"]
    had_none = relay.Splicer(ANTHROPIC_API, "", trimmed=False)
    kinds = [e.name for e in events(b"".join(had_none.splice(e) for e in events(raw)))]
    assert kinds == ["message_start", "content_block_start", "content_block_delta", "message_stop"]
    spliced = events(
        b"".join(relay.Splicer(ANTHROPIC_API, "", True, frozenset({"message_start"})).splice(e) for e in events(raw))
    )
    assert spliced[1].json()["delta"]["text"] == "a time"  # the prefill's dropped space is not doubled


@pytest.mark.parametrize("api", [OPENAI_API, ANTHROPIC_API, RESPONSES_API])
def test_the_error_event_is_the_clients_apis_own(api):
    (event,) = events(relay.error_event(api, "broke", 7))
    body = event.json()
    if api == OPENAI_API:
        assert event.name == "" and body["error"]["code"] == "stream_broken"
    elif api == ANTHROPIC_API:
        assert event.name == "error" and body == {"type": "error", "error": {"type": "api_error", "message": "broke"}}
    else:
        assert event.name == "error" and body["type"] == "error" and body["sequence_number"] == 7


def test_the_next_backends_are_those_after_the_one_that_broke_first():
    def choice(provider: str, target: str = "t") -> SimpleNamespace:
        return SimpleNamespace(
            backend=SimpleNamespace(provider=SimpleNamespace(name=provider), model="m"), target=target
        )

    policy = SimpleNamespace(choices=[choice("a"), choice("b"), choice("c"), choice("d", target="")])
    assert [c.backend.provider.name for c in relay.next_choice(policy, "b", "m")] == ["c", "a"]
    assert [c.backend.provider.name for c in relay.next_choice(policy, "x", "m")] == ["a", "b", "c"]
