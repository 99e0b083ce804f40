"""OAuth2 access tokens minted from Google credentials, for providers whose `auth.format` is
`google-credentials` (Vertex AI).

Vertex AI takes no API key: every call carries `Authorization: Bearer <access token>`, a token
that lives an hour and is minted from a service account key (or a workload identity federation
config) by Google's token endpoint. google-auth does the minting (it signs the JWT assertion
and knows every credentials type); this module keeps one credentials object per distinct JSON,
so a token is minted once and reused by every caller in the process until google-auth itself
deems it near expiry (its refresh threshold, a few minutes before), then minted again.

Callers: the gateway's credential files (Envoy adds the token on every attempt; the publishers
rewrite the file on a timer, see `gatewayfiles.write_credentials`), the ext_proc's own calls
(mirror, LLM tier) and the operator's health probe. Minting blocks for at most
`TOKEN_TIMEOUT_SECONDS`: async callers run `reveal()` in a thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from typing import Any

import google.auth.exceptions
import google.auth.transport.requests
from google.auth import aws, identity_pool
from google.oauth2 import service_account

from .errors import CredentialUnavailable
from .secrets import SecretValue

log = logging.getLogger("signalbox.googleauth")

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
TOKEN_TIMEOUT_SECONDS = 10.0
# Distinct credentials kept per process (one per Vertex provider in practice).
_CACHE_SIZE = 256


class _Request(google.auth.transport.requests.Request):
    """google-auth's requests transport, with a timeout: its default (120 s) would hold a
    publisher or a probe for two minutes behind a silent token endpoint."""

    def __call__(self, url: str, method: str = "GET", body: Any = None, headers: Any = None, timeout: Any = None, **kw):  # type: ignore[override]
        return super().__call__(url, method, body, headers, timeout or TOKEN_TIMEOUT_SECONDS, **kw)


class GoogleToken(SecretValue):
    """A SecretValue whose value is the current access token. `reveal()` mints one when there is
    none or the last is near expiry, and raises CredentialUnavailable when it cannot."""

    __slots__ = ("_credentials", "_lock")
    minted = True

    def __init__(self, credentials: Any):
        super().__init__("")
        self._credentials = credentials
        self._lock = threading.Lock()

    def reveal(self) -> str:
        with self._lock:
            if not self._credentials.valid:
                try:
                    self._credentials.refresh(_Request())
                except (google.auth.exceptions.GoogleAuthError, ValueError) as exc:
                    # google-auth's messages name the endpoint and its error, not the key.
                    raise CredentialUnavailable(f"cannot mint a Google access token: {exc}"[:500]) from None
            token = self._credentials.token
        if not token:
            raise CredentialUnavailable("the token endpoint returned no access token")
        return str(token)


def _credentials(info: Any) -> Any:
    """google-auth credentials of the two kinds a gateway runs with, each by its own loader (a
    generic loader would accept any kind a JSON names, such as a user's own login):
    - `service_account`: a service account key;
    - `external_account`: workload identity federation, a Kubernetes service account token
      (identity pool, e.g. GKE's or any cluster's projected token file) or AWS (EKS, IRSA)
      exchanged for Google tokens."""
    kind = info["type"]
    if kind == "service_account":
        return service_account.Credentials.from_service_account_info(info, scopes=list(SCOPES))
    if kind == "external_account":
        source = info.get("credential_source") or {}
        loader = aws if str(source.get("environment_id", "")).startswith("aws") else identity_pool
        return loader.Credentials.from_info(info, scopes=list(SCOPES))
    raise ValueError(kind)


_tokens: OrderedDict[str, GoogleToken] = OrderedDict()
_tokens_lock = threading.Lock()


def google_token(credentials_json: SecretValue) -> GoogleToken | None:
    """The token source for this credentials JSON (the same object for the same JSON), or None
    when the JSON is not Google credentials google-auth can use. Mints nothing yet."""
    raw = credentials_json.reveal()
    digest = hashlib.sha256(raw.encode()).hexdigest()
    with _tokens_lock:
        if digest in _tokens:
            _tokens.move_to_end(digest)
            return _tokens[digest]
    try:
        info = json.loads(raw)
    except ValueError:
        log.warning("Google credentials cannot be used: not JSON")
        return None
    kind = info.get("type") if isinstance(info, dict) else None
    if kind not in ("service_account", "external_account"):
        log.warning("Google credentials cannot be used: type %r is not service_account or external_account", kind)
        return None
    try:
        credentials = _credentials(info)
    except (ValueError, TypeError, KeyError, google.auth.exceptions.GoogleAuthError) as exc:
        # Only the kind of failure: a message could quote part of the private key.
        log.warning("Google credentials of type %s cannot be used (%s)", kind, type(exc).__name__)
        return None
    token = GoogleToken(credentials)
    with _tokens_lock:
        _tokens[digest] = token
        while len(_tokens) > _CACHE_SIZE:
            _tokens.popitem(last=False)
    return token
