"""A wrapper for API keys whose repr and str never show the value.

Shared by the data plane (keys it adds to upstream requests) and the operator (keys it probes
providers with), so a key that reaches a log line, an exception or a debugger prints redacted.
"""

from __future__ import annotations


class SecretValue:
    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "SecretValue(<redacted>)"

    __str__ = __repr__
