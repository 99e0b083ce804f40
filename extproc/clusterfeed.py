"""Envoy's clusters for its ADS stream (delta CDS), from the file the publisher writes.

Why (issue 12): Envoy reads a file of clusters whole whenever it changes. At the 2,000-provider
fleet that file holds 17,712 clusters (4.5 MB of protobuf), and a policy over a new failover chain
cost Envoy 0.3-0.5 s of its main thread to re-read and compare all of them, for the five
aggregates the policy added. Over the ADS stream Envoy already holds for backend endpoints
(extproc.xds) only the clusters that changed travel.

The publisher (`signalbox up`, config-sync) still writes the file (gatewayfiles; a gateway
failing open still has Envoy read it itself, `GatewayOptions.endpoints_over_ads`): the worker
holding the stream reads it when it changes, and a cluster's version is a digest of its bytes.
A cluster that leaves the file leaves Envoy REMOVAL_GRACE_S later: the routes that named it
are replaced right after the clusters (gatewayfiles writes clusters, then routes), and a route
whose cluster has gone answers 503 until then.

Backend clusters a change adds must be in Envoy before the routes that name them: a route read
first names a cluster Envoy does not have (a 503 `routing_unavailable` until it arrives). So
once Envoy has ACKed every cluster of a file the stream read that it is to hold, the stream
writes that file's signature to HELD_FILE (`mark_held`), and the publisher writes the routes
only once it reads there the signature of the clusters it wrote (`wait_held`). The failover
chains are not among them: Envoy asks for a chain when a request first needs it (extproc.xds),
from a file the stream has read by then.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from .memtrim import release_free_memory
from .reload import file_signature, replace_text

log = logging.getLogger("signalbox.extproc.xds")

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
# How long a cluster gone from the file stays in Envoy (the routes naming it go meanwhile).
REMOVAL_GRACE_S = 2.0
# Beside the clusters' folder (in Envoy's config folder, which no one watches whole): the
# signature of the last cluster file whose clusters Envoy holds.
HELD_FILE = "clusters-held"
# How often a publisher waiting for Envoy to hold new clusters looks (`wait_held`).
HELD_POLL_S = 0.01


def held_file(cluster_file: str | Path) -> Path:
    """Where the stream says which cluster file Envoy holds (`cluster_file`: the publisher's,
    `<config dir>/cds/<file>`, envoygen.resource_file)."""
    return Path(cluster_file).parent.parent / HELD_FILE


def _said(signature: tuple[int, ...]) -> str:
    return " ".join(map(str, signature))


def held(cluster_file: str | Path) -> bool:
    """Whether Envoy holds the clusters of the file now at `cluster_file` (the stream wrote its
    signature to `held_file`)."""
    try:
        return held_file(cluster_file).read_text() == _said(file_signature(Path(cluster_file)))
    except OSError:
        return False  # not written yet


def wait_held(cluster_file: str | Path, timeout: float) -> bool:
    """Wait until Envoy holds the clusters of the file now at `cluster_file`; False after
    `timeout` seconds. While no stream ever said what Envoy holds, at once (True): an Envoy yet
    to start reads every file there is. Polls: the wait is a change's, ten milliseconds to a
    second."""
    if not held_file(cluster_file).exists():
        return True
    deadline = time.monotonic() + timeout
    while not held(cluster_file):
        if time.monotonic() >= deadline:
            return False
        time.sleep(HELD_POLL_S)
    return True


class ClusterFile:
    """The clusters in `path` (a binary DiscoveryResponse), read again when told it changed and
    only while some stream wants them: a worker holding no stream reads none of them.

    Only names, versions, each backend's endpoint resource, each chain's members and where each
    cluster sits in the file are kept (about 4 MB at the large fleet); the bytes are read from
    the file again when some are sent (a chain asked for from its span alone). Kept whole, they
    made the worker holding Envoy's stream 14 MB larger."""

    def __init__(self, path: str | Path | None, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path) if path else None
        self.clock = clock
        # name -> version (a digest of the packed Cluster's bytes), in the file's order, as the
        # file held them when last read.
        self.versions: dict[str, str] = {}
        # name -> the endpoint resource of each backend cluster (an EDS cluster in the file:
        # `endpoints.resource_name`), whose endpoint the stream writes into it (extproc.xds).
        self.endpoint_of: dict[str, str] = {}
        # name -> the member clusters of each failover chain (an aggregate cluster), in order:
        # a chain's backends go to Envoy with it (extproc.xds). Their names are the very
        # strings `versions` holds (not copies: 7,712 chains of five at the large fleet).
        self.members_of: dict[str, tuple[str, ...]] = {}
        # Names gone from the file, and when: removed from Envoy once REMOVAL_GRACE_S passed.
        self.gone: dict[str, float] = {}
        self.loaded = False  # read at least once (an Envoy starting waits for a first answer)
        # Where each cluster's Any is in the file as last read, in `versions`' order: a chain
        # asked for is read from there alone (`_at_positions`). Two arrays of integers, not a
        # tuple each (17,712 at the large fleet).
        self._starts = array("Q")
        self._lengths = array("Q")
        self.on_change: list[Callable[[], object]] = []
        self._signature: tuple[int, ...] | None = None
        self._held: tuple[int, ...] | None = None  # the signature last written to held_file
        self._stale = True

    @property
    def signature(self) -> tuple[int, ...] | None:
        """The signature (reload.file_signature) of the file as last read; None before."""
        return self._signature

    def mark_held(self, signature: tuple[int, ...]) -> None:
        """Say that Envoy holds every cluster of the file read with `signature` (its stream
        sent them and Envoy ACKed): the publisher waiting for it writes the routes (`wait_held`).
        A marker that cannot be written costs the publisher its wait, never the stream."""
        if self.path is None or signature == self._held:
            return
        target = held_file(self.path)
        try:
            replace_text(target, _said(signature))
        except OSError as exc:
            log.warning("cannot say which clusters Envoy holds in %s: %s", target, exc)
            return
        self._held = signature

    async def watch(self, stop: asyncio.Event) -> None:
        """Note each change of the file (its folder: the publisher moves a new file in). The
        file is read when a stream next wants the clusters, not here."""
        from watchfiles import awatch

        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)  # the publisher may start later
        self.changed()
        # A short step: this is on the way from a policy's change to Envoy (awatch yields once
        # no event came for `step` ms).
        async for _ in awatch(self.path.parent, stop_event=stop, debounce=50, step=5):
            if file_signature(self.path) != self._signature:
                self.changed()

    def changed(self) -> None:
        """The file (or its folder) changed: read it again on next use, and tell the streams."""
        self._stale = True
        for notify in self.on_change:
            notify()

    def current(self) -> dict[str, str]:
        """Each cluster's version now (reading the file if it changed since). A file that
        cannot be read or parsed keeps the clusters in force: Envoy keeps what it has."""
        if self._stale and self.path is not None:
            self._stale = False
            try:
                self._read(self.path)
            except Exception as exc:  # a half-written or foreign file must not end the stream
                log.error("keeping Envoy's clusters as they are: cannot read %s: %s", self.path, exc)
            finally:
                # The file is parsed whole (17,712 clusters, 4.5 MB at the large fleet), and
                # what that freed stayed in glibc's heap when nothing was sent after it (a new
                # chain goes only once asked for): 13 MB more of this worker after each such
                # change of the large fleet's config (memtrim).
                release_free_memory()
        return self.versions

    def _named(self, path: Path) -> Iterator[tuple[str, str, tuple[str, ...], str, bytes]]:
        """(name, endpoint resource or "", members, version, packed bytes) of each cluster in
        the file, in its order. A cluster seen before keeps what it was: only new ones are
        parsed (17,712 at the large fleet's start, a tenth of a second)."""
        known = {version: name for name, version in self.versions.items()}
        response = discovery_pb2.DiscoveryResponse.FromString(path.read_bytes())
        self._spans(response)
        for packed in response.resources:
            value = packed.value
            version = hashlib.blake2b(value, digest_size=8).hexdigest()
            name = known.get(version)
            if name is None:
                yield (*_described(cluster_pb2.Cluster.FromString(value)), version, value)
            else:  # what it was, the same objects (a re-read allocates only for what is new)
                yield name, self.endpoint_of.get(name, ""), self.members_of.get(name, ()), self.versions[name], value

    def _read(self, path: Path) -> None:
        seen = file_signature(path)
        if not seen or seen == self._signature:
            return  # not written yet, or the version already read
        now: dict[str, str] = {}
        endpoint_of: dict[str, str] = {}
        members_of: dict[str, tuple[str, ...]] = {}
        for name, endpoint, members, version, _ in self._named(path):
            now[name] = version
            if endpoint:
                endpoint_of[name] = endpoint
            if members:
                members_of[name] = members
        names = {name: name for name in now}  # one string per name, wherever it is kept
        self.members_of = {chain: _canonical(members, names) for chain, members in members_of.items()}
        self.endpoint_of = endpoint_of
        at = self.clock()
        for name in self.versions.keys() - now.keys():
            self.gone.setdefault(name, at)
        for name in now.keys() & self.gone.keys():
            del self.gone[name]
        self.versions, self._signature, self.loaded = now, seen, True

    def packed(self, names: set[str]) -> Iterator[tuple[str, str, bytes]]:
        """(name, version, bytes) of each of `names` that the file holds now, in the file's
        order, made as they are taken (a batch at a time, not 17,712 at once: that was 35 MB
        more of the worker at the large fleet's start). A file replaced since it was last read
        gives its own versions (each from its bytes)."""
        if self.path is None or not names:
            return
        try:
            found = self._at_positions(names)
            if found is None:  # replaced since it was read: every cluster's bytes digested again
                found = [(n, version, value) for n, _, _, version, value in self._named(self.path) if n in names]
            yield from found
        except Exception as exc:
            log.error("cannot read %s again: %s (what it held is sent on its next change)", self.path, exc)

    def _spans(self, response: discovery_pb2.DiscoveryResponse) -> None:
        """Where each resource's Any is in the file `response` was parsed from: after the
        version (field 1, written first), each one a tag byte, its length and its bytes (field
        2, in order). Worked out from the sizes, not by reading the bytes again; a span that is
        wrong is caught by the version check where it is read (`_at_positions`)."""
        self._starts, self._lengths = array("Q"), array("Q")
        version = response.version_info.encode()
        at = 1 + _varint_size(len(version)) + len(version) if version else 0
        for packed in response.resources:
            size = packed.ByteSize()
            at += 1 + _varint_size(size)
            self._starts.append(at)
            self._lengths.append(size)
            at += size

    def _at_positions(self, names: set[str]) -> list[tuple[str, str, bytes]] | None:
        """`names` taken where the file held them when it was read (its clusters are in
        `versions`' order), each read alone from its span and checked against its version; None
        if any differs (the file was replaced since). A chain Envoy asks for when a request
        needs it (extproc.xds) is one cluster: digesting all 17,712 to find it made such a
        request wait 38 ms at the 2,000-provider fleet, and parsing the whole file (5.5 MB) to
        take it 8 ms."""
        assert self.path is not None
        found = []
        with self.path.open("rb") as f:
            for position, name in enumerate(self.versions):
                if name not in names:
                    continue
                if position >= len(self._starts):
                    return None
                try:
                    packed = any_pb2.Any.FromString(
                        os.pread(f.fileno(), self._lengths[position], self._starts[position])
                    )
                except DecodeError:
                    return None
                version = hashlib.blake2b(packed.value, digest_size=8).hexdigest()
                if version != self.versions[name]:
                    return None
                found.append((name, version, packed.value))
        return found

    def due(self) -> bool:
        """Whether some name's grace ended since the last call (the streams then remove it).
        `gone` holds the names still in theirs: Envoy keeps those for now."""
        at = self.clock()
        ended = [name for name, since in self.gone.items() if at - since >= REMOVAL_GRACE_S]
        for name in ended:
            del self.gone[name]
        return bool(ended)


