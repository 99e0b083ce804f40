"""Token and cost accounting from responses (the accounting ext_proc, observability mode).

Envoy streams each response to this phase without waiting for it, so counting costs no
latency. Usage is read from a JSON body's `usage`, or from the SSE chunk that carries it (the
router phase asks providers for it when a streaming client did not); cost comes from the prices
of the backend that actually answered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# JSON bodies are buffered to find `usage`; past this, counting gives up rather than hold memory.
MAX_JSON_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class UsageReader:
    """Fed response body chunks in order; `usage` is the last usage object seen."""

    streaming: bool
    buffer: bytearray = field(default_factory=bytearray)
    usage: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        if self.streaming:
            self.buffer += chunk
            *lines, rest = bytes(self.buffer).split(b"\n")
            self.buffer = bytearray(rest)
            for line in lines:
                self._event(line)
        elif len(self.buffer) + len(chunk) <= MAX_JSON_BYTES:
            self.buffer += chunk

    def finish(self) -> Usage | None:
        if self.streaming:
            self._event(bytes(self.buffer))
        else:
            self.usage = _usage(_json(bytes(self.buffer)))
        return self.usage

    def _event(self, line: bytes) -> None:
        line = line.strip()
        if line.startswith(b"data:") and b'"usage"' in line:
            found = _usage(_json(line[5:]))
            if found is not None:
                self.usage = found


def _json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _usage(payload: object) -> Usage | None:
    if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
        return None
    usage = payload["usage"]
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt, completion)


def cost_usd(usage: Usage, input_price_per_1m: float, output_price_per_1m: float) -> float:
    return (usage.prompt_tokens * input_price_per_1m + usage.completion_tokens * output_price_per_1m) / 1e6
