"""The files a gateway pod's Envoy and ext_proc watch, written the same way everywhere.

`signalbox up` writes them after each local compile; in a cluster `signalbox config-sync`
writes them from the operator's ConfigMap. Order matters: the routing config first (the
ext_proc must know a backend before Envoy routes to it), then clusters, then the listener that
references them; each file is replaced by an atomic rename, so no reader sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import orjson

from signalbox import xdsbinary
from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core import envoygen
from signalbox.core.errors import CredentialUnavailable
from signalbox.extproc import clusterfeed
from signalbox.extproc.reload import file_signature
from signalbox.extproc.runtime import KeyResolver, default_key_resolver
from signalbox.xdsbinary import KeyedEncoder, ResourceEncoder, RouteTableEncoder

# The compiled config as binary protobuf: the ext_proc workers parse it on every change, and at
# the 2,000-provider fleet its JSON (7.7 MB) took 0.8 s to parse and 0.6 s to write, against
# milliseconds for the 2.2 MB of protobuf (issue 12).
CONFIG_FILE = "config/routing-config.pb"
ENVOY_DIR = "envoy"  # Envoy's resource files, each in a folder of its own (envoygen.resource_file)
# What the ext_proc workers of one gateway share (SQLite files: budget spend, learning; see
# signalbox.extproc.sharedstate). Not under config/: the ext_proc reloads on every change there.
STATE_DIR = "state"
# Provider keys as attempt.lua reads them (one file per provider), and as config-sync copies
# them from Secrets (<ns>/<name>/<key>).
CREDENTIALS_DIR = "credentials"
SECRETS_DIR = "secrets"
# How often the publishers (`signalbox up`, config-sync) ask for a fresh access token for
# providers whose credentials mint them. google-auth renews a token 3 min 45 s before it
# expires, so a minute leaves Envoy minutes of overlap.
TOKEN_REFRESH_SECONDS = 60.0
# The longest routes wait for Envoy to hold the clusters they name (`write_envoy_files`): it
# takes a tenth of a second to a second with Envoy connected, and an Envoy not connected to any
# worker reads every file when it is.
HELD_WAIT_S = 5.0
_CLUSTERS_FOLDER = Path(envoygen.resource_file("", "cds.json")).parent.name

log = logging.getLogger("signalbox.gatewayfiles")


def write_atomic(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Replace `path` by a file holding `data` (text as UTF-8), created with `mode` before
    anything is written to it: no reader sees half a file, and a key is never readable by more
    than its mode allows. Four system calls a file, not eight: `signalbox up` writes a key file
    per provider at start (2,000 took 0.59 s)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a stale one may have another mode: ours is created new
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data if isinstance(data, bytes) else data.encode())
    os.replace(tmp, path)


def write_credentials(cfg: pb.RoutingConfig, options: envoygen.GatewayOptions, resolve_key: KeyResolver) -> None:
    """One file per keyed provider, holding the whole header value (prefix and key), which
    attempt.lua adds inside Envoy on every attempt to that provider (read again at most once
    a second). The directory is memory-backed in a pod; keys never appear in Envoy's config.

    A key that cannot be read gets an empty file: the ext_proc never routes to such a provider
    (it reports why), and a failover attempt there ends with 503 provider_key_unavailable
    instead of a keyless call.

    A provider whose credentials mint access tokens (Vertex AI) gets the current token; the
    publishers call this again every `TOKEN_REFRESH_SECONDS`, and a file changes only when
    google-auth minted a new token (minutes before the old one expires). A token that cannot be
    minted leaves the file as it is: the token in it may still be good, and when it is not, the
    provider answers 401, which fails over and rests the backend.
    """
    if not options.credentials_dir:
        return
    for provider in cfg.providers:
        if not provider.HasField("auth"):
            continue
        key = resolve_key(provider.auth)
        try:
            value = provider.auth.prefix + key.reveal() if key else ""
        except CredentialUnavailable as exc:
            log.warning("provider %s: %s", provider.id, exc)
            continue
        path = Path(envoygen.credential_file(options.credentials_dir, provider.id))
        digest = hashlib.blake2b(value.encode(), digest_size=16).digest()
        if _written.get(str(path)) == (digest, file_signature(path)):
            continue  # as this process wrote it, untouched since (a stat, not a read of each)
        if not path.exists() or path.read_text() != value:
            write_atomic(path, value, mode=0o600)
        _written[str(path)] = (digest, file_signature(path))


# Each key file this process wrote or found as it would write it: a digest of its content and
# the file's stat then. Every change of the config checked every keyed provider's file by
# reading it, 2,000 files and 0.09-0.11 s of each change at the 2,000-provider fleet.
_written: dict[str, tuple[bytes, tuple[int, ...]]] = {}


def publish(
    cfg: pb.RoutingConfig,
    workdir: Path,
    options: envoygen.GatewayOptions,
    resolve_key: KeyResolver | None = None,
    envoy: bool = True,
    backends_first: bool = False,
    credentials: bool = True,
) -> None:
    """Keys first (Envoy must have a credential before a cluster names it), then the routing
    config (the ext_proc must know a backend before Envoy routes to it), then Envoy's resources
    (`envoy=False`: not yet, see `write_envoy`; `backends_first`: for an Envoy about to start,
    see `write_envoy_backends_first`). `credentials=False`: the caller writes the keys itself,
    before any listener and routes that reach them (`signalbox up`'s start, which writes them
    while Envoy warms)."""
    if credentials:
        write_credentials(cfg, options, resolve_key or default_key_resolver(str(workdir / SECRETS_DIR)))
    write_atomic(workdir / CONFIG_FILE, cfg.SerializeToString())
    if envoy and backends_first and options.endpoints_over_ads:
        write_envoy_backends_first(cfg, workdir, options)
    elif envoy:
        write_envoy(cfg, workdir, options)


def write_envoy(cfg: pb.RoutingConfig, workdir: Path, options: envoygen.GatewayOptions) -> None:
    """Envoy's clusters, then the routes that name them, then the listener that reads the
    routes. A file whose content did not change is not rewritten: Envoy would parse it again
    (the clusters are 20 MB at the 2,000-provider fleet) to find nothing to do."""
    config_dir = str(workdir / ENVOY_DIR)
    parts = envoygen.resource_parts(cfg, options, config_dir)
    write_envoy_files(_encode_files(config_dir, parts), over_ads=options.endpoints_over_ads)
    # Only now are the parts freed: the 2,000-provider fleet's dicts took 0.1 s to free, which
    # Envoy no longer waits for.
    del parts


def envoy_files(cfg: pb.RoutingConfig, workdir: Path, options: envoygen.GatewayOptions) -> dict[Path, bytes]:
    """Envoy's resource files' paths and contents, in the order they are written."""
    config_dir = str(workdir / ENVOY_DIR)
    return _encode_files(config_dir, envoygen.resource_parts(cfg, options, config_dir))


def _encode_files(config_dir: str, parts: envoygen.ResourceParts) -> dict[Path, bytes]:
    """Clusters and routes converted once per key (`envoygen.ResourceParts`): a change converts
    what it added or altered, not the 2,000-provider fleet's 17,712 clusters and 6,600 routes
    made as dicts and digested as JSON again (0.2 s of the path from a change to Envoy)."""
    assert parts.routes is not None  # Envoy reads its routes from a file of their own
    encoded = {
        "cds.json": _clusters.encode(parts.clusters),
        "rds.json": _routes.encode(parts.routes),
        "lds.json": _encode("lds.json", parts.listeners),
    }
    return {Path(envoygen.resource_file(config_dir, n)): encoded[n] for n in envoygen.RESOURCE_FILES}


# One per binary document in a publishing process (`signalbox up`, config-sync): each keeps
# what it converted. Clusters and routes are encoded from their keyed parts, converting what
# the backends-first start already converted once.
_encoders = {name: ResourceEncoder() for name in envoygen.BINARY_FILES}
_clusters = KeyedEncoder(_encoders["cds.json"])
_routes = RouteTableEncoder(_encoders["rds.json"])


def _encode(name: str, document: dict[str, Any]) -> bytes:
    """An Envoy resource file: binary protobuf where Envoy reads it so
    (`envoygen.BINARY_FILES`), else UTF-8 JSON (orjson: the 2,000-provider fleet's files in
    0.04 s, not 0.23 s, on every change)."""
    if name in envoygen.BINARY_FILES:
        return _encoders[name].encode(document)
    return orjson.dumps(document)


def read_envoy_file(config_dir: str | Path, name: str) -> dict[str, Any]:
    """A resource document as Envoy reads it from `config_dir`, decoded to JSON's shape."""
    path = Path(envoygen.resource_file(str(config_dir), name))
    return xdsbinary.decode(path.read_bytes()) if name in envoygen.BINARY_FILES else orjson.loads(path.read_bytes())


def write_envoy_files(files: dict[Path, bytes], over_ads: bool = False) -> None:
    """Each file that changed, in order (clusters, routes, listener). `over_ads`: Envoy gets its
    clusters from the ext_proc's stream, not from their file, so new clusters would reach it
    after the routes naming them; whatever follows the clusters waits until Envoy holds them
    (`clusterfeed.wait_held`, at most HELD_WAIT_S)."""
    waited = not over_ads
    for path, data in files.items():
        if path.exists() and path.read_bytes() == data:
            continue
        if not waited and path.parent.name != _CLUSTERS_FOLDER:
            waited = True
            clusters = next((p for p in files if p.parent.name == _CLUSTERS_FOLDER), None)
            if clusters is not None and not clusterfeed.wait_held(clusters, HELD_WAIT_S):
                log.warning(
                    "Envoy did not say it holds the new clusters within %.0f s: writing the routes anyway", HELD_WAIT_S
                )
        write_atomic(path, data)


def write_envoy_backends_first(cfg: pb.RoutingConfig, workdir: Path, options: envoygen.GatewayOptions) -> None:
    """Envoy's files for its start when backend endpoints come over ADS: the backend clusters
    alone, no routes and no listener. The full files follow once they have warmed
    (`envoyadmin.clusters_warm`, then `write_envoy`).

    Why: an aggregate cluster (a failover chain) is told of every cluster that becomes active
    after it, on every Envoy worker. Given all at once, the chains are active at once and the
    backend clusters only when their endpoints arrive, so each of 10,000 backends was shown to
    each of 7,712 chains: 10.6 s of Envoy's main thread at the 2,000-provider fleet (0.8 s with
    the backends first; bench/README.md). Over ADS only compiled policies' backends: Envoy holds
    the others only once a request asks for a chain naming them (extproc.xds), and making the
    fleet's 4,286 of those here held up Envoy's start."""
    config_dir = str(workdir / ENVOY_DIR)
    specs = envoygen.backend_cluster_specs(cfg, options, compiled_only=options.endpoints_over_ads)
    first: dict[str, bytes] = {
        # Keyed as the whole files' clusters are: those reuse what this converted.
        "cds.json": _clusters.encode(specs),
        "rds.json": _encode("rds.json", {"resources": []}),
        "lds.json": _encode("lds.json", {"resources": []}),
    }
    for name in envoygen.RESOURCE_FILES:
        write_atomic(Path(envoygen.resource_file(config_dir, name)), first[name])


def write_bootstrap(workdir: Path, options: envoygen.GatewayOptions) -> Path:
    path = workdir / "envoy-bootstrap.json"
    write_atomic(path, json.dumps(envoygen.bootstrap(options, str(workdir / ENVOY_DIR))))
    return path


def mints_tokens(cfg: pb.RoutingConfig) -> bool:
    """Whether any provider's credentials mint access tokens (so its file needs refreshing)."""
    return any(p.auth.format == pb.GOOGLE_CREDENTIALS for p in cfg.providers if p.HasField("auth"))


def refresh_tokens(
    cfg: pb.RoutingConfig, workdir: Path, options: envoygen.GatewayOptions, resolve_key: KeyResolver | None = None
) -> None:
    """Rewrite the credential files of token-minting providers whose token google-auth renewed
    (a no-op for a config without such providers). Called by the publishers on a timer."""
    if mints_tokens(cfg):
        write_credentials(cfg, options, resolve_key or default_key_resolver(str(workdir / SECRETS_DIR)))
