"""Decision tokens: what a client echoes back with quality feedback (x-signalbox-decision).

A token names the policy, the class and the backend of one routed request, and is signed
(HMAC-SHA256, truncated to 128 bits) with a key the gateway holds, so that `POST /v1/feedback`
can only teach learning about decisions the gateway really made: a forged or edited token is
refused, and a client cannot steer routing by inventing feedback for backends of its choice.

The key comes from a file: in a pod, a Secret the chart generates once per install (so every
replica signs alike); locally, `<workdir>/state/decision.key`, made on first start. Without a
file the process makes a random key of its own (tokens then verify only on that process).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

_MAC_BYTES = 16
KEY_BYTES = 32


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def unpack(token: str) -> tuple[str, str, str]:
    """(policy, class key, backend id) without checking the signature: only for tokens the
    gateway itself put in Envoy's metadata (the access log). ValueError if garbled."""
    payload = token.split(".", 1)[0]
    try:
        policy, class_key, backend_id = json.loads(_unb64(payload))
    except (ValueError, TypeError, binascii.Error, RecursionError) as exc:
        raise ValueError(f"not a decision token: {exc}") from None
    return str(policy), str(class_key), str(backend_id)


class DecisionSigner:
    def __init__(self, key: bytes | None = None):
        self._key = key or secrets.token_bytes(KEY_BYTES)

    def __repr__(self) -> str:
        return "DecisionSigner(<key redacted>)"

    @classmethod
    def from_file(cls, path: str | Path, create: bool = False) -> DecisionSigner:
        """The key in `path` (any bytes; surrounding whitespace ignored); `create` makes one,
        readable by the owner only, when the file does not exist yet."""
        path = Path(path)
        if create and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written whole under a private name, then linked into place: workers starting
            # together never read a key file that exists but is still empty (one did, and
            # the worker died at start).
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(KEY_BYTES))
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another worker made it first: read theirs
            finally:
                tmp.unlink()
        key = path.read_bytes().strip()
        if not key:
            raise ValueError(f"decision key file {path} is empty")
        return cls(key)

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest()[:_MAC_BYTES])

    def token(self, policy: str, class_key: str, backend_id: str) -> str:
        payload = _b64(json.dumps([policy, class_key, backend_id], separators=(",", ":")).encode())
        return f"{payload}.{self._mac(payload)}"

    def read(self, token: str) -> tuple[str, str, str]:
        """(policy, class key, backend id) of a token this gateway signed; ValueError otherwise."""
        if not isinstance(token, str):
            raise ValueError("a decision token is a string")
        payload, _, mac = token.partition(".")
        if not hmac.compare_digest(mac.encode(), self._mac(payload).encode()):
            raise ValueError("decision token signature does not verify")
        return unpack(token)

    def seal(self, purpose: str, data: dict[str, str], expires: float) -> str:
        """`data` signed for `purpose` until `expires` (epoch seconds): the stream relay's copy
        of a decision (extproc.relay). The purpose is under the signature, so a token made for
        one use (a decision token) never passes as another."""
        payload = _b64(json.dumps([purpose, round(expires, 3), data], separators=(",", ":")).encode())
        return f"{payload}.{self._mac(purpose + ':' + payload)}"

    def unseal(self, purpose: str, token: str, now: float) -> dict[str, str]:
        """What `seal(purpose, ...)` signed, unless forged, edited or expired (ValueError)."""
        if not isinstance(token, str):
            raise ValueError("a sealed token is a string")
        payload, _, mac = token.partition(".")
        if not hmac.compare_digest(mac.encode(), self._mac(purpose + ":" + payload).encode()):
            raise ValueError("sealed token signature does not verify")
        try:
            sealed_for, expires, data = json.loads(_unb64(payload))
        except (ValueError, TypeError, binascii.Error, RecursionError) as exc:
            raise ValueError(f"not a sealed token: {exc}") from None
        if sealed_for != purpose or not isinstance(data, dict):
            raise ValueError("sealed token is for another use")
        if now > float(expires):
            raise ValueError("sealed token expired")
        return {str(k): str(v) for k, v in data.items()}
