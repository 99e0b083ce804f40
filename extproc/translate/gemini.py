"""OpenAI Chat Completions <-> Google's Gemini API (`generateContent`, `streamGenerateContent`
with `alt=sse`), written from the API reference.

Gemini names the model in the path, not the body (attempt.lua writes it there), and streams on
another method (`stream_path`: the upstream phase rewrites the attempt's path for a stream).
A tool result names its function in Gemini and only its call id in OpenAI's API: the name is
found in the assistant turn that made the call.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from signalbox.core.errors import MalformedRequest

from . import sse
from .anthropic import error_to_chat
from .fields import append_turn, call_arguments, chat_chunk, chat_messages, chat_usage, content_items, function_of
from .fields import dict_or_empty as _dict
from .fields import require_str as _str

# Gemini's finishReason -> chat's finish_reason (google-genai's `types.FinishReason`): whatever
# a filter stopped is content_filter, a token limit is length, the rest stop.
_FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    # Stopped at the per-request token limit, to be continued: what chat calls length.
    "CONTINUATION": "length",
    **dict.fromkeys(
        (
            "SAFETY",
            "RECITATION",
            "BLOCKLIST",
            "PROHIBITED_CONTENT",
            "SPII",
            "IMAGE_SAFETY",
            "IMAGE_PROHIBITED_CONTENT",
            "IMAGE_RECITATION",
            "MODEL_ARMOR",
            "ESCALATION",
        ),
        "content_filter",
    ),
}


def _append_parts(turns: list[dict[str, Any]], role: str, items: list[dict[str, Any]]) -> None:
    append_turn(turns, role, items, "parts")


def stream_path(path: str) -> str:
    """The streaming method's path for attempt.lua's `<base>/models/<model>:generateContent`."""
    bare, _, query = path.partition("?")
    bare = bare.replace(":generateContent", ":streamGenerateContent", 1)
    return f"{bare}?{query}&alt=sse" if query else f"{bare}?alt=sse"


def chat_to_gemini(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI Chat Completions request as a Gemini `GenerateContentRequest`."""
    messages = chat_messages(body)
    names: dict[str, str] = {}  # tool call id -> function name, from the assistant turns
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise MalformedRequest(f"'{where}' must be an object", param=where)
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_parts(message.get("content"), f"{where}.content", images=False))
        elif role == "user":
            _append_parts(contents, "user", _parts(message.get("content"), f"{where}.content", images=True))
        elif role == "assistant":
            parts = _parts(message.get("content"), f"{where}.content", images=False)
            for j, call in enumerate(message.get("tool_calls") or []):
                at = f"{where}.tool_calls[{j}]"
                function = _dict(_dict(call).get("function"))
                name = _str(function.get("name"), f"{at}.function.name")
                names[str(_dict(call).get("id"))] = name
                parts.append({"functionCall": {"name": name, "args": call_arguments(function.get("arguments"), at)}})
            _append_parts(contents, "model", parts)
        elif role == "tool":
            call_id = _str(message.get("tool_call_id"), f"{where}.tool_call_id")
            if call_id not in names:
                raise MalformedRequest(
                    f"'{where}.tool_call_id' names no earlier tool call", param=f"{where}.tool_call_id"
                )
            text = "".join(p.get("text", "") for p in _parts(message.get("content"), f"{where}.content", images=False))
            _append_parts(
                contents, "user", [{"functionResponse": {"name": names[call_id], "response": {"content": text}}}]
            )
        else:
            raise MalformedRequest(f"'{where}.role' {role!r} is not a chat role", param=f"{where}.role")
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    config: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        config["maxOutputTokens"] = max_tokens
    for name, key in (("temperature", "temperature"), ("top_p", "topP")):
        if isinstance(body.get(name), int | float) and not isinstance(body.get(name), bool):
            config[key] = body[name]
    stop = body.get("stop")
    if isinstance(stop, str):
        config["stopSequences"] = [stop]
    elif isinstance(stop, list):
        config["stopSequences"] = [_str(s, "stop") for s in stop]
    fmt = _dict(body.get("response_format"))
    if fmt.get("type") == "json_object":
        config["responseMimeType"] = "application/json"
    elif fmt.get("type") == "json_schema":
        config["responseMimeType"] = "application/json"
        schema = _dict(fmt.get("json_schema")).get("schema")
        if isinstance(schema, dict):
            config["responseJsonSchema"] = schema
    if config:
        out["generationConfig"] = config
    if body.get("tools"):
        tools = body["tools"]
        if not isinstance(tools, list):
            raise MalformedRequest("'tools' must be an array", param="tools")
        out["tools"] = [{"functionDeclarations": [_declaration(t, f"tools[{i}]") for i, t in enumerate(tools)]}]
    choice = body.get("tool_choice")
    if choice is not None:
        out["toolConfig"] = {"functionCallingConfig": _calling(choice)}
    return out


