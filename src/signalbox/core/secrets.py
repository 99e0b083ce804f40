"""A wrapper for API keys whose repr and str never show the value.

Shared by the data plane (keys it adds to upstream requests) and the operator (keys it probes
providers with), so a key that reaches a log line, an exception or a debugger prints redacted.
"""

from __future__ import annotations


class SecretValue:
    __slots__ = ("_value",)
    # Whether reveal() may block on the network (an access token minted when due,
    # `googleauth.GoogleToken`): async callers then reveal it in a thread.
    minted = False

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "SecretValue(<redacted>)"

    __str__ = __repr__


class Prefixed(SecretValue):
    """A header value: a prefix (e.g. "Bearer ") before a secret, joined only when revealed, so
    a minted token is as fresh as its source."""

    __slots__ = ("_inner", "_prefix")

    def __init__(self, prefix: str, inner: SecretValue):
        super().__init__("")
        self._prefix, self._inner = prefix, inner

    @property
    def minted(self) -> bool:  # type: ignore[override]
        return self._inner.minted

    def reveal(self) -> str:
        return self._prefix + self._inner.reveal()