def _canonical(members: tuple[str, ...], names: dict[str, str]) -> tuple[str, ...]:
    """`members` naming each cluster by the one string kept for its name (the same tuple when
    it already does: a chain read before)."""
    if all(names.get(m, m) is m for m in members):
        return members
    return tuple(names.get(m, m) for m in members)


def _varint_size(value: int) -> int:
    """How many bytes protobuf's varint encoding of `value` takes."""
    return max(1, (value.bit_length() + 6) // 7)


def _described(cluster: cluster_pb2.Cluster) -> tuple[str, str, tuple[str, ...]]:
    """A cluster's name; for a backend cluster (EDS in the file) the endpoint resource it
    names (`endpoints.resource_name`: its service name, else its own); for a failover chain (an
    aggregate cluster) its members."""
    name = cluster.name  # one string for both when the resource is the cluster's own name
    if cluster.type == cluster_pb2.Cluster.EDS:
        return name, cluster.eds_cluster_config.service_name or name, ()
    if cluster.HasField("cluster_type"):
        config = aggregate_pb2.ClusterConfig()
        if cluster.cluster_type.typed_config.Unpack(config):
            return name, "", tuple(config.clusters)
    return name, "", ()


def cluster_resource(name: str, version: str, value: bytes) -> discovery_pb2.Resource:
    resource = discovery_pb2.Resource(name=name, version=version)
    resource.resource.type_url = CLUSTER_TYPE
    resource.resource.value = value
    return resource