def _parts(content: Any, where: str, images: bool) -> list[dict[str, Any]]:
    return content_items(content, where, _inline if images else None)


def _inline(mime: str, data: str) -> dict[str, Any]:
    return {"inlineData": {"mimeType": mime, "data": data}}


def _declaration(tool: Any, where: str) -> dict[str, Any]:
    function = function_of(tool, where)
    out: dict[str, Any] = {"name": _str(function.get("name"), f"{where}.function.name")}
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    if isinstance(function.get("parameters"), dict):
        out["parametersJsonSchema"] = function["parameters"]
    return out


def _calling(choice: Any) -> dict[str, Any]:
    if choice in ("auto", "none"):
        return {"mode": str(choice).upper()}
    if choice == "required":
        return {"mode": "ANY"}
    if isinstance(choice, dict) and isinstance(_dict(choice.get("function")).get("name"), str):
        return {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}
    raise MalformedRequest("'tool_choice' must be auto, required, none or a function", param="tool_choice")


# --------------------------------------------------------------------------- answers


def _usage(meta: Any) -> dict[str, Any]:
    meta = _dict(meta)
    prompt = meta.get("promptTokenCount") if isinstance(meta.get("promptTokenCount"), int) else 0
    completion = meta.get("candidatesTokenCount") if isinstance(meta.get("candidatesTokenCount"), int) else 0
    thoughts = meta.get("thoughtsTokenCount") if isinstance(meta.get("thoughtsTokenCount"), int) else 0
    cached = meta.get("cachedContentTokenCount") if isinstance(meta.get("cachedContentTokenCount"), int) else 0
    return chat_usage(prompt, completion + thoughts, cached, reasoning=thoughts)


def _candidate(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]], str | None]:
    """The first candidate's text, function calls and finish reason."""
    candidates = body.get("candidates")
    candidate = _dict(candidates[0]) if isinstance(candidates, list) and candidates else {}
    texts, calls = [], []
    for part in _dict(candidate.get("content")).get("parts") or []:
        part = _dict(part)
        if isinstance(part.get("text"), str) and not part.get("thought"):
            texts.append(part["text"])
        elif isinstance(part.get("functionCall"), dict):
            call = part["functionCall"]
            calls.append(
                {
                    "id": call.get("id") or f"call_{uuid.uuid4().hex}",
                    "type": "function",
                    "function": {
                        "name": call.get("name"),
                        "arguments": json.dumps(call.get("args") or {}, separators=(",", ":")),
                    },
                }
            )
    reason = candidate.get("finishReason")
    finish = None if not reason else ("tool_calls" if calls else _FINISH.get(reason, "stop"))
    return "".join(texts), calls, finish


def gemini_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Gemini `GenerateContentResponse` as an OpenAI chat completion."""
    text, calls, finish = _candidate(body)
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": body.get("responseId") or f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("modelVersion"),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish or "stop"}],
        "usage": _usage(body.get("usageMetadata")),
    }


def is_answer(body: Any) -> bool:
    return isinstance(body, dict) and ("candidates" in body or "usageMetadata" in body)


class GeminiToChatStream:
    """Gemini's streamed `GenerateContentResponse` events as chat.completion.chunk events."""

    def __init__(self) -> None:
        self.reader = sse.Reader()
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), None
        self.started = self.done = False
        self.calls = 0
        self.usage: dict[str, Any] | None = None
        self.finish: str | None = None

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> bytes:
        return chat_chunk(self.id, self.created, self.model, delta, finish, usage)

    def feed(self, data: bytes) -> bytes:
        return b"".join(self._event(e) for e in self.reader.feed(data))

    def end(self) -> bytes:
        out = b"".join(self._event(e) for e in self.reader.close())
        if self.started and not self.done:
            self.done = True
            out += self._chunk({}, finish=self.finish or "stop") + self._chunk(None, usage=self.usage or _usage({}))
            out += sse.encode("[DONE]")
        return out

    def _event(self, event: sse.Event) -> bytes:
        body = event.json()
        if not isinstance(body, dict) or self.done:
            return b""
        if isinstance(body.get("error"), dict):
            self.done = True
            return sse.encode(error_to_chat(body))
        out = b""
        if not self.started:
            self.started = True
            self.id = body.get("responseId") or self.id
            self.model = body.get("modelVersion")
            out += self._chunk({"role": "assistant", "content": ""})
        text, calls, finish = _candidate(body)
        if text:
            out += self._chunk({"content": text})
        for call in calls:
            out += self._chunk({"tool_calls": [{"index": self.calls, **call}]})
            self.calls += 1
        if "usageMetadata" in body:
            self.usage = _usage(body["usageMetadata"])
        if finish:
            self.finish = "tool_calls" if self.calls else finish
        return out
