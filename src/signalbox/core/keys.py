"""The one home of the gateway API key format: how a consumer's key is made and hashed.

The operator makes keys with `generate_key`, `signalbox up` hashes local keys with `key_hash`,
and the ext_proc checks presented keys with it. Only hashes leave the Secret (or local file):
a config, a log or a status that holds one cannot be used to call the gateway. Light on
purpose (no pydantic): the ext_proc imports it.
"""

from __future__ import annotations

import hashlib
import secrets

# Gateway keys look like provider keys (a prefix, then 43 URL-safe characters: 256 bits), so
# secret scanners and people recognise them.
KEY_PREFIX = "sbx-"
# The Secret keys the operator writes: the key in force, and the one being rotated out.
SECRET_KEY, PREVIOUS_SECRET_KEY = "api-key", "previous-api-key"
# Annotations on that Secret: the consumer's `spec.apiKey.rotation` the key was made for, and
# the Unix time after which the previous key stops working.
ROTATION_ANNOTATION = "signalbox.io/rotation"
PREVIOUS_EXPIRES_ANNOTATION = "signalbox.io/previous-key-expires"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    """SHA-256 (hex) of a key. Keys are 256-bit random, so a plain hash is enough: no salt or
    slow hash is needed against guessing, and the check costs microseconds per request."""
    return hashlib.sha256(key.strip().encode()).hexdigest()
