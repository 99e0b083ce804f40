"""OpenAI Responses (`POST /v1/responses`, the non-stateful subset) <-> Chat Completions.

Every backend speaks Chat Completions or Anthropic Messages, so a Responses client is always
translated: to chat here, and from chat on to Anthropic's API when the backend speaks that
(`Translation` composes the two). Written from the API reference; what needs the provider to
keep state (`previous_response_id`, `conversation`, `background`, stored prompts) is refused
with a 400 naming it, since a gateway that forwards each request to some backend has no
conversation to continue. `store` is accepted and ignored: nothing is stored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from signalbox.core.errors import MalformedRequest, UnsupportedFeature

from . import sse
from .fields import dict_or_empty as _dict
from .fields import require_array as _list
from .fields import require_str as _str

_STATEFUL = ("previous_response_id", "conversation", "background", "prompt")
_IGNORED = {
    "store",
    "include",
    "metadata",
    "service_tier",
    "truncation",
    "prompt_cache_key",
    "safety_identifier",
    "stream_options",
    "parallel_tool_calls",
    "reasoning",
    "max_tool_calls",
    "prompt_cache_retention",
}
_KNOWN = {
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "tools",
    "tool_choice",
    "text",
    "user",
    *_STATEFUL,
} | _IGNORED
_STATUS = {
    "stop": ("completed", None),
    "tool_calls": ("completed", None),
    "function_call": ("completed", None),
    "length": ("incomplete", "max_output_tokens"),
    "content_filter": ("incomplete", "content_filter"),
}


def request_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as a Chat Completions request."""
    for name in _STATEFUL:
        if body.get(name) not in (None, False):
            raise UnsupportedFeature(
                f"'{name}' needs state kept by the provider; this gateway sends each request on its own", param=name
            )
    extra = sorted(k for k in body if k not in _KNOWN)
    if extra:
        raise UnsupportedFeature(f"'{extra[0]}' cannot be translated for this backend's API", param=extra[0])
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": _str(body["instructions"], "instructions")})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for i, item in enumerate(items):
            _item(messages, item, f"input[{i}]")
    else:
        raise MalformedRequest("'input' must be a string or an array of input items", param="input")
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if isinstance(body.get("max_output_tokens"), int) and not isinstance(body["max_output_tokens"], bool):
        out["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "user"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    if body.get("tools"):
        out["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(_list(body["tools"], "tools"))]
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        out["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":
        out["tool_choice"] = {"type": "function", "function": {"name": _str(choice.get("name"), "tool_choice.name")}}
    elif choice is not None:
        raise UnsupportedFeature("'tool_choice' for built-in tools cannot be sent to this backend", param="tool_choice")
    fmt = _dict(_dict(body.get("text")).get("format"))
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        out["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt.get("type") == "json_object":
        out["response_format"] = {"type": "json_object"}
    return out


def _item(messages: list[dict[str, Any]], item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise MalformedRequest(f"'{where}' must be an object", param=where)
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise MalformedRequest(
                f"'{where}.role' must be user, assistant, system or developer", param=f"{where}.role"
            )
        messages.append({"role": role, "content": _content(item.get("content"), f"{where}.content", role)})
    elif kind == "function_call":
        call = {
            "id": _str(item.get("call_id"), f"{where}.call_id"),
            "type": "function",
            "function": {"name": _str(item.get("name"), f"{where}.name"), "arguments": item.get("arguments") or "{}"},
        }
        if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls") is not None:
            messages[-1]["tool_calls"].append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else json.dumps(output)
        messages.append(
            {"role": "tool", "tool_call_id": _str(item.get("call_id"), f"{where}.call_id"), "content": text}
        )
    elif kind == "reasoning":
        return  # another model's reasoning means nothing to this one
    else:
        raise UnsupportedFeature(f"'{where}' of type {kind!r} cannot be sent to this backend", param=where)


def _content(content: Any, where: str, role: str) -> Any:
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(_list(content, where)):
        part = _dict(part)
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": _str(part.get("text"), f"{where}[{i}].text")})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise UnsupportedFeature(f"'{where}[{i}]' of type {kind!r} cannot be sent to this backend", param=where)
    if role != "user":
        return "\n".join(p["text"] for p in parts if p["type"] == "text")
    return parts


def _tool(tool: Any, where: str) -> dict[str, Any]:
    tool = _dict(tool)
    if tool.get("type") != "function":
        raise UnsupportedFeature(
            f"'{where}', a built-in tool of type {tool.get('type')!r}, is not available here", param=where
        )
    function = {
        "name": _str(tool.get("name"), f"{where}.name"),
        "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
    }
    for name in ("description", "strict"):
        if tool.get(name) is not None:
            function[name] = tool[name]
    return {"type": "function", "function": function}


# --------------------------------------------------------------------------- answers


def _usage(usage: Any) -> dict[str, Any]:
    usage = _dict(usage)
    prompt = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else 0
    completion = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else 0
    cached = _dict(usage.get("prompt_tokens_details")).get("cached_tokens") or 0
    reasoning = _dict(usage.get("completion_tokens_details")).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def _response(
    rid: str, model: Any, output: list[dict[str, Any]], status: str, reason: str | None, usage: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": output,
        "usage": usage,
        "error": None,
        "incomplete_details": {"reason": reason} if reason else None,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }


def chat_to_response(body: dict[str, Any]) -> dict[str, Any]:
    """A chat completion as a Responses `response`."""
    choices = body.get("choices")
    choice = _dict(choices[0]) if isinstance(choices, list) and choices else {}
    message = _dict(choice.get("message"))
    output: list[dict[str, Any]] = []
    if isinstance(message.get("content"), str) and message["content"]:
        output.append(
            {
                "type": "message",
                "id": f"msg_{uuid.uuid4().hex}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": message["content"], "annotations": []}],
            }
        )
    for call in message.get("tool_calls") or []:
        function = _dict(_dict(call).get("function"))
        output.append(
            {
                "type": "function_call",
                "id": f"fc_{uuid.uuid4().hex}",
                "status": "completed",
                "call_id": _dict(call).get("id") or f"call_{uuid.uuid4().hex}",
                "name": function.get("name") or "",
                "arguments": function.get("arguments") or "",
            }
        )
    status, reason = _STATUS.get(choice.get("finish_reason") or "stop", ("completed", None))
    return _response(f"resp_{uuid.uuid4().hex}", body.get("model"), output, status, reason, _usage(body.get("usage")))


class ChatToResponsesStream:
    """Chat chunks as the Responses API's stream events (created, output items, text and
    argument deltas, completed), chunk by chunk."""

    def __init__(self) -> None:
        self.reader = sse.Reader()
        self.rid = f"resp_{uuid.uuid4().hex}"
        self.model: Any = None
        self.seq = 0
        self.started = self.done = False
        self.items: list[dict[str, Any]] = []  # output items, in order
        self.open: dict[str, Any] | None = None  # the item being written
        self.tools: dict[int, dict[str, Any]] = {}  # chat tool call index -> its item
        self.finish = "stop"
        self.usage: dict[str, Any] | None = None

    def _event(self, kind: str, **data: Any) -> bytes:
        self.seq += 1
        return sse.encode({"type": kind, "sequence_number": self.seq, **data}, kind)

    def feed(self, data: bytes) -> bytes:
        return b"".join(self._chunk(e) for e in self.reader.feed(data))

    def end(self) -> bytes:
        out = b"".join(self._chunk(e) for e in self.reader.close())
        if self.started and not self.done:
            out += self._complete()  # the provider stopped without [DONE]: end it cleanly
        return out

    def _snapshot(self, status: str) -> dict[str, Any]:
        final, reason = _STATUS.get(self.finish, ("completed", None))
        done = status != "in_progress"
        return _response(
            self.rid,
            self.model,
            self.items if done else [],
            final if done else status,
            reason if done else None,
            _usage(self.usage) if done else None,
        )

    def _close_item(self) -> bytes:
        item, self.open = self.open, None
        if item is None:
            return b""
        index = self.items.index(item)
        item["status"] = "completed"
        if item["type"] == "message":
            text = item["content"][0]["text"]
            out = self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            )
            out += self._event(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=item["content"][0],
            )
        else:
            out = self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=item["arguments"],
            )
        return out + self._event("response.output_item.done", output_index=index, item=item)

    def _open_item(self, item: dict[str, Any]) -> bytes:
        out = self._close_item()
        self.items.append(item)
        self.open = item
        index = len(self.items) - 1
        shown = {**item, "status": "in_progress"}
        if item["type"] == "message":
            shown["content"] = []
        else:
            shown["arguments"] = ""
        out += self._event("response.output_item.added", output_index=index, item=shown)
        if item["type"] == "message":
            out += self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": []},
            )
        return out

    def _complete(self) -> bytes:
        self.done = True
        out = self._close_item()
        snapshot = self._snapshot("completed")
        kind = "response.completed" if snapshot["status"] == "completed" else "response.incomplete"
        return out + self._event(kind, response=snapshot)

    def _chunk(self, event: sse.Event) -> bytes:
        if self.done:
            return b""
        if event.data.strip() == "[DONE]":
            return self._complete() if self.started else b""
        chunk = event.json()
        if not isinstance(chunk, dict):
            return b""
        if isinstance(chunk.get("error"), dict):
            self.done = True
            error = chunk["error"]
            return self._event("error", code=error.get("code"), message=str(error.get("message")), param=None)
        out = b""
        if not self.started:
            self.started = True
            self.model = chunk.get("model")
            out += self._event("response.created", response=self._snapshot("in_progress"))
            out += self._event("response.in_progress", response=self._snapshot("in_progress"))
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        choice = _dict(choices[0]) if isinstance(choices, list) and choices else {}
        delta = _dict(choice.get("delta"))
        text = delta.get("content")
        if isinstance(text, str) and text:
            if self.open is None or self.open["type"] != "message":
                out += self._open_item(
                    {
                        "type": "message",
                        "id": f"msg_{uuid.uuid4().hex}",
                        "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "", "annotations": []}],
                    }
                )
            assert self.open is not None
            self.open["content"][0]["text"] += text
            out += self._event(
                "response.output_text.delta",
                item_id=self.open["id"],
                output_index=len(self.items) - 1,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        for call in delta.get("tool_calls") or []:
            call = _dict(call)
            raw_index = call.get("index")
            index = raw_index if isinstance(raw_index, int) else 0
            function = _dict(call.get("function"))
            if index not in self.tools:
                item = {
                    "type": "function_call",
                    "id": f"fc_{uuid.uuid4().hex}",
                    "status": "completed",
                    "call_id": call.get("id") or f"call_{uuid.uuid4().hex}",
                    "name": function.get("name") or "",
                    "arguments": "",
                }
                self.tools[index] = item
                out += self._open_item(item)
            item = self.tools[index]
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments and item is self.open:
                item["arguments"] += arguments
                out += self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self.items.index(item),
                    delta=arguments,
                )
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]
        return out
