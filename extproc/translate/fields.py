"""What every translator reads and writes the same way: fields of untrusted JSON (checked, with
the client's 400 naming the field), and the chat.completion.chunk event every stream
translator to chat emits."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from signalbox.core.errors import MalformedRequest, UnsupportedFeature

from . import sse

# A Chat Completions request's fields: what a translation to another API understands, and the
# hints among them it may drop (they only tune an answer, and the other API has no equivalent).
CHAT_HINTS = frozenset(
    {
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "service_tier",
        "store",
        "metadata",
        "reasoning_effort",
        "stream_options",
        "prediction",
        "web_search_options",
        "verbosity",
    }
)
CHAT_FIELDS = CHAT_HINTS | {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "user",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "n",
    "logprobs",
    "top_logprobs",
}


def dict_or_empty(value: Any) -> dict[str, Any]:
    """`value` when it is an object, else an empty one (provider output is read leniently)."""
    return value if isinstance(value, dict) else {}


def int_or_zero(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def require_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedRequest(f"'{where}' must be an object", param=where)
    return value


def require_array(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise MalformedRequest(f"'{where}' must be an array", param=where)
    return value


def require_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise MalformedRequest(f"'{where}' must be a string", param=where)
    return value


def append_turn(turns: list[dict[str, Any]], role: str, items: list[dict[str, Any]], key: str) -> None:
    """Add `items` (content blocks or parts, under `key`) as a turn of `role`: consecutive turns
    of one role become one (tool results and the user's next words, in APIs that alternate)."""
    if not items:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1][key].extend(items)
    else:
        turns.append({"role": role, key: items})


def chat_chunk(
    chunk_id: str, created: int, model: Any, delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None
) -> bytes:
    """One chat.completion.chunk event: a delta of choice 0, or (delta None) the usage chunk
    with no choices that OpenAI sends last when usage is asked for."""
    chunk: dict[str, Any] = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return sse.encode(chunk)


def call_arguments(text: Any, where: str) -> dict[str, Any]:
    """A chat tool call's `function.arguments` (JSON text) as the object other APIs take; a
    value that is not an object is wrapped as {"value": ...}. `where`: the call's path."""
    try:
        parsed = json.loads(text) if isinstance(text, str) and text else {}
    except ValueError:
        raise MalformedRequest(
            f"'{where}.function.arguments' is not JSON", param=f"{where}.function.arguments"
        ) from None
    return parsed if isinstance(parsed, dict) else {"value": parsed}


def function_of(tool: Any, where: str) -> dict[str, Any]:
    """A chat tool's `function` (read leniently); other kinds of tool cannot be sent."""
    tool = dict_or_empty(tool)
    if tool.get("type") != "function":
        raise UnsupportedFeature(f"'{where}' of type {tool.get('type')!r} cannot be sent to this backend", param=where)
    return dict_or_empty(tool.get("function"))


def inline_image(url: str, where: str) -> tuple[str, str]:
    """(media type, base64 data) of an image given as a data URL, for APIs that take images
    inline only."""
    if not url.startswith("data:"):
        raise UnsupportedFeature(f"'{where}': this backend takes images inline (data: URLs) only", param=where)
    head, _, data = url[5:].partition(",")
    mime, _, encoding = head.partition(";")
    if encoding != "base64":
        raise MalformedRequest("an image data URL must be base64 encoded", param="image_url")
    return mime, data


def content_items(content: Any, where: str, image: Callable[[str, str], dict[str, Any]] | None) -> list[dict[str, Any]]:
    """A chat message's `content` (text, or an array of parts) as another API's items: a
    {"text": ...} per non-empty text part, and `image(media type, base64 data)` per image part
    given inline; `image` None: images cannot go where this content goes."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise MalformedRequest(f"'{where}' must be a string or an array of content parts", param=where)
    items: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        part = dict_or_empty(part)
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text"):
            text = require_str(part.get("text"), f"{where}[{i}].text")
            if text:
                items.append({"text": text})
        elif kind == "image_url" and image is not None:
            url = require_str(dict_or_empty(part.get("image_url")).get("url"), f"{where}[{i}].image_url.url")
            items.append(image(*inline_image(url, f"{where}[{i}]")))
        else:
            raise UnsupportedFeature(f"'{where}[{i}]' of type {kind!r} cannot be sent to this backend", param=where)
    return items


def chat_messages(body: dict[str, Any]) -> list[Any]:
    """A chat request's `messages`, once what no other API can take is refused: fields chat
    has and the backend's API lacks, several answers (`n`), log probabilities."""
    extra = sorted(k for k in body if k not in CHAT_FIELDS)
    if extra:
        raise UnsupportedFeature(f"'{extra[0]}' cannot be translated for this backend's API", param=extra[0])
    if body.get("n") not in (None, 1):
        raise UnsupportedFeature("'n' other than 1 (several answers) is not available on this backend", param="n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise UnsupportedFeature("'logprobs' is not available on this backend", param="logprobs")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise MalformedRequest("'messages' must be an array of message objects", param="messages")
    return messages


def chat_usage(prompt: int, completion: int, cached: int, reasoning: int | None = None) -> dict[str, Any]:
    """Usage in OpenAI's shape: `prompt` includes the `cached` part, `completion` the
    `reasoning` part (its details only when the provider says)."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage
