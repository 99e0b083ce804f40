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

from signalbox.core.envoygen.contract import NO_USAGE_ROUTE
from signalbox.core.errors import (
    ANTHROPIC_API,
    BEDROCK_API,
    GEMINI_API,
    OPENAI_API,
    RESPONSES_API,
    MalformedRequest,
)

from . import anthropic, bedrock, gemini, responses

# What clients speak, and what backends speak (chat, Anthropic's Messages, Gemini's API or
# Bedrock's Converse).
APIS = (OPENAI_API, ANTHROPIC_API, RESPONSES_API)
BACKEND_APIS = (OPENAI_API, ANTHROPIC_API, GEMINI_API, BEDROCK_API)


class StreamTranslator(Protocol):
    def feed(self, data: bytes) -> bytes: ...

    def end(self) -> bytes: ...


def parse_route(value: str) -> tuple[str, str, bool] | None:
    """The marker attempt.lua sets ("anthropic>openai", NO_USAGE_ROUTE after it when the backend
    refuses `stream_options`) as (client api, backend api, whether to ask for stream usage)."""
    route = value.removesuffix(NO_USAGE_ROUTE)
    src, sep, dst = route.partition(">")
    if not sep or src not in APIS or dst not in BACKEND_APIS or src == dst:
        return None
    return src, dst, route == value


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
    """Stream translators in a row, each one's output fed to the next (e.g. Gemini -> chat ->
    Anthropic): each event still leaves as soon as it arrives."""

    def __init__(self, *steps: StreamTranslator):
        self.steps = steps

    def feed(self, data: bytes) -> bytes:
        for step in self.steps:
            data = step.feed(data)
        return data

    def end(self) -> bytes:
        data = b""
        for step in self.steps:
            data = step.feed(data) + step.end()
        return data


def _chat_answer(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("choices"), list)


class Translation:
    """One attempt's translation from the client's API (`src`) to the backend's (`dst`), through
    Chat Completions: a client API other than chat is read into chat, and chat is written in the
    backend's API when that is not chat. So every pair works with one reader and one writer per
    API, and nothing is translated twice where one step suffices."""

    def __init__(self, src: str, dst: str, stream_usage: bool = True):
        """`stream_usage`: an OpenAI backend's streams are asked for their usage (false: the
        backend refuses `stream_options`, and is sent none)."""
        self.src, self.dst, self.stream_usage = src, dst, stream_usage
        self.streaming = False  # set by request(): whether the client asked for a stream
        # Set by request(): JSON output asked of an Anthropic backend (a forced tool carries it).
        self.json_output = False
        # The model the attempt's path names, for APIs whose answers do not (Bedrock's).
        self.path_model: str | None = None

    def request(self, raw: bytes) -> bytes:
        """The client's request body in the backend's API; MalformedRequest or UnsupportedFeature."""
        body = _json(raw)
        if not isinstance(body, dict):
            raise MalformedRequest("request body must be a JSON object")
        if self.src == ANTHROPIC_API:
            chat = anthropic.messages_to_chat(body)
        elif self.src == RESPONSES_API:
            chat = responses.request_to_chat(body)
        else:
            chat = body
        self.streaming = chat.get("stream") is True
        if not self.stream_usage:
            chat.pop("stream_options", None)
        self.json_output = self.dst == ANTHROPIC_API and anthropic.wants_json(chat)
        if self.dst == ANTHROPIC_API:
            return _dump(anthropic.chat_to_messages(chat))
        if self.dst == GEMINI_API:
            return _dump(gemini.chat_to_gemini(chat))
        if self.dst == BEDROCK_API:
            return _dump(bedrock.chat_to_converse(chat))
        return _dump(chat)

    def answer(self, raw: bytes) -> bytes:
        """A whole (non-streamed) answer or error of the backend in the client's API. The
        status is not known here (the translation sees bodies only; Envoy passes the status on
        as it is): an error is known by its shape, anything not an answer is one."""
        body = _loose(raw)
        chat: Any
        if self.dst == ANTHROPIC_API:
            is_message = isinstance(body, dict) and body.get("type") == "message"
            chat = anthropic.message_to_chat(body, self.json_output) if is_message else None
        elif self.dst == GEMINI_API:
            chat = gemini.gemini_to_chat(body) if gemini.is_answer(body) else None
        elif self.dst == BEDROCK_API:
            chat = bedrock.converse_to_chat(body, self.path_model) if bedrock.is_answer(body) else None
            if chat is None and bedrock.is_error(body):
                body = bedrock.error_to_chat(body)
        else:
            chat = body if _chat_answer(body) else None
        if chat is None:  # an error, in OpenAI's shape first
            error = anthropic.error_to_chat(body)
            return _dump(anthropic.error_to_messages(error) if self.src == ANTHROPIC_API else error)
        if self.src == ANTHROPIC_API:
            return _dump(anthropic.chat_to_message(chat))
        if self.src == RESPONSES_API:
            return _dump(responses.chat_to_response(chat))
        return _dump(chat)

    def is_stream(self, first_chunk: bytes) -> bool:
        """Whether an answer is a stream, from its first bytes (a JSON answer or error starts with
        `{`; server-sent events with a field name or a comment; Bedrock's binary event stream
        with its first frame's length, when a stream was asked for)."""
        head = first_chunk.lstrip(b"\xef\xbb\xbf \t\r\n")[:6]
        if self.dst == BEDROCK_API:
            return self.streaming and not head.startswith(b"{")
        return head.startswith((b"data:", b"event:", b":", b"id:", b"retry:"))

    def stream(self) -> StreamTranslator:
        steps: list[StreamTranslator] = []
        if self.dst == ANTHROPIC_API:
            steps.append(anthropic.MessagesToChatStream(self.json_output))
        elif self.dst == GEMINI_API:
            steps.append(gemini.GeminiToChatStream())
        elif self.dst == BEDROCK_API:
            steps.append(bedrock.ConverseToChatStream(self.path_model))
        if self.src == ANTHROPIC_API:
            steps.append(anthropic.ChatToMessagesStream())
        elif self.src == RESPONSES_API:
            steps.append(responses.ChatToResponsesStream())
        return steps[0] if len(steps) == 1 else _Chained(*steps)
