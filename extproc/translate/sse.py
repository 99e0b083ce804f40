"""Server-sent events, both ways: whole events out of a byte stream, and events back to bytes.

Providers split events across chunks anywhere (inside a UTF-8 character too), so bytes wait
here until the blank line that ends their event.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# An event ends at a blank line; "\r\n" and "\r" line ends are as valid as "\n".
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# SSE lines end with CRLF, LF or CR only (str.splitlines would also split inside the data at
# U+0085, U+2028 and the like, which JSON carries unescaped).
_LINE_END = re.compile(r"\r\n|\r|\n")
# A partial event longer than this is not an event anyone sends: it is dropped, not held.
MAX_EVENT_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Event:
    name: str  # the `event:` field, "" when absent
    data: str  # the `data:` lines joined by "\n"

    def json(self) -> Any:
        """The data as JSON, or None when it is not JSON (a malformed event is skipped)."""
        try:
            return json.loads(self.data)
        except ValueError:
            return None


class Reader:
    """Feed it chunks; it returns the events they complete."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[Event]:
        text = self._pending + chunk
        events, pos = [], 0
        for end in _EVENT_END.finditer(text):
            event = _parse(text[pos : end.start()])
            if event is not None:
                events.append(event)
            pos = end.end()
        self._pending = text[pos:]
        if len(self._pending) > MAX_EVENT_BYTES:
            self._pending = b""
        return events

    def close(self) -> list[Event]:
        """What a stream that ended without a final blank line still holds."""
        rest, self._pending = self._pending, b""
        event = _parse(rest)
        return [event] if event is not None else []


def _parse(block: bytes) -> Event | None:
    name, data = "", []
    for line in _LINE_END.split(block.decode("utf-8", "replace")):
        if not line or line.startswith(":"):
            continue  # a comment (keep-alive)
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    if not data:
        return None
    return Event(name, "\n".join(data))


def encode(data: Any, name: str = "") -> bytes:
    """One event: `event:` (when named) and one `data:` line of compact JSON (or text)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {payload}\n\n".encode()
