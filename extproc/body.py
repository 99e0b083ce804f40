"""The client's JSON body: the one place untrusted bytes become a dict the router may read.

Everything a client sends is checked here, before any routing code sees it, so that bad input
is always the client's 400 with a specific message and never an exception deeper in the
gateway (a 5xx, or a dropped stream). Only what the gateway itself reads is checked: `model`,
`messages`/`prompt`/`input` (for classification and token estimates), `max_tokens` and
`max_completion_tokens` (for cost estimates and budget holds), `stream` and `stream_options`
(the gateway asks for usage in streams), `tools`, `response_format`. Everything else travels
to the provider untouched, which validates it in its own way.
"""

from __future__ import annotations

import json
import re
from typing import Any

from signalbox.core.errors import MalformedRequest

# Longest alias accepted; a longer `model` is refused before it could be echoed in messages.
MAX_MODEL_CHARS = 256
# Upper bound of max_tokens/max_completion_tokens: far above any model's output limit, low
# enough that cost estimates stay finite and budget holds meaningful.
MAX_OUTPUT_TOKENS = 10_000_000
# The first bytes of compressed bodies (gzip, zstd): a client that compressed its request is told
# so, not that its JSON is broken.
_COMPRESSED = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
# A UTF-16 surrogate escape (\uD800-\uDFFF); only bodies containing one need the full check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")


def parse(raw: bytes) -> dict[str, Any]:
    """Parse and check a routed request's body; MalformedRequest (400) says what is wrong."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        compressed = next((name for magic, name in _COMPRESSED.items() if raw.startswith(magic)), None)
        if compressed:
            raise MalformedRequest(
                f"request body is {compressed}-compressed; the gateway reads request bodies as plain JSON"
                " (send it without Content-Encoding)"
            ) from None
        raise MalformedRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedRequest("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise MalformedRequest("request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw) is not None:
        _check_unicode(body)
    _check_fields(body)
    return body


def _check_unicode(body: dict[str, Any]) -> None:
    """A lone surrogate (e.g. "\\ud800") is valid JSON but not text: no provider accepts it and
    it cannot be re-encoded as UTF-8. Valid pairs were already joined by the parser."""
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise MalformedRequest("request body contains an unpaired UTF-16 surrogate escape (e.g. \\ud800)") from None
    except RecursionError:
        raise MalformedRequest("request body is nested too deeply") from None


def _check_fields(body: dict[str, Any]) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise MalformedRequest("request body needs a non-empty string field 'model'", param="model")
    if len(model) > MAX_MODEL_CHARS:
        raise MalformedRequest(f"'model' is longer than {MAX_MODEL_CHARS} characters", param="model")
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list):
            raise MalformedRequest("'messages' must be an array of message objects", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise MalformedRequest(f"'messages[{i}]' must be an object", param=f"messages[{i}]")
            role = message.get("role")
            if role is not None and not isinstance(role, str):
                raise MalformedRequest(f"'messages[{i}].role' must be a string", param=f"messages[{i}].role")
            content = message.get("content")
            if content is not None and not isinstance(content, str | list):
                raise MalformedRequest(
                    f"'messages[{i}].content' must be a string or an array of content parts",
                    param=f"messages[{i}].content",
                )
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise MalformedRequest(f"'{name}' must be an integer", param=name)
        if not 1 <= value <= MAX_OUTPUT_TOKENS:
            raise MalformedRequest(f"'{name}' must be between 1 and {MAX_OUTPUT_TOKENS}", param=name)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise MalformedRequest("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise MalformedRequest("'stream_options' must be an object", param="stream_options")
    response_format = body.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise MalformedRequest("'response_format' must be an object", param="response_format")
    for name in ("tools", "functions"):
        value = body.get(name)
        if value is not None and not isinstance(value, list):
            raise MalformedRequest(f"'{name}' must be an array", param=name)


def dump(body: dict[str, Any]) -> bytes:
    """The body as sent upstream: compact UTF-8 (parse() guarantees it encodes)."""
    try:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    except RecursionError:
        # The parser and the encoder share one recursion limit, from slightly different depths.
        raise MalformedRequest("request body is nested too deeply") from None
