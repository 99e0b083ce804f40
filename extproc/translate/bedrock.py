"""OpenAI Chat Completions <-> AWS Bedrock's Converse API (`Converse`, `ConverseStream`),
written from the API reference and held to botocore's service model by the fake provider.

Bedrock names the model in the path (attempt.lua writes `/model/<id>/converse`), streams on
another operation (`stream_path`) and streams in AWS's binary event stream
(`application/vnd.amazon.eventstream`), not server-sent events: frames are decoded with
botocore's own `EventStreamBuffer` (lengths and CRCs checked) and each event leaves as a
chat.completion.chunk as soon as its frame is whole. Envoy signs the request (SigV4) after this
translation, so the signature covers the body sent.
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from typing import Any
from urllib.parse import unquote

from signalbox.core.errors import MalformedRequest, UnsupportedFeature

from . import sse
from .fields import (
    append_turn,
    call_arguments,
    chat_chunk,
    chat_messages,
    chat_usage,
    content_items,
    function_of,
    int_or_zero,
)
from .fields import dict_or_empty as _dict
from .fields import require_str as _str

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
    # The model's output could not be parsed: what came of it ends the answer as it is.
    "malformed_model_output": "stop",
    "malformed_tool_use": "stop",
}
_IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}


def stream_path(path: str) -> str:
    """ConverseStream's path for attempt.lua's `<base>/model/<id>/converse`."""
    bare, sep, query = path.partition("?")
    if bare.endswith("/converse"):
        bare += "-stream"
    return bare + sep + query


def model_of(path: str) -> str | None:
    """The model ID a Converse path names (what the client is told answered)."""
    parts = path.partition("?")[0].split("/")
    if len(parts) >= 3 and parts[-1] in ("converse", "converse-stream") and parts[-3] == "model":
        return unquote(parts[-2])
    return None


def chat_to_converse(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI Chat Completions request as a Converse request body (the model is in the path)."""
    messages = chat_messages(body)
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    used_tools = False
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise MalformedRequest(f"'{where}' must be an object", param=where)
        role = message.get("role")
        if role in ("system", "developer"):
            system.extend(_blocks(message.get("content"), f"{where}.content", images=False))
        elif role == "user":
            append_turn(turns, "user", _blocks(message.get("content"), f"{where}.content", images=True), "content")
        elif role == "assistant":
            blocks = _blocks(message.get("content"), f"{where}.content", images=False)
            for j, call in enumerate(message.get("tool_calls") or []):
                at = f"{where}.tool_calls[{j}]"
                function = _dict(_dict(call).get("function"))
                blocks.append(
                    {
                        "toolUse": {
                            "toolUseId": _str(_dict(call).get("id"), f"{at}.id"),
                            "name": _str(function.get("name"), f"{at}.function.name"),
                            "input": call_arguments(function.get("arguments"), at),
                        }
                    }
                )
                used_tools = True
            append_turn(turns, "assistant", blocks, "content")
        elif role == "tool":
            call_id = _str(message.get("tool_call_id"), f"{where}.tool_call_id")
            text = "".join(b.get("text", "") for b in _blocks(message.get("content"), f"{where}.content", images=False))
            append_turn(turns, "user", [{"toolResult": {"toolUseId": call_id, "content": [{"text": text}]}}], "content")
            used_tools = True
        else:
            raise MalformedRequest(f"'{where}.role' {role!r} is not a chat role", param=f"{where}.role")
    out: dict[str, Any] = {"messages": turns}
    if system:
        out["system"] = system
    config: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0:
        config["maxTokens"] = max_tokens
    for name, key in (("temperature", "temperature"), ("top_p", "topP")):
        value = body.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            config[key] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        config["stopSequences"] = [stop]
    elif isinstance(stop, list):
        config["stopSequences"] = [_str(s, "stop") for s in stop]
    if config:
        out["inferenceConfig"] = config
    output = _output_config(body.get("response_format"))
    if output:
        out["outputConfig"] = output
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools and (choice != "none" or used_tools):
        if not isinstance(tools, list):
            raise MalformedRequest("'tools' must be an array", param="tools")
        tool_config: dict[str, Any] = {"tools": [_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]}
        if choice not in (None, "none"):
            tool_config["toolChoice"] = _choice(choice)
        out["toolConfig"] = tool_config
    return out


def _blocks(content: Any, where: str, images: bool) -> list[dict[str, Any]]:
    return content_items(content, where, _image if images else None)


def _image(mime: str, data: str) -> dict[str, Any]:
    if mime.lower() not in _IMAGE_FORMATS:
        raise UnsupportedFeature(f"images of type {mime!r} cannot be sent to this backend", param="image_url")
    # The JSON wire form of a blob is its base64 text, as the data URL already holds it.
    return {"image": {"format": _IMAGE_FORMATS[mime.lower()], "source": {"bytes": data}}}


def _tool(tool: Any, where: str) -> dict[str, Any]:
    function = function_of(tool, where)
    spec: dict[str, Any] = {"name": _str(function.get("name"), f"{where}.function.name")}
    if isinstance(function.get("description"), str) and function["description"]:
        spec["description"] = function["description"]
    parameters = function.get("parameters")
    spec["inputSchema"] = {"json": parameters if isinstance(parameters, dict) else {"type": "object"}}
    return {"toolSpec": spec}


def _choice(choice: Any) -> dict[str, Any]:
    if choice == "auto":
        return {"auto": {}}
    if choice == "required":
        return {"any": {}}
    if isinstance(choice, dict) and isinstance(_dict(choice.get("function")).get("name"), str):
        return {"tool": {"name": choice["function"]["name"]}}
    raise MalformedRequest("'tool_choice' must be auto, required, none or a function", param="tool_choice")


def _output_config(fmt: Any) -> dict[str, Any] | None:
    """`response_format` as Converse's structured output (a JSON schema, given as text)."""
    fmt = _dict(fmt)
    if fmt.get("type") == "json_object":
        schema: Any = {"type": "object"}
        name = "json_output"
    elif fmt.get("type") == "json_schema":
        spec = _dict(fmt.get("json_schema"))
        schema = spec.get("schema") if isinstance(spec.get("schema"), dict) else {"type": "object"}
        given = spec.get("name")
        name = given if isinstance(given, str) and given else "json_output"
    else:
        return None
    structure = {"jsonSchema": {"schema": json.dumps(schema, separators=(",", ":")), "name": name}}
    return {"textFormat": {"type": "json_schema", "structure": structure}}


# --------------------------------------------------------------------------- answers


def _usage(usage: Any) -> dict[str, Any]:
    """Converse's TokenUsage as OpenAI's: its input excludes the cached part, OpenAI's includes it."""
    usage = _dict(usage)
    cached, written = int_or_zero(usage.get("cacheReadInputTokens")), int_or_zero(usage.get("cacheWriteInputTokens"))
    prompt = int_or_zero(usage.get("inputTokens")) + cached + written
    return chat_usage(prompt, int_or_zero(usage.get("outputTokens")), cached)


def _call(use: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": use.get("toolUseId") if isinstance(use.get("toolUseId"), str) else f"call_{uuid.uuid4().hex}",
        "type": "function",
        "function": {
            "name": use.get("name"),
            "arguments": json.dumps(use.get("input") if use.get("input") is not None else {}, separators=(",", ":")),
        },
    }


def is_answer(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("output"), dict)


def converse_to_chat(body: dict[str, Any], model: str | None) -> dict[str, Any]:
    """A Converse response as an OpenAI chat completion (Converse names no model: the caller
    gives the one from the path)."""
    texts, calls = [], []
    for block in _dict(_dict(body["output"]).get("message")).get("content") or []:
        block = _dict(block)
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif isinstance(block.get("toolUse"), dict):
            calls.append(_call(block["toolUse"]))
    text = "".join(texts)
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    finish = "tool_calls" if calls else _FINISH.get(str(body.get("stopReason")), "stop")
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _usage(body.get("usage")),
    }


