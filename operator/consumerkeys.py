"""Consumers' gateway API keys: made, rotated and hashed by the operator, kept in Secrets.

Each Consumer with an `apiKey` (and no local `env`/`file`) owns one Secret (`spec.apiKey.secretName`,
default `<consumer>-api-key`), deleted with it (ownerReferences):

- missing: the operator writes a new key under `api-key` (Event KeyGenerated);
- `spec.apiKey.rotation` differs from the Secret's `signalbox.io/rotation` annotation: a new
  key goes under `api-key` and the old one under `previous-api-key`, valid until
  `signalbox.io/previous-key-expires` (now + gracePeriodSeconds; Event KeyRotated);
- edited by hand: whatever `api-key` holds is the key (bring your own), and removing the
  Secret revokes every key at once (a new one is made).

Only SHA-256 hashes go into the routing config (`core.keys`); the key never leaves its Secret,
and nothing here logs it. The Secrets carry the label CONSUMER_LABEL, which the operator
watches: a change reaches the gateways within one reconcile (debounce) and one config sync.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from signalbox.core.keys import (
    PREVIOUS_EXPIRES_ANNOTATION,
    PREVIOUS_SECRET_KEY,
    ROTATION_ANNOTATION,
    SECRET_KEY,
    generate_key,
    key_hash,
)
from signalbox.core.models import GROUP, VERSION
from signalbox.core.secrets import SecretValue

from .kube import ClusterAPI

CONSUMER_LABEL = "signalbox.io/consumer"


@dataclass
class ConsumerKeys:
    hashes: list[tuple[str, int]] = field(default_factory=list)
    # status fields: keySecret, keyRotation, previousKeyExpires
    status: dict[str, Any] = field(default_factory=dict)
    # (reason, message) Events to post on the Consumer
    events: list[tuple[str, str]] = field(default_factory=list)


def _iso(unix: int) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).isoformat().replace("+00:00", "Z")


def _owner(body: dict[str, Any]) -> dict[str, Any] | None:
    meta = body.get("metadata") or {}
    if not meta.get("uid"):
        return None
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Consumer",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": False,
    }


async def ensure(api: ClusterAPI, body: dict[str, Any], now: float) -> ConsumerKeys | None:
    """Make or rotate the consumer's key as its spec says; its hashes and status. None when the
    consumer has no operator-managed key (no `apiKey`, a local source, or an invalid spec: the
    compile reports that)."""
    spec = body.get("spec") or {}
    api_key = spec.get("apiKey")
    if not isinstance(api_key, dict) or api_key.get("env") or api_key.get("file"):
        return None
    meta = body.get("metadata") or {}
    namespace, name = meta.get("namespace") or "default", str(meta.get("name"))
    secret = str(api_key.get("secretName") or f"{name}-api-key")
    rotation = str(api_key.get("rotation") or "")
    try:
        grace = max(int(api_key.get("gracePeriodSeconds", 3600)), 0)
    except (TypeError, ValueError):
        return None
    out = ConsumerKeys()
    current = await api.secret_with_annotations(namespace, secret)
    labels = {CONSUMER_LABEL: name}
    if current is None or not current[0].get(SECRET_KEY):
        data = {SECRET_KEY: SecretValue(generate_key())}
        annotations = {ROTATION_ANNOTATION: rotation}
        await api.write_secret(namespace, secret, data, annotations, labels, _owner(body))
        out.events.append(("KeyGenerated", f"wrote a new API key to Secret {secret} (key {SECRET_KEY})"))
    else:
        data, annotations = current
        if annotations.get(ROTATION_ANNOTATION, "") != rotation:
            expires = int(now) + grace
            data = {SECRET_KEY: SecretValue(generate_key()), PREVIOUS_SECRET_KEY: data[SECRET_KEY]}
            annotations = {ROTATION_ANNOTATION: rotation, PREVIOUS_EXPIRES_ANNOTATION: str(expires)}
            await api.write_secret(namespace, secret, data, annotations, labels)
            out.events.append(
                (
                    "KeyRotated",
                    f"wrote a new API key to Secret {secret}; the previous one ({PREVIOUS_SECRET_KEY}) "
                    f"works until {_iso(expires)}",
                )
            )
    out.hashes.append((key_hash(data[SECRET_KEY].reveal()), 0))
    out.status = {"keySecret": secret, "keyRotation": rotation}
    previous = data.get(PREVIOUS_SECRET_KEY)
    try:
        expires = int(annotations.get(PREVIOUS_EXPIRES_ANNOTATION, "0"))
    except ValueError:
        expires = 0
    if previous is not None and previous.reveal() and expires > now:
        out.hashes.append((key_hash(previous.reveal()), expires))
        out.status["previousKeyExpires"] = _iso(expires)
    return out
