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

from signalbox.core.envoygen.contract import ANTHROPIC_VERSION
from signalbox.core.errors import ANTHROPIC_API, OPENAI_API, MalformedRequest

from . import anthropic

APIS = (OPENAI_API, ANTHROPIC_API)
# The path each API family's generation endpoint has below a provider's base URL.
API_PATHS = {OPENAI_API: "/chat/completions", ANTHROPIC_API: "/messages"}


class StreamTranslator(Protocol):
    def feed(self, data: bytes) -> bytes: ...

    def end(self) -> bytes: ...


def parse_route(value: str) -> tuple[str, str] | None:
    """The marker attempt.lua sets ("anthropic>openai") as (client api, backend api)."""
    src, sep, dst = value.partition(">")
    if not sep or src not in APIS or dst not in APIS or src == dst:
        return None
    return src, dst


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise MalformedRequest("request body is not valid JSON") from None
    except RecursionError:
        raise MalformedRequest("request body is nested too deeply") from None


def _dump(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


class Translation:
    """One attempt's translation from the client's API (`src`) to the backend's (`dst`)."""

    def __init__(self, src: str, dst: str):
        self.src, self.dst = src, dst

    def request(self, raw: bytes) -> bytes:
        """The client's request body in the backend's API; MalformedRequest or UnsupportedFeature."""
        body = _json(raw)
        if not isinstance(body, dict):
            raise MalformedRequest("request body must be a JSON object")
        if self.dst == ANTHROPIC_API:
            return _dump(anthropic.chat_to_messages(body))
        return _dump(anthropic.messages_to_chat(body))

    def answer(self, raw: bytes) -> bytes:
        """A whole (non-streamed) answer or error of the backend in the client's API. The
        status is not known here (the translation sees bodies only; Envoy passes the status on
        as it is): an error is known by its shape, anything not an answer is one."""
        try:
            body: Any = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError):
            body = raw.decode("utf-8", "replace")
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
        if self.src == OPENAI_API:
            return anthropic.MessagesToChatStream()
        return anthropic.ChatToMessagesStream()

    def request_headers(self) -> list[tuple[str, str]]:
        """Headers the backend's API needs that the client's does not send."""
        if self.dst == ANTHROPIC_API:
            return [("anthropic-version", ANTHROPIC_VERSION)]
        return []