def error_to_chat(body: Any, kind: str = "api_error") -> dict[str, Any]:
    """Bedrock's error body (`{"message": ...}`; its type is in a header the translation does not
    see) as OpenAI's error shape."""
    message = _dict(body).get("message") or _dict(body).get("Message")
    if not isinstance(message, str):
        message = body if isinstance(body, str) else json.dumps(body)
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


def is_error(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("message") or body.get("Message"), str)


class ConverseToChatStream:
    """ConverseStream's binary event stream as chat.completion.chunk events, frame by frame."""

    def __init__(self, model: str | None) -> None:
        # Imported here: botocore's modules weigh 3.2 MB, which every ext_proc worker would
        # carry whether or not a provider is Bedrock.
        from botocore.eventstream import EventStreamBuffer

        self.frames = EventStreamBuffer()
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.started = self.done = self.finished = False
        self.tool_index: dict[int, int] = {}  # contentBlockIndex -> tool_calls index
        self.finish: str | None = None

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> bytes:
        return chat_chunk(self.id, self.created, self.model, delta, finish, usage)

    def feed(self, data: bytes) -> bytes:
        if self.done or not data:
            return b""
        from botocore.eventstream import ParserError  # imported by __init__ already

        self.frames.add_data(data)
        out = b""
        try:
            for frame in self.frames:
                out += self._frame(frame.headers, frame.payload)
                if self.done:
                    break
        except (ParserError, ValueError, KeyError, IndexError, struct.error):
            # A frame whose length, checksum or headers are wrong: nothing after it can be trusted.
            self.done = True
            out += sse.encode(error_to_chat({"message": "the provider sent a malformed event stream"}))
        return out

    def end(self) -> bytes:
        if not self.started or self.done:
            return b""
        return self._close({})

    def _close(self, usage: Any) -> bytes:
        self.done = True
        out = b"" if self.finished else self._chunk({}, finish=self.finish or "stop")
        return out + self._chunk(None, usage=_usage(usage)) + sse.encode("[DONE]")

    def _start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return self._chunk({"role": "assistant", "content": ""})

    def _frame(self, headers: dict[str, Any], payload: bytes) -> bytes:
        try:
            body = _dict(json.loads(payload)) if payload else {}
        except ValueError:
            return b""  # a malformed event is dropped, the stream goes on
        kind = headers.get(":message-type")
        if kind in ("exception", "error"):
            self.done = True
            name = headers.get(":exception-type") or headers.get(":error-code") or "api_error"
            return sse.encode(error_to_chat(body, str(name)))
        event = headers.get(":event-type")
        out = self._start()
        if event == "contentBlockStart":
            use = _dict(_dict(body.get("start")).get("toolUse"))
            if use:
                index = len(self.tool_index)
                self.tool_index[int_or_zero(body.get("contentBlockIndex"))] = index
                call = _call({**use, "input": None})
                call["function"]["arguments"] = ""
                out += self._chunk({"tool_calls": [{"index": index, **call}]})
        elif event == "contentBlockDelta":
            delta = _dict(body.get("delta"))
            if isinstance(delta.get("text"), str) and delta["text"]:
                out += self._chunk({"content": delta["text"]})
            elif isinstance(_dict(delta.get("toolUse")).get("input"), str):
                call_index = self.tool_index.get(int_or_zero(body.get("contentBlockIndex")))
                if call_index is not None:
                    piece = {"index": call_index, "function": {"arguments": delta["toolUse"]["input"]}}
                    out += self._chunk({"tool_calls": [piece]})
        elif event == "messageStop":
            self.finish = "tool_calls" if self.tool_index else _FINISH.get(str(body.get("stopReason")), "stop")
            self.finished = True
            out += self._chunk({}, finish=self.finish)
        elif event == "metadata":
            out += self._close(body.get("usage"))
        return out
