"""How a compiled RoutingConfig travels from the operator to the gateways in ConfigMaps.

A Kubernetes object holds at most about 1 MiB, and a fleet of thousands of policies compiles
to several MB of JSON. So the config travels as binary protobuf compressed with zlib (about a
twentieth of the JSON: names repeat), base64 text in ConfigMap `data` (the watch that
delivers it already reads `data`), and split across objects when it still does not fit:

- the *manifest* (`MANIFEST_KEY` in the routing ConfigMap) names the schema version, the
  generation, the content hash, the payload's SHA-256 and length, and its parts;
- a payload that fits rides inline in the same ConfigMap (`INLINE_KEY`): one object, one
  atomic write, as small configs always did;
- a larger one is cut into parts, each in its own immutable ConfigMap named after the
  payload's digest (`shard_name`), written *before* the manifest that names them.

A reader applies a config only when every part is there and the whole payload hashes to the
manifest's digest: a gateway never applies half of a sharded config, nor a mix of two. This
module is pure (no Kubernetes client); the operator writes and config-sync reads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from signalbox.api.v1alpha1 import config_pb2 as pb

from .errors import BundleError

MANIFEST_KEY = "manifest.json"
INLINE_KEY = "config.pb.zlib.b64"
PART_KEY = "part.b64"
ENCODING = "protobuf+zlib+base64"
# Base64 characters per object: ConfigMaps are capped at 1 MiB of data, and the object's
# metadata needs room too.
MAX_OBJECT_CHARS = 900_000
# Labels of part ConfigMaps: which routing ConfigMap they belong to (for garbage collection).
PART_OF_LABEL = "signalbox.io/routing-config"


@dataclass
class Bundle:
    manifest: dict[str, Any]
    inline: str | None = None
    parts: list[str] = field(default_factory=list)  # base64 text of each part, in order

    def part_names(self) -> list[str]:
        return list(self.manifest.get("parts", []))

    def configmap_data(self) -> dict[str, str | None]:
        """The routing ConfigMap's keys (None: remove the inline config, which parts replace)."""
        return {MANIFEST_KEY: json.dumps(self.manifest), INLINE_KEY: self.inline}


def shard_name(configmap: str, digest: str, index: int) -> str:
    """Content-addressed: a new payload never overwrites a part a reader may still be reading."""
    return f"{configmap}-{digest[:12]}-{index}"


def pack(cfg: pb.RoutingConfig, configmap: str, max_chars: int = MAX_OBJECT_CHARS) -> Bundle:
    payload = zlib.compress(cfg.SerializeToString(deterministic=True), 6)
    digest = hashlib.sha256(payload).hexdigest()
    text = base64.b64encode(payload).decode()
    manifest: dict[str, Any] = {
        "schemaVersion": cfg.schema_version,
        "generation": cfg.generation,
        "contentHash": cfg.content_hash,
        "encoding": ENCODING,
        "sha256": digest,
        "bytes": len(payload),
        "parts": [],
    }
    if len(text) <= max_chars:
        return Bundle(manifest, inline=text)
    step = max_chars - max_chars % 4  # each part decodes on its own
    parts = [text[i : i + step] for i in range(0, len(text), step)]
    manifest["parts"] = [shard_name(configmap, digest, i) for i in range(len(parts))]
    return Bundle(manifest, parts=parts)


def read_manifest(data: dict[str, str] | None) -> dict[str, Any]:
    raw = (data or {}).get(MANIFEST_KEY)
    if not raw:
        raise BundleError("the ConfigMap has no routing config manifest")
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BundleError(f"the manifest is not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("encoding") != ENCODING:
        raise BundleError(f"unknown routing config encoding (this gateway reads {ENCODING})")
    parts = manifest.get("parts", [])
    if not isinstance(parts, list) or not all(isinstance(p, str) and p for p in parts):
        raise BundleError("the manifest's parts are not a list of ConfigMap names")
    if not isinstance(manifest.get("sha256"), str) or type(manifest.get("bytes")) is not int:
        raise BundleError("the manifest has no payload digest and length")
    return manifest


def unpack(manifest: dict[str, Any], inline: str | None, parts: list[str | None]) -> pb.RoutingConfig:
    """The config the manifest describes, from the inline text or its parts (None: missing)."""
    if manifest.get("parts"):
        if len(parts) != len(manifest["parts"]) or any(p is None for p in parts):
            raise BundleError("a part of the routing config is missing")
        text = "".join(p for p in parts if p is not None)
    elif inline is not None:
        text = inline
    else:
        raise BundleError("the manifest names no parts and the ConfigMap holds no inline config")
    try:
        payload = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise BundleError("the routing config is not valid base64") from exc
    if hashlib.sha256(payload).hexdigest() != manifest.get("sha256") or len(payload) != manifest.get("bytes"):
        raise BundleError("the routing config does not match its manifest's digest (parts of two versions?)")
    cfg = pb.RoutingConfig()
    try:
        cfg.ParseFromString(zlib.decompress(payload))
    except (zlib.error, DecodeError) as exc:
        raise BundleError(f"the routing config cannot be decoded: {exc}") from exc
    return cfg
