"""OpenAI Chat Completions <-> Anthropic Messages: requests, answers, errors and streams.

Written from the two public API references. Each function takes a parsed body the client or
the provider sent (untrusted: any JSON) and returns the other API's body, or raises
`MalformedRequest` (the client's body is wrong) or `UnsupportedFeature` (it is right, but the
other API cannot say it; the gateway then tries the next backend of the chain).

What is dropped rather than refused, because it only tunes an answer: OpenAI's `seed`,
penalties, `logit_bias`, `service_tier`, `store`, `metadata`, `reasoning_effort`; Anthropic's
`top_k`, `thinking` (the fallback answers without visible reasoning) and cache-control marks.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Set
from typing import Any

from signalbox.core.errors import MalformedRequest, UnsupportedFeature, anthropic_error_type

from . import sse
from .fields import CHAT_FIELDS, append_turn, chat_chunk, chat_usage
from .fields import dict_or_empty as _dict
from .fields import int_or_zero as _int
from .fields import require_array as _list
from .fields import require_object as _obj
from .fields import require_str as _str

# Anthropic requires max_tokens; an OpenAI request that sets none gets this.
DEFAULT_MAX_TOKENS = 4096

# stop reasons, both ways (a reason not listed maps to the plain end of turn).
_FINISH_TO_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_STOP_TO_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
    # The model's context window filled up: the answer is cut, as with max_tokens.
    "model_context_window_exceeded": "length",
}

_CHAT_KNOWN = CHAT_FIELDS
_MESSAGES_IGNORED = {"top_k", "thinking", "service_tier", "container", "mcp_servers"}
_MESSAGES_KNOWN = {
    "model",
    "messages",
    "system",
    "max_tokens",
    "temperature",
    "top_p",
    "stop_sequences",
    "stream",
    "metadata",
    "tools",
    "tool_choice",
} | _MESSAGES_IGNORED


def _append_content(turns: list[dict[str, Any]], role: str, items: list[dict[str, Any]]) -> None:
    append_turn(turns, role, items, "content")


def _unknown(body: dict[str, Any], known: Set[str]) -> None:
    extra = sorted(k for k in body if k not in known)
    if extra:
        raise UnsupportedFeature(f"'{extra[0]}' cannot be translated for this backend's API", param=extra[0])


# --------------------------------------------------------------------------- requests


def chat_to_messages(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI Chat Completions request as an Anthropic Messages request."""
    _unknown(body, _CHAT_KNOWN)
    n = body.get("n")
    if n not in (None, 1):
        raise UnsupportedFeature("'n' other than 1 (several answers) is not available on this backend", param="n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise UnsupportedFeature("'logprobs' is not available on this backend", param="logprobs")
    json_schema = _json_output(body)
    system: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(_list(body.get("messages"), "messages")):
        where = f"messages[{i}]"
        message = _obj(message, where)
        role = message.get("role")
        if role in ("system", "developer"):
            text = _plain_text(message.get("content"), f"{where}.content")
            if text:
                system.append({"type": "text", "text": text})
        elif role == "user":
            _append_content(messages, "user", _user_blocks(message.get("content"), f"{where}.content"))
        elif role == "assistant":
            _append_content(messages, "assistant", _assistant_blocks(message, where))
        elif role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": _str(message.get("tool_call_id"), f"{where}.tool_call_id"),
                "content": _plain_text(message.get("content"), f"{where}.content"),
            }
            _append_content(messages, "user", [block])
        else:
            raise MalformedRequest(f"'{where}.role' {role!r} is not a chat role", param=f"{where}.role")
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if system:
        out["system"] = system
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    out["max_tokens"] = max_tokens
    # temperature and top_p are left out: Anthropic's Messages API no longer takes sampling
    # parameters (its SDKs dropped them; its current models and API version answer 400 to any),
    # and OpenAI clients send them by default (LangChain's 0.7), which made every such request
    # to a Claude backend a 400 the client could do nothing about.
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list):
        out["stop_sequences"] = [_str(s, "stop") for s in stop]
    if body.get("stream") is True:
        out["stream"] = True
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    if body.get("tools"):
        out["tools"] = [_tool_to_anthropic(t, f"tools[{i}]") for i, t in enumerate(_list(body["tools"], "tools"))]
    choice = _tool_choice_to_anthropic(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None:
        out["tool_choice"] = choice
    if json_schema is not None:
        # JSON output is a forced call of one tool whose input is the answer (message_to_chat and
        # the stream translator turn it back into the answer's text).
        description = "Give the answer as this tool's input: JSON matching its schema."
        out["tools"] = [{"name": JSON_TOOL, "description": description, "input_schema": json_schema}]
        out["tool_choice"] = {"type": "tool", "name": JSON_TOOL}
    return out


# The tool that carries JSON output (OpenAI's `response_format`) on an Anthropic backend.
JSON_TOOL = "json_output"


def wants_json(body: dict[str, Any]) -> bool:
    response_format = body.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")


def _json_output(body: dict[str, Any]) -> dict[str, Any] | None:
    """The schema JSON output must match (`{"type": "object"}` for JSON mode), or None when
    the request asks for text."""
    response_format = body.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") in (None, "text"):
        return None
    if not wants_json(body):
        raise UnsupportedFeature("this 'response_format' is not available on this backend", param="response_format")
    if body.get("tools"):
        raise UnsupportedFeature(
            "'response_format' with 'tools' is not available on this backend", param="response_format"
        )
    if response_format["type"] == "json_object":
        return {"type": "object"}
    schema = _dict(response_format.get("json_schema")).get("schema")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise UnsupportedFeature(
            "JSON output on this backend needs a 'json_schema' whose type is object", param="response_format"
        )
    return schema


def _plain_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for i, part in enumerate(_list(content, where)):
        part = _obj(part, f"{where}[{i}]")
        if part.get("type") in ("text", "input_text", "output_text"):
            parts.append(_str(part.get("text"), f"{where}[{i}].text"))
        else:
            raise UnsupportedFeature(
                f"'{where}[{i}]' of type {part.get('type')!r} cannot be sent to this backend", param=f"{where}[{i}]"
            )
    return "\n".join(parts)


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for i, part in enumerate(_list(content, where)):
        part = _obj(part, f"{where}[{i}]")
        kind = part.get("type")
        if kind == "text":
            text = _str(part.get("text"), f"{where}[{i}].text")
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            blocks.append({"type": "image", "source": _image_source(_str(url, f"{where}[{i}].image_url.url"))})
        else:
            raise UnsupportedFeature(
                f"'{where}[{i}]' of type {kind!r} cannot be sent to this backend", param=f"{where}[{i}]"
            )
    return blocks


def _image_source(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        head, _, data = url[5:].partition(",")
        media_type, _, encoding = head.partition(";")
        if encoding != "base64" or not data:
            raise MalformedRequest("an image data URL must be base64 encoded", param="image_url")
        return {"type": "base64", "media_type": media_type, "data": data}
    return {"type": "url", "url": url}


def _assistant_blocks(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = _plain_text(message.get("content"), f"{where}.content") if message.get("content") is not None else ""
    if text:
        blocks.append({"type": "text", "text": text})
    for j, call in enumerate(_list(message.get("tool_calls") or [], f"{where}.tool_calls")):
        at = f"{where}.tool_calls[{j}]"
        function = _obj(_obj(call, at).get("function"), f"{at}.function")
        arguments = function.get("arguments") or "{}"
        try:
            parsed = json.loads(_str(arguments, f"{at}.function.arguments"))
        except ValueError:
            raise MalformedRequest(f"'{at}.function.arguments' is not JSON", param=f"{at}.function.arguments") from None
        blocks.append(
            {
                "type": "tool_use",
                "id": _str(call.get("id"), f"{at}.id"),
                "name": _str(function.get("name"), f"{at}.function.name"),
                "input": parsed if isinstance(parsed, dict) else {"value": parsed},
            }
        )
    return blocks


def _tool_to_anthropic(tool: Any, where: str) -> dict[str, Any]:
    tool = _obj(tool, where)
    if tool.get("type") != "function":
        raise UnsupportedFeature(f"'{where}' of type {tool.get('type')!r} cannot be sent to this backend", param=where)
    function = _obj(tool.get("function"), f"{where}.function")
    out = {
        "name": _str(function.get("name"), f"{where}.function.name"),
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    return out


def _tool_choice_to_anthropic(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any] | None
    if choice is None:
        out = {"type": "auto"} if parallel is False else None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": _str(choice["function"].get("name"), "tool_choice.function.name")}
    else:
        raise MalformedRequest("'tool_choice' must be auto, required, none or a function", param="tool_choice")
    if out is not None and parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def messages_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI Chat Completions request."""
    _unknown(body, _MESSAGES_KNOWN)
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _anthropic_text(system, "system")})
    for i, message in enumerate(_list(body.get("messages"), "messages")):
        where = f"messages[{i}]"
        message = _obj(message, where)
        role = message.get("role")
        content = message.get("content")
        if role == "user":
            messages.extend(_user_turn(content, f"{where}.content"))
        elif role == "assistant":
            messages.append(_assistant_turn(content, f"{where}.content"))
        elif role == "system":  # the current SDK also takes system turns among the messages
            messages.append({"role": "system", "content": _anthropic_text(content, f"{where}.content")})
        else:
            raise MalformedRequest(f"'{where}.role' must be user, assistant or system", param=f"{where}.role")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise MalformedRequest("'max_tokens' is required and must be an integer", param="max_tokens")
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages, "max_tokens": max_tokens}
    for name in ("temperature", "top_p"):
        if isinstance(body.get(name), int | float):
            out[name] = body[name]
    if body.get("stop_sequences"):
        out["stop"] = [_str(s, "stop_sequences") for s in _list(body["stop_sequences"], "stop_sequences")]
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    if body.get("tools"):
        out["tools"] = [_tool_to_openai(t, f"tools[{i}]") for i, t in enumerate(_list(body["tools"], "tools"))]
    choice = body.get("tool_choice")
    if choice is not None:
        choice = _obj(choice, "tool_choice")
        kind = choice.get("type")
        if kind == "tool":
            out["tool_choice"] = {
                "type": "function",
                "function": {"name": _str(choice.get("name"), "tool_choice.name")},
            }
        elif kind in ("auto", "any", "none"):
            out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
        else:
            raise MalformedRequest("'tool_choice.type' must be auto, any, tool or none", param="tool_choice.type")
        if choice.get("disable_parallel_tool_use") is True and out.get("tools"):
            out["parallel_tool_calls"] = False
    return out


def _anthropic_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for i, block in enumerate(_list(content, where)):
        block = _obj(block, f"{where}[{i}]")
        if block.get("type") != "text":
            raise UnsupportedFeature(
                f"'{where}[{i}]' of type {block.get('type')!r} cannot be sent to this backend", param=f"{where}[{i}]"
            )
        texts.append(_str(block.get("text"), f"{where}[{i}].text"))
    return "\n".join(texts)


def _user_turn(content: Any, where: str) -> list[dict[str, Any]]:
    """One Anthropic user turn: its tool results become OpenAI tool messages (first, as OpenAI
    wants them right after the assistant's calls), the rest one user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(_list(content, where)):
        at = f"{where}[{i}]"
        block = _obj(block, at)
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _str(block.get("text"), f"{at}.text")})
        elif kind == "image":
            parts.append(
                {"type": "image_url", "image_url": {"url": _image_url(_obj(block.get("source"), f"{at}.source"))}}
            )
        elif kind == "tool_result":
            result = block.get("content")
            text = "" if result is None else _anthropic_text(result, f"{at}.content")
            if block.get("is_error") is True:
                text = f"Error: {text}"
            tools.append(
                {"role": "tool", "tool_call_id": _str(block.get("tool_use_id"), f"{at}.tool_use_id"), "content": text}
            )
        else:
            raise UnsupportedFeature(f"'{at}' of type {kind!r} cannot be sent to this backend", param=at)
    out = list(tools)
    if parts:
        out.append({"role": "user", "content": parts})
    return out


def _image_url(source: dict[str, Any]) -> str:
    if source.get("type") == "base64":
        media_type, data = _str(source.get("media_type"), "source.media_type"), _str(source.get("data"), "source.data")
        return f"data:{media_type};base64,{data}"
    if source.get("type") == "url":
        return _str(source.get("url"), "source.url")
    raise UnsupportedFeature(f"image source {source.get('type')!r} cannot be sent to this backend", param="source")


def _assistant_turn(content: Any, where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts, calls = [], []
    for i, block in enumerate(_list(content, where)):
        at = f"{where}[{i}]"
        block = _obj(block, at)
        kind = block.get("type")
        if kind == "text":
            texts.append(_str(block.get("text"), f"{at}.text"))
        elif kind == "tool_use":
            calls.append(
                {
                    "id": _str(block.get("id"), f"{at}.id"),
                    "type": "function",
                    "function": {
                        "name": _str(block.get("name"), f"{at}.name"),
                        "arguments": json.dumps(block.get("input") or {}, separators=(",", ":")),
                    },
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # reasoning another model wrote means nothing to this one
        else:
            raise UnsupportedFeature(f"'{at}' of type {kind!r} cannot be sent to this backend", param=at)
    out: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts else None}
    if calls:
        out["tool_calls"] = calls
    return out


def _tool_to_openai(tool: Any, where: str) -> dict[str, Any]:
    tool = _obj(tool, where)
    if tool.get("type") not in (None, "custom"):
        raise UnsupportedFeature(
            f"'{where}', a server tool of type {tool.get('type')!r}, exists only on Anthropic", param=where
        )
    function: dict[str, Any] = {
        "name": _str(tool.get("name"), f"{where}.name"),
        "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
    }
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


# --------------------------------------------------------------------------- answers


def message_to_chat(body: dict[str, Any], json_output: bool = False) -> dict[str, Any]:
    """An Anthropic answer (a `message`) as an OpenAI chat completion. `json_output`: the
    request asked for JSON, which came as the JSON_TOOL call's input."""
    texts, calls = [], []
    for block in body.get("content") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif json_output and block.get("type") == "tool_use" and block.get("name") == JSON_TOOL:
            texts = [json.dumps(block.get("input") or {}, separators=(",", ":"), ensure_ascii=False)]
        elif block.get("type") == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": json.dumps(block.get("input") or {}, separators=(",", ":")),
                    },
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": body.get("id") or f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "stop"
                if json_output and not calls
                else _STOP_TO_FINISH.get(body.get("stop_reason") or "", "stop"),
            }
        ],
        "usage": _chat_usage(body.get("usage")),
    }


def _chat_usage(usage: Any) -> dict[str, Any]:
    """Anthropic counts cache reads and writes apart from input_tokens; OpenAI's prompt_tokens
    includes cached tokens, and says how many in the details."""
    usage = usage if isinstance(usage, dict) else {}
    cached = _int(usage.get("cache_read_input_tokens"))
    prompt = _int(usage.get("input_tokens")) + cached + _int(usage.get("cache_creation_input_tokens"))
    return chat_usage(prompt, _int(usage.get("output_tokens")), cached)


def chat_to_message(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completion as an Anthropic answer (a `message`)."""
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = _dict(choice.get("message"))
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            continue
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                "name": call["function"].get("name"),
                "input": _arguments(call["function"].get("arguments")),
            }
        )
    usage = _dict(body.get("usage"))
    return {
        "id": body.get("id") or f"msg_{uuid.uuid4().hex}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": content,
        "stop_reason": _FINISH_TO_STOP.get(choice.get("finish_reason") or "", "end_turn"),
        "stop_sequence": None,
        "usage": _anthropic_usage(usage),
    }


def _anthropic_usage(usage: dict[str, Any]) -> dict[str, Any]:
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return {
        "input_tokens": max(_int(usage.get("prompt_tokens")) - cached, 0),
        "output_tokens": _int(usage.get("completion_tokens")),
        "cache_read_input_tokens": cached,
    }


def _arguments(text: Any) -> dict[str, Any]:
    try:
        parsed = json.loads(text) if isinstance(text, str) and text else {}
    except ValueError:
        return {"arguments": text}
    return parsed if isinstance(parsed, dict) else {"value": parsed}


def error_to_chat(body: Any) -> dict[str, Any]:
    """A provider's error body (Anthropic's, Gemini's, OpenAI's own, vLLM's older top-level
    `{"object": "error", "message": ...}`, or any text) as OpenAI's error shape."""
    error = body.get("error") if isinstance(body, dict) else None
    if error is None and isinstance(body, dict) and isinstance(body.get("message"), str):
        error = body
    if isinstance(error, dict):
        kind = next((k for k in (error.get("type"), error.get("status")) if isinstance(k, str)), "api_error")
        message = error.get("message") if isinstance(error.get("message"), str) else json.dumps(error)
        code = error.get("code") if isinstance(error.get("code"), str) else kind
    else:
        kind, message = "api_error", body if isinstance(body, str) else json.dumps(body)
        code = kind
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


# OpenAI error types and codes -> Anthropic's error type (the HTTP status itself passes as is).
_OPENAI_ERRORS = {
    "invalid_request_error": "invalid_request_error",
    "context_length_exceeded": "invalid_request_error",
    "authentication_error": "authentication_error",
    "invalid_api_key": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "model_not_found": "not_found_error",
    "rate_limit_error": "rate_limit_error",
    "rate_limit_exceeded": "rate_limit_error",
    # OpenAI's own 429s say which limit: requests or tokens.
    "requests": "rate_limit_error",
    "tokens": "rate_limit_error",
    "insufficient_quota": "rate_limit_error",
    "overloaded_error": "overloaded_error",
    # Gemini's statuses (google.rpc codes).
    "INVALID_ARGUMENT": "invalid_request_error",
    "FAILED_PRECONDITION": "invalid_request_error",
    "UNAUTHENTICATED": "authentication_error",
    "PERMISSION_DENIED": "permission_error",
    "NOT_FOUND": "not_found_error",
    "RESOURCE_EXHAUSTED": "rate_limit_error",
    "UNAVAILABLE": "overloaded_error",
    # The OpenAI SDK's exception names, which vLLM and other OpenAI-compatible servers send as
    # the type.
    "BadRequestError": "invalid_request_error",
    "AuthenticationError": "authentication_error",
    "PermissionDeniedError": "permission_error",
    "NotFoundError": "not_found_error",
    "RateLimitError": "rate_limit_error",
    # HTTP statuses, which some servers send as the code (vLLM: "code": 400).
    **{str(status): anthropic_error_type(status) for status in (400, 401, 403, 404, 413, 422, 429, 500, 503, 529)},
}


def error_to_messages(body: Any) -> dict[str, Any]:
    """An OpenAI error body (or any text) as Anthropic's error shape."""
    error = body.get("error") if isinstance(body, dict) else None
    kind = "api_error"
    if isinstance(error, dict):
        message = error["message"] if isinstance(error.get("message"), str) else json.dumps(error)
        for name in (error.get("code"), error.get("type")):
            if isinstance(name, str) and name in _OPENAI_ERRORS:
                kind = _OPENAI_ERRORS[name]
                break
    else:
        message = body if isinstance(body, str) else json.dumps(body)
    return {"type": "error", "error": {"type": kind, "message": message}}


# --------------------------------------------------------------------------- streams


class MessagesToChatStream:
    """Anthropic's stream events as OpenAI chat.completion.chunk events, event by event.
    `json_output`: the request asked for JSON, which streams as the JSON_TOOL call's input."""

    def __init__(self, json_output: bool = False) -> None:
        self.json_output = json_output
        self.json_block = -1  # the content block that carries the JSON answer
        self.reader = sse.Reader()
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.model: str | None = None
        self.tools: dict[int, int] = {}  # Anthropic content block index -> OpenAI tool call index
        self.usage: dict[str, Any] = {}
        self.finish: str | None = None
        self.done = False

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> bytes:
        return chat_chunk(self.id, self.created, self.model, delta, finish, usage)

    def feed(self, data: bytes) -> bytes:
        return b"".join(self._event(e) for e in self.reader.feed(data))

    def end(self) -> bytes:
        out = b"".join(self._event(e) for e in self.reader.close())
        if not self.done and self.model is not None:
            out += self._close()  # the provider stopped without message_stop: end it cleanly
        return out

    def _close(self) -> bytes:
        self.done = True
        return self._chunk(None, usage=_chat_usage(self.usage)) + sse.encode("[DONE]")

    def _event(self, event: sse.Event) -> bytes:
        data = event.json()
        if not isinstance(data, dict) or self.done:
            return b""
        kind = data.get("type") or event.name
        if kind == "message_start":
            message = _dict(data.get("message"))
            self.id = message.get("id") or self.id
            self.model = message.get("model") or ""
            self.usage = dict(message.get("usage") or {})
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = _dict(data.get("content_block"))
            if self.json_output and block.get("type") == "tool_use" and block.get("name") == JSON_TOOL:
                self.json_block = _int(data.get("index"))
                return b""
            if block.get("type") == "tool_use":
                index = self.tools.setdefault(_int(data.get("index")), len(self.tools))
                call = {
                    "index": index,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return self._chunk({"tool_calls": [call]})
            if block.get("type") == "text" and block.get("text"):
                return self._chunk({"content": block["text"]})
            return b""
        if kind == "content_block_delta":
            delta = _dict(data.get("delta"))
            if delta.get("type") == "text_delta":
                return self._chunk({"content": delta.get("text") or ""})
            if delta.get("type") == "input_json_delta" and _int(data.get("index")) == self.json_block:
                return self._chunk({"content": delta.get("partial_json") or ""})
            if delta.get("type") == "input_json_delta":
                tool = self.tools.get(_int(data.get("index")))
                if tool is None:
                    return b""
                return self._chunk(
                    {"tool_calls": [{"index": tool, "function": {"arguments": delta.get("partial_json") or ""}}]}
                )
            return b""  # thinking and signatures have no place in a chat chunk
        if kind == "message_delta":
            usage = data.get("usage")
            if isinstance(usage, dict):
                self.usage.update({k: v for k, v in usage.items() if v is not None})
            delta = _dict(data.get("delta"))
            reason = delta.get("stop_reason")
            if reason == "tool_use" and self.json_block >= 0 and not self.tools:
                return self._chunk({}, finish="stop")  # the forced JSON tool: a plain answer
            if reason:
                return self._chunk({}, finish=_STOP_TO_FINISH.get(reason, "stop"))
            return b""
        if kind == "message_stop":
            return self._close()
        if kind == "error":
            self.done = True  # OpenAI's SDKs raise on a chunk that carries an error
            return sse.encode(error_to_chat(data))
        return b""  # ping and events added later


class ChatToMessagesStream:
    """OpenAI chat.completion.chunk events as Anthropic's stream events, chunk by chunk."""

    def __init__(self) -> None:
        self.reader = sse.Reader()
        self.started = self.done = False
        self.block: tuple[str, int] | None = None  # the open content block: (kind, OpenAI tool index or -1)
        self.index = -1  # Anthropic content block index
        self.stop = "end_turn"
        self.usage: dict[str, Any] = {}

    def feed(self, data: bytes) -> bytes:
        return b"".join(self._event(e) for e in self.reader.feed(data))

    def end(self) -> bytes:
        out = b"".join(self._event(e) for e in self.reader.close())
        if self.started and not self.done:
            out += self._close()  # the provider stopped without [DONE]: end it cleanly
        return out

    def _start(self, chunk: dict[str, Any]) -> bytes:
        self.started = True
        message: dict[str, Any] = {
            "id": chunk.get("id") or f"msg_{uuid.uuid4().hex}",
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return sse.encode({"type": "message_start", "message": message}, "message_start")

    def _open(self, kind: str, tool: int, block: dict[str, Any]) -> bytes:
        out = self._close_block()
        self.index += 1
        self.block = (kind, tool)
        return out + sse.encode(
            {"type": "content_block_start", "index": self.index, "content_block": block}, "content_block_start"
        )

    def _close_block(self) -> bytes:
        if self.block is None:
            return b""
        self.block = None
        return sse.encode({"type": "content_block_stop", "index": self.index}, "content_block_stop")

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse.encode({"type": "content_block_delta", "index": self.index, "delta": delta}, "content_block_delta")

    def _close(self) -> bytes:
        self.done = True
        usage = _anthropic_usage(self.usage)
        return (
            self._close_block()
            + sse.encode(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self.stop, "stop_sequence": None},
                    "usage": {
                        "input_tokens": usage["input_tokens"],
                        "output_tokens": usage["output_tokens"],
                        "cache_read_input_tokens": usage["cache_read_input_tokens"],
                    },
                },
                "message_delta",
            )
            + sse.encode({"type": "message_stop"}, "message_stop")
        )

    def _event(self, event: sse.Event) -> bytes:
        if self.done:
            return b""
        if event.data.strip() == "[DONE]":
            return self._close() if self.started else b""
        chunk = event.json()
        if not isinstance(chunk, dict):
            return b""
        if isinstance(chunk.get("error"), dict):
            self.done = True
            return sse.encode(error_to_messages(chunk), "error")
        out = b"" if self.started else self._start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        delta = _dict(choice.get("delta"))
        text = delta.get("content")
        if isinstance(text, str) and text:
            if self.block is None or self.block[0] != "text":
                out += self._open("text", -1, {"type": "text", "text": ""})
            out += self._delta({"type": "text_delta", "text": text})
        for call in delta.get("tool_calls") or []:
            if not isinstance(call, dict):
                continue
            tool = _int(call.get("index"))
            function = _dict(call.get("function"))
            if self.block != ("tool", tool):
                out += self._open(
                    "tool",
                    tool,
                    {
                        "type": "tool_use",
                        "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                        "name": function.get("name") or "",
                        "input": {},
                    },
                )
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments:
                out += self._delta({"type": "input_json_delta", "partial_json": arguments})
        if choice.get("finish_reason"):
            self.stop = _FINISH_TO_STOP.get(choice["finish_reason"], "end_turn")
        return out
