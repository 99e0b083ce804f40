"""Envoy's clusters over ADS (delta CDS), each backend's endpoint and a resting backend's health in them.

Envoy opens one ADS stream to the ext_proc cluster, and whichever worker holds it sends the
clusters of the file the publisher writes (extproc.clusterfeed: a change sends only the
clusters it added or altered). A backend cluster is an EDS cluster in that file
(envoygen.clusters, `GatewayOptions.endpoints_over_ads`): its endpoint is the ext_proc's to
give. The worker writes it into the cluster on the way, from the routing config in force, the
shared cooldowns (extproc.cooldown: every worker and replica writes them) and its own DNS
lookups of the providers' host names, and Envoy gets a STATIC cluster with its endpoint inline.
A rest, its end or new addresses send the backend's cluster again.

Why inline rather than Envoy asking for each cluster's endpoints over EDS, as before (issue 12):
an EDS cluster cost Envoy about 8.5 KB more than the same cluster with its endpoint inline (its
subscription, watch and the assignment it keeps): at the 10,000-backend fleet Envoy 649 against
564 MB, for the same hosts. A changed cluster is built again by Envoy (its connection pools
drain, its outlier detection starts again), which a rest, rare and taking the backend out
anyway, can afford. The cluster and its endpoint now travel in one message, so a cluster can
never hold an address meant for another way of reaching its backend (`endpoints.REACHES`).

Why not Envoy's active health checks, as before that (issue 12): one check per backend cluster
cost Envoy about 19 KB per backend and the admin worker a connection each (1.0 GB and 141 MB at
the 10,000-backend fleet), every backend started unhealthy until a first round of 10,000 checks
had passed through Python, and the interval had to grow with the fleet (100 s at 10,000), so a
429'd backend stayed in chains that long. Here a rest reaches Envoy within TICK_S whatever the
fleet's size, and only the clusters that changed travel.

The failover chains (aggregate clusters, `TARGET_PREFIX`) of decided policies go only to an
Envoy that asks for them by name: its listener's on_demand filter asks for a route's chain the
first time a request needs it (on-demand CDS, envoygen.listener), and the stream sends it then
(issue 12). Every aggregate registers a callback Envoy's cluster manager runs for each cluster
added after it, so holding the 2,000-provider fleet's 7,712 chains cost Envoy's main thread
1.6 s of the start (quadratic in their number) and 182 MB, for chains most of which no request
uses. A compiled policy's chains are sent unasked (`Endpoints.eager_chains`): Envoy routes
those requests alone, and they keep being served while no worker can answer Envoy's asking.
So are their backend clusters (`Endpoints.eager_backends`); a backend only decided policies
route to goes with the first chain asked for that names it, in an answer before the chain's
(`_Stream._batches`). At the 2,000-provider fleet that is 4,286 of the 10,000 backend clusters
Envoy no longer holds from its start, at 23 KB or more each; in a fleet of decided policies
(the default strategy is cost) Envoy holds only the backends requests have gone to.

If the ext_proc is gone Envoy keeps the clusters it has; a new stream (another worker, or this
one restarted) sends what differs from what Envoy says it holds, and the chains it asks for
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import itertools
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format

from signalbox.core.envoygen.contract import TARGET_PREFIX, chain_groups, split_pairs
from signalbox.core.envoygen.endpoints import REACHES, TLS, BackendEndpoint, parse_resource, resource_name

from .clusterfeed import CLUSTER_TYPE, ClusterFile, cluster_resource
from .memtrim import release_free_memory
from .reload import TableHolder
from .runtime import BackendRuntime, RuntimeTable
from .strategies import SelectionState

log = logging.getLogger("signalbox.extproc.xds")

# How often rests (and configs) are looked at: the longest a new rest waits to reach Envoy.
TICK_S = 0.25
# A backend's assignment as the stream sends it (`Endpoints.assignment`): (version, the backend,
# its addresses, whether it rests, how its cluster reaches it).
Assignment = tuple[str, BackendRuntime, Sequence[str], bool, str]
# In a delta subscription, the name that asks for every resource.
WILDCARD = "*"
# The names of the failover chains, sent only when asked for (on-demand CDS).
CHAIN_PREFIX = f"{TARGET_PREFIX}."
# How often a provider's host name is looked up again (Envoy's STRICT_DNS default is 5 s;
# hosted providers' addresses change rarely, and a failed lookup keeps the last addresses).
DNS_REFRESH_S = 30.0
# At most this many resources, and about this many bytes, per response: the first answer
# names every backend (10,000 at the large fleet), and the gRPC server's largest message is
# the body limit plus 1 MiB (a host name may resolve to many addresses).
BATCH = 1000
BATCH_BYTES = 256 * 1024
# How long a stream's first answer waits for every backend cluster's endpoint (the worker's
# config loaded, its host names looked up): Envoy starts serving once it has its first clusters,
# so a first answer without some backends would serve without them; Envoy's own wait for an EDS
# cluster's endpoints (initial_fetch_timeout) is 15 s too.
FIRST_ANSWER_WAIT_S = 15.0

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


def load_assignment(
    endpoint: BackendEndpoint, addresses: Sequence[str], resting: bool, reach: str = ""
) -> endpoint_pb2.ClusterLoadAssignment:
    """The assignment `BackendEndpoint.load_assignment` describes (one home for what a host says),
    as a message made by the message's constructor rather than json_format: 50 us an
    assignment was half a second of the worker holding Envoy's stream for the 10,000 backends
    of the large fleet's start, on the way to its backends. With the resting listener as its
    refusing host (`refusing`), which a TLS cluster's host reaches by its metadata: a Struct,
    which the constructor does not take as JSON (few backends keep a TLS cluster of their
    own: `endpoints.ORIGIN_MIN_BACKENDS`)."""
    said = endpoint.load_assignment(addresses, resting, reach, refusing=True)
    if (reach or endpoint.reach) == TLS:
        return json_format.ParseDict(said, endpoint_pb2.ClusterLoadAssignment())
    return endpoint_pb2.ClusterLoadAssignment(**said)


def with_endpoint(value: bytes, assignment: endpoint_pb2.ClusterLoadAssignment) -> bytes:
    """A backend cluster of the file (EDS, `value` its bytes) as Envoy gets it: STATIC, its
    endpoint inline."""
    cluster = cluster_pb2.Cluster.FromString(value)
    cluster.ClearField("eds_cluster_config")
    cluster.type = cluster_pb2.Cluster.STATIC
    cluster.load_assignment.CopyFrom(assignment)
    cluster.load_assignment.cluster_name = cluster.name
    return cluster.SerializeToString()


class Endpoints:
    """The state every ADS stream sends from: the clusters of the file and, per backend
    cluster, its endpoint, its addresses and whether it rests; streams are told when any of
    them may have changed."""

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
        # `version` by resource, until what it depends on changes (the config, a host's
        # addresses, a backend's rest): every change of any cluster compares them all, 10,000
        # at the large fleet (50 ms each time, made afresh).
        # Only the version is kept (the assignment is made again when sent, `assignment`): a
        # tuple per backend Envoy holds was 1.5 MB of this worker at the large fleet.
        self._versions: dict[str, str | None] = {}
        # What Envoy holds unasked, for the table and the file's chains they were worked out
        # from (`_eager_for`): both at once, so neither keeps a table or a file's chains gone.
        self._eager: frozenset[str] = frozenset()
        self._eager_backends: frozenset[str] = frozenset()
        self._eager_of: tuple[object, object] = (None, None)

    def eager_chains(self) -> frozenset[str]:
        """The chains Envoy is to hold before a request asks for them: those compiled policies'
        routes send to, which Envoy routes without the ext_proc (they keep serving while it is
        down, and a chain asked for needs the stream), unless the route walks them by priority
        groups (`contract.chain_groups`, which the generator applied to the same chains): then
        Envoy needs only their backends (`eager_backends`), and the aggregate waits for a
        request the router phase decided for the policy anyway. A decided policy's chains wait
        for a request: it needs the ext_proc to be decided at all."""
        self._eager_for(self.tables.current, self.clusters.members_of)
        return self._eager

    def eager_backends(self) -> frozenset[str]:
        """The backend clusters Envoy is to hold before a request asks for anything: compiled
        policies' backends and the members of the chains it holds unasked (`eager_chains`).
        Every other backend the config knows goes to Envoy with the first chain asked for that
        names it (a decided policy's), or never: a route only ever names a chain, and a chain
        names its backends. (A backend of a file newer than the config is held back until the
        config comes, as ever: `lazy`.)"""
        self._eager_for(self.tables.current, self.clusters.members_of)
        return self._eager_backends

    def _eager_for(self, table: RuntimeTable, members_of: dict[str, tuple[str, ...]]) -> None:
        """Work out `eager_chains` and `eager_backends` again if the table or the file's chains
        changed. Together: the backends' were asked for only while some backend was not held,
        and until then kept the table and the chains they were worked out from (2 MB of the
        worker holding the stream at the large fleet, after traffic to every alias)."""
        if self._eager_of[0] is table and self._eager_of[1] is members_of:
            return
        self._eager_of = (table, members_of)
        eager: set[str] = set()
        for policy in table.policies:
            if policy.compiled and policy.split:
                split = split_pairs(policy.split)
                if chain_groups(split, members_of) is None:
                    eager.update(target for target, _ in split)
        self._eager = frozenset(eager)
        empty: tuple[str, ...] = ()
        self._eager_backends = frozenset(
            (
                *(c.backend.cluster for p in table.policies if p.compiled for c in p.choices),
                *(m for chain in self._eager for m in members_of.get(chain, empty)),
            )
        )

    def lazy(self, name: str) -> bool:
        """Whether backend cluster `name` waits for a chain asked for that names it: the config
        in force knows it, and Envoy is not to hold it unasked (`eager_backends`)."""
        return name in self._table.by_cluster and name not in self.eager_backends()

    def version(self, name: str) -> str | None:
        """The version of the assignment of the resource `name` now (`assignment`), None
        while there is none. The same in every worker: a reconnecting Envoy names what it
        holds, and a worker resends only what differs."""
        if name not in self._versions:
            made = self.assignment(name)
            self._versions[name] = made[0] if made is not None else None
        return self._versions[name]

    def assignment(self, name: str) -> Assignment | None:
        """(version, backend, addresses, resting, reach) of the assignment of the resource
        `name` now (`endpoints.resource_name`: a backend cluster's name and how it reaches the
        backend; an origin's is answered with its listener only, a way the provider no longer
        takes with no host); None while the cluster is unknown (a config not loaded yet) or its
        host not looked up yet."""
        cluster, reach = parse_resource(name)
        backend = self._table.by_cluster.get(cluster)
        if backend is None and self.tables.previous is not None:
            # A backend of the config before, whose routes Envoy may still have: a request
            # decided by it (`TableHolder.for_routes`) asks for a chain that names it.
            backend = self.tables.previous.by_cluster.get(cluster)
        if backend is None or not reach:
            return None
        endpoint = backend.endpoint
        addresses: Sequence[str] | None
        if reach != endpoint.reach:  # the origin's listener, or no host: no address to look up
            addresses = ()
        elif _literal(endpoint.host):
            addresses = (endpoint.host,)
        else:
            addresses = self.addresses.get(endpoint.host)
        if addresses is None:
            return None
        resting = backend.id in self.resting
        said = repr((endpoint, list(addresses), resting, reach)).encode()
        return hashlib.blake2b(said, digest_size=8).hexdigest(), backend, tuple(addresses), resting, reach

    # ------------------------------------------------------------------ streams

    def opened(self, stream: _Stream) -> None:
        self._streams.add(stream)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())

    def closed(self, stream: _Stream) -> None:
        self._streams.discard(stream)

    def _tell_clusters(self) -> None:
        """Wake the streams: some cluster or endpoint may have changed (each stream sends what
        differs from what its Envoy holds)."""
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
        if self.clusters.due() or any(not stream.cds_answered for stream in self._streams):
            # Clusters gone from the file leave Envoy now; a first answer still waiting for some
            # backend's endpoint is tried again (FIRST_ANSWER_WAIT_S).
            self._tell_clusters()
        if self._config_changed.is_set() or self.tables.current is not self._table:
            self._config_changed.clear()
            self._table = self.tables.current
            self._versions.clear()
            self._tell_clusters()
        now = time.time()
        resting = frozenset(self.state.cooling())
        if resting != self.resting:
            changed = resting ^ self.resting
            self.resting = resting
            for backend in filter(None, (self._table.backends.get(i) for i in changed)):
                for reach in REACHES:
                    self._versions.pop(resource_name(backend.cluster, reach), None)
            self._tell_clusters()
        if self._hosts_of is not self._table:
            self._hosts_of = self._table
            providers = {b.provider.id: b.provider for b in self._table.backends.values()}
            self._hosts = {p.host: p.port for p in providers.values() if not _literal(p.host)}
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
            self._versions.clear()
            self._tell_clusters()


class _Stream:
    """One ADS stream: the clusters its Envoy holds (name -> version), and whether something
    may have changed since they were sent."""

    def __init__(self, endpoints: Endpoints):
        self.endpoints = endpoints
        # Clusters (delta CDS, a wildcard subscription): what Envoy holds, name -> version.
        self.cds = False
        self.cds_sent: dict[str, str] = {}
        # The chains Envoy asked for by name (on-demand CDS): only these are sent of the chains.
        self.demanded: set[str] = set()
        # Chains asked for that the file does not hold, already answered as removed (Envoy's
        # on_demand filter then answers the request at once instead of after its timeout).
        self.said_missing: set[str] = set()
        # Asked for since the last answer: answered alone unless everything is looked at anyway.
        self.asked: set[str] = set()
        self.cds_dirty = False
        self.cds_answered = False
        self.opened_at = time.monotonic()
        self.wake = asyncio.Event()
        self.done = False
        self._nonces = itertools.count(1)
        # The last answer not ACKed yet, and the signature of the cluster file it completes:
        # once Envoy ACKs it, Envoy holds that file's clusters (clusterfeed.mark_held).
        self._unacked: tuple[int, tuple[int, ...]] | None = None

    def clusters_changed(self) -> None:
        if self.cds:
            self.cds_dirty = True
            self.wake.set()

    async def read(self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]) -> None:
        try:
            async for request in requests:
                if request.type_url == CLUSTER_TYPE:
                    self._cluster_request(request)
                # Clusters are all Envoy asks for here: their endpoints are in them.
        finally:
            self.done = True
            self.wake.set()

    def _cluster_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        if request.error_detail.code:
            # Envoy keeps the clusters it had; the same bytes would be refused again.
            log.error("Envoy refused clusters (nonce %s): %s", request.response_nonce, request.error_detail.message)
            self._unacked = None  # the publisher's wait for them ends in its timeout
        elif request.response_nonce and self._unacked and int(request.response_nonce) >= self._unacked[0]:
            # Envoy applies answers in order: this ACK covers every answer before it.
            self.endpoints.clusters.mark_held(self._unacked[1])
            self._unacked = None
        asked = [name for name in request.resource_names_subscribe if name != WILDCARD]
        if asked or request.resource_names_unsubscribe:
            # A chain a request needs (on-demand CDS), or one Envoy no longer wants.
            self.demanded.update(asked)
            self.demanded.difference_update(request.resource_names_unsubscribe)
            self.said_missing.difference_update(asked)
            self.asked.update(asked)
            self.wake.set()
        if not self.cds:
            # The first request subscribes to every cluster; a reconnecting Envoy says what it
            # holds (and, among what it subscribes, the chains it asked for before), so only
            # what differs is sent again.
            if self.endpoints.clusters.path is None:
                log.error("Envoy asks for its clusters over ADS, but this worker was not given their file (--clusters)")
            self.cds = True
            self.cds_sent = dict(request.initial_resource_versions)
            self.clusters_changed()

    def _to_hold(self, name: str, version: str) -> tuple[str, str | None] | None:
        """The version Envoy is to hold of cluster `name` (`version`: the file's; a backend
        cluster's with its endpoint's, `Endpoints.version`), and for a backend cluster the
        resource of its endpoint; None for a backend cluster whose endpoint is not known yet (a
        config not loaded, a host not looked up): held back until it is, as Envoy waited for an
        EDS cluster's endpoints."""
        resource = self.endpoints.clusters.endpoint_of.get(name)
        if not resource:
            return version, None
        endpoint = self.endpoints.version(resource)
        if endpoint is None:
            return None
        return f"{version}.{endpoint}", resource

    def responses(self) -> Iterator[discovery_pb2.DeltaDiscoveryResponse]:
        """The clusters that differ from what Envoy holds (a backend's with its endpoint inline),
        and those gone past their grace (clusterfeed), BATCH at a time. Nothing until the file
        was read once: an Envoy starting waits for its first clusters."""
        if not self.cds_dirty:
            if self.asked and self.cds:
                yield from self._answer_asked()
            return
        feed = self.endpoints.clusters
        current = feed.current()
        self.cds_dirty = False
        if not feed.loaded:
            return
        self.asked.clear()  # looked at with everything else
        wanted: dict[str, tuple[str, str | None]] = {}
        held = 0
        eager = self.endpoints.eager_chains()
        asked_backends = self._members(self.demanded)
        for name, version in current.items():
            if name.startswith(CHAIN_PREFIX):
                if name not in self.demanded and name not in eager:
                    continue  # a decided policy's chain no request has needed yet
            elif (
                name in feed.endpoint_of
                and name not in asked_backends
                and name not in self.cds_sent
                and self.endpoints.lazy(name)
            ):
                continue  # a backend only such chains name: it goes with the first of them
            now = self._to_hold(name, version)
            if now is None:
                held += 1
            elif self.cds_sent.get(name) != now[0]:
                wanted[name] = now
        if held and not self.cds_answered:
            if time.monotonic() - self.opened_at < FIRST_ANSWER_WAIT_S:
                return  # tried again on the next tick
            log.warning("Envoy's first clusters go without %d backend clusters whose endpoint is not known yet", held)
        removed = sorted(name for name in self.cds_sent if name not in current and name not in feed.gone)
        for name in removed:
            del self.cds_sent[name]
        # A chain asked for that the file does not hold (a route of a config gone meanwhile):
        # said once, so the request waiting for it is answered now.
        removed += self._say_missing(self.demanded - set(removed), current)
        self.said_missing.update(name for name in removed if name in self.demanded)

        def sent() -> Iterator[discovery_pb2.Resource | None]:
            backends = False
            for name, version, value in feed.packed(set(wanted)):
                if version != current.get(name):
                    continue  # the file was replaced meanwhile: sent on its own change
                endpoint = wanted[name][1]
                if endpoint is None and backends and name in self.demanded:
                    yield None  # a chain a request waits for, apart from the backends before it
                backends = endpoint is not None
                resource = self._sent(name, version, value, endpoint)
                if resource is not None:
                    yield resource

        last = None  # each answer goes once the next is made: the last is known before it goes
        for answer in self._batches(sent(), CLUSTER_TYPE, removed, always=not self.cds_answered):
            if last is not None:
                yield last
            last = answer
        self.cds_answered = True
        signature = feed.signature if not held else None
        if last is not None:
            if signature is not None:
                self._unacked = (int(last.nonce), signature)  # its ACK says Envoy holds the file
            yield last
        elif signature is not None and self._unacked is not None:
            self._unacked = (self._unacked[0], signature)  # held once what is on its way is
        elif signature is not None:
            feed.mark_held(signature)  # Envoy holds all of it already
        if wanted or removed:
            # What reading the file (parsed whole, a few MB at the large fleet, each time some
            # clusters change) and sending took, once sent (memtrim): kept by glibc, a change
            # of five chains grew this worker by a megabyte or two every time.
            release_free_memory()

    def _say_missing(self, asked: set[str], current: dict[str, str]) -> list[str]:
        """Of chains `asked` for, those neither the file nor Envoy holds and not said missing
        before: said now (as removed), once."""
        missing = sorted(
            name for name in asked - self.said_missing if name not in current and name not in self.cds_sent
        )
        self.said_missing.update(missing)
        return missing

    def _sent(self, name: str, version: str, value: bytes, endpoint: str | None) -> discovery_pb2.Resource | None:
        """Cluster `name` (`version`: the file's) as it goes to Envoy, noted as sent; a backend
        cluster's with the assignment of its `endpoint` resource written in, as it is now (it is
        made again here: a change since `_to_hold` is in it and in its version). None for a
        backend whose assignment is gone meanwhile: the next look sends what differs then."""
        if endpoint is not None:
            made = self.endpoints.assignment(endpoint)
            if made is None:
                return None
            assigned, backend, addresses, resting, reach = made
            version = f"{version}.{assigned}"
            value = with_endpoint(value, load_assignment(backend.endpoint, addresses, resting, reach))
        self.cds_sent[name] = version
        return cluster_resource(name, version, value)

    def _members(self, chains: Iterable[str]) -> set[str]:
        """The backend clusters the file's chains `chains` name."""
        members_of = self.endpoints.clusters.members_of
        return {m for chain in chains for m in members_of.get(chain, ())}

    def _answer_asked(self) -> Iterator[discovery_pb2.DeltaDiscoveryResponse]:
        """The chains asked for since the last answer, alone (a request waits for them): their
        clusters, after those of their backends Envoy does not hold yet (an aggregate skips a
        member it lacks), or that the file holds none of that name. Until the file was read once
        the full answer that follows sends them (they stay asked for). A backend whose endpoint
        is not known yet goes later, with everything (`responses`), as it does at the start."""
        feed = self.endpoints.clusters
        current = feed.current()
        if not feed.loaded:
            return
        names, self.asked = self.asked, set()
        wanted = {
            name: now
            for name in (*sorted(self._members(names)), *names)
            if name in current
            and (now := self._to_hold(name, current[name])) is not None
            and self.cds_sent.get(name) != now[0]
        }
        missing = self._say_missing(names, current)
        backends: list[discovery_pb2.Resource] = []
        chains: list[discovery_pb2.Resource] = []
        for name, version, value in feed.packed(set(wanted)):
            if version != current.get(name):
                continue  # replaced meanwhile: sent on its own change
            endpoint = wanted[name][1]
            resource = self._sent(name, version, value, endpoint)
            if resource is not None:
                (backends if endpoint is not None else chains).append(resource)
        # (They are read from their spans in the file, a few hundred bytes each: nothing to
        # give back, where parsing the whole file for them left glibc holding 12 MB.)
        if backends or chains or missing:
            yield from self._batches([*backends, None, *chains], CLUSTER_TYPE, missing)

    def _batches(
        self,
        resources: Iterable[discovery_pb2.Resource | None],
        type_url: str,
        removed: list[str] | None = None,
        always: bool = False,
    ) -> Iterator[discovery_pb2.DeltaDiscoveryResponse]:
        """`resources` in responses of at most BATCH resources and about BATCH_BYTES (the last
        one names `removed`); one even with nothing in it when `always`. A None ends a response
        there: a chain a request waits for travels apart from the backend clusters before it
        that it names. In one response with them, the request went on before Envoy's worker had
        the new members (no healthy upstream, every time, in test_config_race); a response of
        its own after theirs, it never did. (A chain no request waits for can share one: its
        routes are written once Envoy holds the whole file, `clusterfeed.wait_held`.)"""
        batch: list[discovery_pb2.Resource] = []
        size = 0
        for resource in resources:
            if resource is None:
                if batch:
                    yield self._response(batch, type_url)
                    batch, size = [], 0
                continue
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
