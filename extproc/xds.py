"""Envoy's clusters and backend endpoints over ADS (delta xDS), a resting backend's health in them.

Each backend cluster is an EDS cluster (envoygen.clusters, `GatewayOptions.endpoints_over_ads`); Envoy opens
one ADS stream to the ext_proc cluster, and whichever worker holds it answers from the routing
config in force, the shared cooldowns (extproc.cooldown: every worker and replica writes them)
and its own DNS lookups of the providers' host names. The clusters themselves come over the
same stream, from the file the publisher writes (extproc.clusterfeed): a change sends only the
clusters it added or altered.

Why not Envoy's active health checks, as before (issue 12): one check per backend cluster cost
Envoy about 19 KB per backend and the admin worker a connection each (1.0 GB and 141 MB at the
10,000-backend fleet), every backend started unhealthy until a first round of 10,000 checks had
passed through Python, and the interval had to grow with the fleet (100 s at 10,000), so a
429'd backend stayed in chains that long. Here a rest reaches Envoy within TICK_S whatever the
fleet's size, and only the endpoints that changed travel.

If the ext_proc is gone Envoy keeps the clusters and endpoints it has; a new stream (another
worker, or this one restarted) sends what differs from what Envoy says it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from signalbox.core.envoygen.endpoints import (
    LOAD_ASSIGNMENT_TYPE,
    REACHES,
    BackendEndpoint,
    parse_resource,
    resource_name,
)

from .clusterfeed import CLUSTER_TYPE, ClusterFile, cluster_resource
from .memtrim import release_free_memory
from .reload import TableHolder
from .strategies import SelectionState

log = logging.getLogger("signalbox.extproc.xds")

# How often rests (and configs) are looked at: the longest a new rest waits to reach Envoy.
TICK_S = 0.25
# How often a provider's host name is looked up again (Envoy's STRICT_DNS default is 5 s;
# hosted providers' addresses change rarely, and a failed lookup keeps the last addresses).
DNS_REFRESH_S = 30.0
# At most this many resources, and about this many bytes, per response: the first answer
# names every backend (10,000 at the large fleet), and the gRPC server's largest message is
# the body limit plus 1 MiB (a host name may resolve to many addresses).
BATCH = 1000
BATCH_BYTES = 256 * 1024

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve(host: str, port: int) -> list[str]:
    """The host's addresses, IPv4 first when it has any (as STRICT_DNS's V4_PREFERRED)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET]
    v6 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET6]
    return list(dict.fromkeys(v4 or v6))


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def load_assignment(endpoint: BackendEndpoint, addresses: list[str], resting: bool, reach: str = "") -> any_pb2.Any:
    """The assignment `BackendEndpoint.load_assignment` describes (one home for what a host says),
    as a message made by the message's constructor rather than json_format: 50 us an
    assignment was half a second of the worker holding Envoy's stream for the 10,000 backends
    Envoy asks for at the large fleet's start, on the way to its backends warming. The
    constructor takes the dict but for the hosts' metadata (Structs), filled in after."""
    assignment = endpoint.load_assignment(addresses, resting, reach)
    hosts = [host for group in assignment.get("endpoints", []) for host in group["lb_endpoints"]]
    metadata = [host.pop("metadata") for host in hosts]
    message = endpoint_pb2.ClusterLoadAssignment(**assignment)
    made = [host for group in message.endpoints for host in group.lb_endpoints]
    for host, meta in zip(made, metadata, strict=True):
        for namespace, fields in meta["filter_metadata"].items():
            host.metadata.filter_metadata[namespace].update(fields)
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class Endpoints:
    """The state every ADS stream sends from: per backend cluster, its endpoint, its addresses
    and whether it rests; streams are told which clusters may have changed."""

    def __init__(
        self,
        tables: TableHolder,
        state: SelectionState,
        resolver: Resolver = resolve,
        clusters: ClusterFile | None = None,
    ):
        self.tables = tables
        # Envoy's clusters (delta CDS on the same stream), when the publisher's file is known.
        self.clusters = clusters or ClusterFile(None)
        self.clusters.on_change.append(self._tell_clusters)
        self.state = state
        self.resolver = resolver
        self.addresses: dict[str, list[str]] = {}
        self._resolved_at: dict[str, float] = {}
        self._resolving: set[str] = set()
        self.resting: frozenset[str] = frozenset()
        self._streams: set[_Stream] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._table = tables.current
        # Host names to look up (IP literals need none), per config.
        self._hosts: dict[str, int] = {}
        self._hosts_of: object = None
        self._lookups: set[asyncio.Task[None]] = set()
        self._config_changed = asyncio.Event()
        tables.on_install.append(self._config_changed.set)

    def version(self, name: str) -> tuple[int, BackendEndpoint, list[str], bool, str] | None:
        """(version, endpoint, addresses, resting, reach) of the assignment of the resource
        `name` now (`endpoints.resource_name`: a backend cluster's name and how it reaches the
        backend; an origin's is answered with its listener only, a way the provider no longer
        takes with no host); None while the cluster is unknown (a config not loaded yet) or its
        host not looked up yet."""
        cluster, reach = parse_resource(name)
        backend = self._table.by_cluster.get(cluster)
        if backend is None or backend.endpoint is None or not reach:
            return None
        endpoint = backend.endpoint
        if reach != endpoint.reach:  # the origin's listener, or no host: no address to look up
            addresses: list[str] | None = []
        elif _literal(endpoint.host):
            addresses = [endpoint.host]
        else:
            addresses = self.addresses.get(endpoint.host)
        if addresses is None:
            return None
        resting = backend.id in self.resting
        return hash((endpoint, tuple(addresses), resting, reach)), endpoint, addresses, resting, reach

    # ------------------------------------------------------------------ streams

    def opened(self, stream: _Stream) -> None:
        self._streams.add(stream)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())

    def closed(self, stream: _Stream) -> None:
        self._streams.discard(stream)

    def _tell(self, clusters: list[str] | None) -> None:
        """Wake the streams: `clusters` may have changed (None: any of them). A list, read once
        per stream (a stream that reconnects overlaps the one it replaces)."""
        for stream in self._streams:
            stream.changed(clusters)

    def _tell_clusters(self) -> None:
        for stream in self._streams:
            stream.clusters_changed()

    async def _watch(self) -> None:
        while self._streams:
            try:
                self._look()
            except Exception:
                log.exception("endpoint watch failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._config_changed.wait(), TICK_S)

    def _look(self) -> None:
        if self.clusters.due():
            self._tell_clusters()  # clusters gone from the file leave Envoy now
        if self._config_changed.is_set() or self.tables.current is not self._table:
            self._config_changed.clear()
            self._table = self.tables.current
            self._tell(None)
        now = time.time()
        resting = frozenset(self.state.cooling())
        if resting != self.resting:
            changed = resting ^ self.resting
            self.resting = resting
            backends = [b for b in (self._table.backends.get(i) for i in changed) if b is not None]
            self._tell([resource_name(b.cluster, reach) for b in backends for reach in REACHES])
        if self._hosts_of is not self._table:
            self._hosts_of = self._table
            self._hosts = {
                b.endpoint.host: b.endpoint.port
                for b in self._table.backends.values()
                if b.endpoint and not _literal(b.endpoint.host)
            }
        for host, port in self._hosts.items():
            if host not in self._resolving and now - self._resolved_at.get(host, float("-inf")) >= DNS_REFRESH_S:
                self._resolving.add(host)
                task = asyncio.create_task(self._lookup(host, port))
                self._lookups.add(task)
                task.add_done_callback(self._lookups.discard)

    async def _lookup(self, host: str, port: int) -> None:
        try:
            found = await self.resolver(host, port)
        except (OSError, UnicodeError) as exc:
            found = None
            log.warning("cannot look up %s: %s (keeping %s)", host, exc, self.addresses.get(host) or "no address")
        finally:
            self._resolving.discard(host)
            self._resolved_at[host] = time.time()
        if found is None:
            found = self.addresses.get(host, [])  # never looked up: a cluster with no host, as STRICT_DNS
        if found != self.addresses.get(host):
            self.addresses[host] = found
            self._tell(None)


class _Stream:
    """One ADS stream: what Envoy subscribed to, and what it was last sent."""

    def __init__(self, endpoints: Endpoints):
        self.endpoints = endpoints
        self.subscribed: set[str] = set()
        self.sent: dict[str, int] = {}
        self.dirty: set[str] = set()
        self.everything = False
        # Clusters (delta CDS, a wildcard subscription): what Envoy holds, name -> version.
        self.cds = False
        self.cds_sent: dict[str, str] = {}
        self.cds_dirty = False
        self.cds_answered = False
        self.wake = asyncio.Event()
        self.done = False
        self._nonces = itertools.count(1)

    def changed(self, clusters: Iterable[str] | None) -> None:
        if clusters is None:
            self.everything = True
        else:
            self.dirty.update(clusters)
        self.wake.set()

    def clusters_changed(self) -> None:
        if self.cds:
            self.cds_dirty = True
            self.wake.set()

    async def read(self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]) -> None:
        try:
            async for request in requests:
                if request.type_url == CLUSTER_TYPE:
                    self._cluster_request(request)
                    continue
                if request.type_url != LOAD_ASSIGNMENT_TYPE:
                    continue  # clusters and endpoints are served here; Envoy asks for nothing else
                if request.error_detail.code:
                    log.error(
                        "Envoy refused endpoints (nonce %s): %s", request.response_nonce, request.error_detail.message
                    )
                gone = set(request.resource_names_unsubscribe)
                self.subscribed -= gone
                for name in gone:
                    self.sent.pop(name, None)
                new = set(request.resource_names_subscribe)
                self.subscribed |= new
                if new:
                    self.changed(new)
        finally:
            self.done = True
            self.wake.set()

    def _cluster_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        if request.error_detail.code:
            # Envoy keeps the clusters it had; the same bytes would be refused again.
            log.error("Envoy refused clusters (nonce %s): %s", request.response_nonce, request.error_detail.message)
        if not self.cds:
            # The first request subscribes to every cluster; a reconnecting Envoy says what it
            # holds, so only what differs is sent again.
            if self.endpoints.clusters.path is None:
                log.error("Envoy asks for its clusters over ADS, but this worker was not given their file (--clusters)")
            self.cds = True
            self.cds_sent = dict(request.initial_resource_versions)
            self.clusters_changed()

    def _cluster_responses(self) -> Iterator[discovery_pb2.DeltaDiscoveryResponse]:
        """The clusters that differ from what Envoy holds, and those gone past their grace
        (clusterfeed), BATCH at a time. Nothing until the file was read once: an Envoy
        starting waits for its first clusters."""
        feed = self.endpoints.clusters
        current = feed.current()
        self.cds_dirty = False
        if not feed.loaded:
            return
        removed = sorted(name for name in self.cds_sent if name not in current and name not in feed.gone)
        for name in removed:
            del self.cds_sent[name]
        wanted = {name for name, version in current.items() if self.cds_sent.get(name) != version}

        def sent() -> Iterator[discovery_pb2.Resource]:
            for name, version, value in feed.packed(wanted):
                self.cds_sent[name] = version
                yield cluster_resource(name, version, value)

        yield from self._batches(sent(), CLUSTER_TYPE, removed, always=not self.cds_answered)
        self.cds_answered = True
        if len(wanted) >= BATCH:
            release_free_memory()  # what reading and sending them took, once sent (memtrim)

    def responses(self) -> Iterator[discovery_pb2.DeltaDiscoveryResponse]:
        """What changed since the last call: clusters first (Envoy asks for a new cluster's
        endpoints once it has the cluster), then the endpoints of the subscribed clusters,
        BATCH at a time (built as they are sent: the first answer names every backend). An
        endpoint not known yet stays dirty, asked again on the next change (a new config)."""
        if self.cds_dirty:
            yield from self._cluster_responses()
        names = set(self.subscribed) if self.everything else self.dirty & self.subscribed
        self.everything, self.dirty = False, set()

        def changed() -> Iterator[discovery_pb2.Resource]:
            for name in sorted(names):
                now = self.endpoints.version(name)
                if now is None:
                    self.dirty.add(name)
                    continue
                version, endpoint, addresses, resting, reach = now
                if self.sent.get(name) == version:
                    continue
                self.sent[name] = version
                yield discovery_pb2.Resource(
                    name=name, version=str(version), resource=load_assignment(endpoint, addresses, resting, reach)
                )

        yield from self._batches(changed(), LOAD_ASSIGNMENT_TYPE)

    def _batches(
        self,
        resources: Iterable[discovery_pb2.Resource],
        type_url: str,
        removed: list[str] | None = None,
        always: bool = False,
    ) -> Iterator[discovery_pb2.DeltaDiscoveryResponse]:
        """`resources` in responses of at most BATCH resources and about BATCH_BYTES (the last
        one names `removed`); one even with nothing in it when `always`."""
        batch: list[discovery_pb2.Resource] = []
        size = 0
        for resource in resources:
            batch.append(resource)
            size += resource.ByteSize()
            if len(batch) == BATCH or size >= BATCH_BYTES:
                yield self._response(batch, type_url)
                batch, size = [], 0
        if batch or removed or always:
            yield self._response(batch, type_url, removed or [])

    def _response(
        self, resources: list[discovery_pb2.Resource], type_url: str, removed: Iterable[str] = ()
    ) -> discovery_pb2.DeltaDiscoveryResponse:
        return discovery_pb2.DeltaDiscoveryResponse(
            type_url=type_url, resources=resources, removed_resources=removed, nonce=str(next(self._nonces))
        )


class AggregatedDiscovery(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """The ADS service on every ext_proc worker (Envoy holds one stream, to one of them)."""

    def __init__(self, endpoints: Endpoints):
        self.endpoints = endpoints

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: Any
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        stream = _Stream(self.endpoints)
        self.endpoints.opened(stream)
        reader = asyncio.create_task(stream.read(request_iterator))
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if stream.done:
                    break
                for response in stream.responses():
                    yield response
        finally:
            reader.cancel()
            self.endpoints.closed(stream)

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        await context.abort(12, "signalbox serves delta xDS only (ads_config.api_type: DELTA_GRPC)")  # UNIMPLEMENTED
        yield discovery_pb2.DiscoveryResponse()  # pragma: no cover - abort raises
