"""Translation between API families for one upstream attempt (pure: no gRPC, no Envoy).

A client speaks one API (the path it called: OpenAI Chat Completions or Anthropic Messages);
each backend of a chain speaks its provider's. When they differ, attempt.lua marks the attempt
(TRANSLATE_HEADER, "<client api>><backend api>") and the upstream-phase ext_proc
(`signalbox.extproc.upstream`) runs a `Translation` on it: the request on the way out, the
answer, error or stream on the way back, so the client always gets the API it called. Attempts
whose APIs match never reach Python.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from signalbox.core.errors import ANTHROPIC_API, OPENAI_API, RESPONSES_API, MalformedRequest

from . import anthropic, responses

# What clients speak, and what backends speak (every backend: chat or Anthropic's Messages).
APIS = (OPENAI_API, ANTHROPIC_API, RESPONSES_API)
BACKEND_APIS = (OPENAI_API, ANTHROPIC_API)
# The path each API family's generation endpoint has below a provider's base URL.
API_PATHS = {OPENAI_API: "/chat/completions", ANTHROPIC_API: "/messages"}


class StreamTranslator(Protocol):
    def feed(self, data: bytes) -> bytes: ...

    def end(self) -> bytes: ...


def parse_route(value: str) -> tuple[str, str] | None:
    """The marker attempt.lua sets ("anthropic>openai") as (client api, backend api)."""
    src, sep, dst = value.partition(">")
    if not sep or src not in APIS or dst not in BACKEND_APIS or src == dst:
        return None
    return src, dst


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise MalformedRequest("request body is not valid JSON") from None
    except RecursionError:
        raise MalformedRequest("request body is nested too deeply") from None


def _loose(raw: bytes) -> Any:
    """A provider's body as JSON, or as text when it is not JSON."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return raw.decode("utf-8", "replace")


def _dump(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


class _Chained:
    """Two stream translators, the first's output fed to the second (Responses <- chat <-
    Anthropic): each event still leaves as soon as it arrives."""

    def __init__(self, first: StreamTranslator, second: StreamTranslator):
        self.first, self.second = first, second

    def feed(self, data: bytes) -> bytes:
        return self.second.feed(self.first.feed(data))

    def end(self) -> bytes:
        return self.second.feed(self.first.end()) + self.second.end()


class Translation:
    """One attempt's translation from the client's API (`src`) to the backend's (`dst`).
    Responses clients go through chat: to Anthropic's API in two steps, each way."""

    def __init__(self, src: str, dst: str):
        self.src, self.dst = src, dst
        # Responses -> Anthropic: the chat <-> Anthropic step under the Responses one.
        self.inner = Translation(OPENAI_API, dst) if src == RESPONSES_API and dst != OPENAI_API else None

    def request(self, raw: bytes) -> bytes:
        """The client's request body in the backend's API; MalformedRequest or UnsupportedFeature."""
        body = _json(raw)
        if not isinstance(body, dict):
            raise MalformedRequest("request body must be a JSON object")
        if self.src == RESPONSES_API:
            chat = responses.request_to_chat(body)
            return self.inner.request(_dump(chat)) if self.inner else _dump(chat)
        if self.dst == ANTHROPIC_API:
            return _dump(anthropic.chat_to_messages(body))
        return _dump(anthropic.messages_to_chat(body))

    def answer(self, raw: bytes) -> bytes:
        """A whole (non-streamed) answer or error of the backend in the client's API. The
        status is not known here (the translation sees bodies only; Envoy passes the status on
        as it is): an error is known by its shape, anything not an answer is one."""
        if self.src == RESPONSES_API:
            chat = _loose(self.inner.answer(raw) if self.inner else raw)
            if isinstance(chat, dict) and isinstance(chat.get("choices"), list):
                return _dump(responses.chat_to_response(chat))
            return _dump(anthropic.error_to_chat(chat))
        body = _loose(raw)
        if self.src == OPENAI_API:
            if isinstance(body, dict) and body.get("type") == "message":
                return _dump(anthropic.message_to_chat(body))
            return _dump(anthropic.error_to_chat(body))
        if isinstance(body, dict) and isinstance(body.get("choices"), list):
            return _dump(anthropic.chat_to_message(body))
        return _dump(anthropic.error_to_messages(body))

    @staticmethod
    def is_stream(first_chunk: bytes) -> bool:
        """Whether an answer is server-sent events, from its first bytes (a JSON answer or error
        starts with `{`; an event with a field name or a comment)."""
        head = first_chunk.lstrip(b"\xef\xbb\xbf \t\r\n")[:6]
        return head.startswith((b"data:", b"event:", b":", b"id:", b"retry:"))

    def stream(self) -> StreamTranslator:
        if self.src == RESPONSES_API:
            outer = responses.ChatToResponsesStream()
            return _Chained(self.inner.stream(), outer) if self.inner else outer
        if self.src == OPENAI_API:
            return anthropic.MessagesToChatStream()
        return anthropic.ChatToMessagesStream()
