"""Backend endpoints over ADS (issue 12): what Envoy's backend clusters get from the ext_proc
over a real delta-xDS gRPC stream (grpc.aio, port 0, Envoy's own protos): each backend cluster
of the publisher's file (gatewayfiles, the real generator) with its endpoint written in, a
rest's health pushed without being asked, host names looked up by the ext_proc."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from signalbox import gatewayfiles
from signalbox.core import envoygen
from signalbox.core.compiler import compile_config
from signalbox.core.envoygen import endpoints as envoy_endpoints
from signalbox.core.envoygen.contract import BACKEND_PREFIX
from signalbox.core.envoygen.endpoints import REACHES, BackendEndpoint, parse_resource
from signalbox.extproc import clusterfeed, xds
from signalbox.extproc.clusterfeed import CLUSTER_TYPE, ClusterFile
from signalbox.extproc.cooldown import Cooldowns
from signalbox.extproc.reload import TableHolder
from signalbox.extproc.strategies import SelectionState
from tests.extproc.adsclient import DeltaStream
from tests.factories import backend, model, policy, provider

WAIT_S = 5.0  # the longest a push may take here (it takes a tick, xds.TICK_S)
OPTIONS = envoygen.GatewayOptions(ads=True)


def routing_config(*names: str, host: str = "127.0.0.1", scheme: str = "http", generation: int = 1):
    providers = [provider(n, f"{scheme}://{host}:{9000 + i}/v1", [model("m")]) for i, n in enumerate(names)]
    pol = policy("p", ["auto"], [backend(n, "m") for n in names], strategy="failover")
    result = compile_config(providers, [pol], generation=generation)
    assert result.ok, result.problems
    return result.config


def cluster_of(cfg, name: str) -> str:
    return next(b.cluster for b in cfg.backends if b.id == f"default/{name}/m")


class Envoy(DeltaStream):
    """The client side of the stream, as Envoy speaks it for clusters: a wildcard subscription
    (with what it holds, when it reconnects), then an ACK per answer."""

    def __init__(self, channel: grpc.aio.Channel, holds: dict[str, str] | None = None):
        super().__init__(channel)
        self.held: dict[str, str] = dict(holds or {})
        self.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER_TYPE, initial_resource_versions=self.held))

    async def clusters(self, timeout: float = WAIT_S) -> dict[str, cluster_pb2.Cluster]:
        """The next answer's clusters; ACKed."""
        response = await asyncio.wait_for(self.responses.get(), timeout)
        assert response.type_url == CLUSTER_TYPE
        self.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER_TYPE, response_nonce=response.nonce))
        out = {}
        for resource in response.resources:
            cluster = cluster_pb2.Cluster()
            assert resource.resource.Unpack(cluster)
            out[resource.name] = cluster
            self.held[resource.name] = resource.version
        return out

    async def next(self, timeout: float = WAIT_S) -> dict[str, dict]:
        """The next answer's backend clusters' endpoints by cluster, as JSON: each a STATIC
        cluster with its endpoint inline, never an EDS one."""
        out = {}
        for name, cluster in (await self.clusters(timeout)).items():
            if name.startswith(f"{BACKEND_PREFIX}."):
                assert cluster.type == cluster_pb2.Cluster.STATIC and not cluster.HasField("eds_cluster_config")
                assert cluster.load_assignment.cluster_name == name
                out[name] = json_format.MessageToDict(cluster.load_assignment)
        return out


def hosts(assignment: dict) -> list[tuple[str, str]]:
    """(address, health) of each of the provider's hosts of one assignment (priority 0)."""
    return [
        (e["endpoint"]["address"]["socketAddress"]["address"], e.get("healthStatus", "UNKNOWN"))
        for group in assignment.get("endpoints", [])
        if not group.get("priority")
        for e in group["lbEndpoints"]
    ]


def refusing(assignment: dict) -> list[tuple[int, str, str, str]]:
    """(priority, listener, host name, health) of the hosts besides the provider's."""
    return [
        (
            group["priority"],
            e["endpoint"]["address"]["envoyInternalAddress"]["serverListenerName"],
            e["endpoint"]["hostname"],
            e.get("healthStatus", "UNKNOWN"),
        )
        for group in assignment.get("endpoints", [])
        if group.get("priority")
        for e in group["lbEndpoints"]
    ]


class Gateway:
    """One ext_proc worker's ADS side: its routing table, cooldowns, DNS answers (`lookups`) and
    the cluster file a publisher writes (`publish`)."""

    def __init__(self, workdir: Path, channel: grpc.aio.Channel, tables, cooldowns, lookups, endpoints):
        self.workdir, self.channel = workdir, channel
        self.tables, self.cooldowns, self.lookups = tables, cooldowns, lookups
        self.endpoints, self.feed = endpoints, endpoints.clusters
        self.opened: list[Envoy] = []

    def publish(self, cfg, install: bool = True) -> None:
        """Envoy's files as `signalbox up` writes them (the file read on the stream's next
        turn), and the routing config in force unless `install` is False."""
        gatewayfiles.write_envoy_files(gatewayfiles.envoy_files(cfg, self.workdir, OPTIONS))  # routes not held back
        self.feed.changed()
        if install:
            self.tables.install(cfg)

    def connect(self, holds: dict[str, str] | None = None) -> Envoy:
        self.opened.append(Envoy(self.channel, holds))
        return self.opened[-1]


async def _serve(workdir: Path, tables: TableHolder, cooldowns: Cooldowns, lookups: dict):
    async def resolver(host: str, port: int) -> list[str]:
        found = lookups.get(host, OSError("no such host"))
        if isinstance(found, Exception):
            raise found
        return found

    feed = ClusterFile(envoygen.resource_file(str(workdir / gatewayfiles.ENVOY_DIR), "cds.json"))
    server = grpc.aio.server()
    endpoints = xds.Endpoints(tables, SelectionState(cooldowns=cooldowns), resolver=resolver, clusters=feed)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(xds.AggregatedDiscovery(endpoints), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}"), endpoints


@pytest.fixture
async def ads(tmp_path):
    tables, cooldowns, lookups = TableHolder(), Cooldowns(tmp_path / "cooldowns.db"), {}
    server, channel, endpoints = await _serve(tmp_path, tables, cooldowns, lookups)
    gateway = Gateway(tmp_path, channel, tables, cooldowns, lookups, endpoints)
    yield gateway
    for envoy in gateway.opened:
        envoy.close()
    await channel.close()
    await server.stop(None)


async def test_each_backend_cluster_gets_its_address_and_the_backend_id_attempts_read(ads):
    cfg = routing_config("a", "b")
    ads.publish(cfg)
    envoy = ads.connect()
    got = await envoy.next()
    assert set(got) == {cluster_of(cfg, "a"), cluster_of(cfg, "b")}
    a = got[cluster_of(cfg, "a")]
    assert hosts(a) == [("127.0.0.1", "UNKNOWN")]
    (host,) = a["endpoints"][0]["lbEndpoints"]
    assert host["endpoint"]["address"]["socketAddress"]["portValue"] == 9000
    assert host["endpoint"]["hostname"] == "default/a/m"  # which backend, for what attempts read
    await envoy.nothing()  # nothing changed, nothing sent again


async def test_what_the_stream_keeps_per_backend_is_shared_where_backends_share_it(ads):
    """The worker holding the stream keeps something for each backend Envoy holds (10,000 at
    the large fleet): the assignment's version only (its endpoint, addresses and backend were
    a tuple, a list and an object each, 2.3 MB of that worker), and a cluster's resource name
    as its name's own string (issue 12)."""
    cfg = routing_config("a", "b")
    ads.publish(cfg)
    await ads.connect().next()
    kept = ads.endpoints.version(cluster_of(cfg, "a"))
    assert isinstance(kept, str) and kept is ads.endpoints.version(cluster_of(cfg, "a"))
    made = ads.endpoints.assignment(cluster_of(cfg, "a"))  # made again when sent
    assert made is not None and made[0] == kept and made[2] == ("127.0.0.1",)
    assert made[1] is ads.tables.current.by_cluster[cluster_of(cfg, "a")]  # the backend, not a copy
    for name, resource in ads.feed.endpoint_of.items():
        assert resource is next(n for n in ads.feed.versions if n == name)  # the name's own string


async def test_each_change_sent_gives_back_the_memory_reading_the_file_took(ads, monkeypatch):
    """The stream parses the whole cluster file (a few MB at the large fleet) whenever some
    clusters change; glibc kept what that freed, and the worker holding the stream grew by a
    megabyte or two with every small change, until a change of 1,000 clusters or more trimmed
    it (extproc.memtrim)."""
    ads.publish(routing_config("a", "b"))
    envoy = ads.connect()
    await envoy.next()
    trims: list[int] = []
    monkeypatch.setattr(xds, "release_free_memory", lambda: trims.append(1))
    changed = routing_config("a", "b", "c", generation=2)  # one backend more, its policy's chain
    ads.publish(changed)
    sent = await envoy.clusters()
    assert 0 < len(sent) < 10  # a change of a few clusters
    assert trims


async def test_a_backend_whose_assignment_went_since_it_was_compared_is_not_noted_as_sent(ads):
    """The assignment is made again when sent (only its version is kept): one gone meanwhile
    (a config installed between two answers of one change) is not sent, and not noted as
    held, so the next look sends what is right then."""
    cfg = routing_config("a")
    ads.publish(cfg)
    await ads.connect().next()
    (stream,) = ads.endpoints._streams
    gone = "b.default.gone.m"
    assert stream._sent(gone, "1", b"", gone) is None
    assert gone not in stream.cds_sent
    held = stream._sent(cluster_of(cfg, "a"), "1", b"", cluster_of(cfg, "a"))
    assert held is not None and held.version == f"1.{ads.endpoints.version(cluster_of(cfg, 'a'))}"


async def test_reading_the_cluster_file_gives_back_its_memory_when_nothing_is_sent(ads, monkeypatch):
    """A change that adds only a decided policy's chain sends nothing until a request asks for
    it, and the trim after sending (above) never came: the parse of the whole file (4.5 MB at
    the large fleet) stayed in glibc's heap, 13 MB more of this worker after each such change."""
    trims: list[int] = []
    monkeypatch.setattr(clusterfeed, "release_free_memory", lambda: trims.append(1))
    ads.publish(routing_config("a", "b"))
    assert cluster_of(routing_config("a", "b"), "a") in ads.feed.current()
    assert trims == [1]
    assert ads.feed.current() and trims == [1]  # read once per change


async def test_a_cluster_of_a_config_not_loaded_yet_is_sent_once_it_is(ads):
    """The publisher wrote the clusters of a config this worker has not loaded yet: a new
    backend's cluster waits for its endpoint, and Envoy's first answer for every backend's (it
    serves once it has its first clusters: none may be missing then, as Envoy itself waited for
    each EDS cluster's endpoints)."""
    ads.tables.install(routing_config("a"))
    newer = routing_config("a", "c", generation=2)
    ads.publish(newer, install=False)
    envoy = ads.connect()
    await envoy.nothing()
    ads.tables.install(newer)
    assert set(await envoy.next()) == {cluster_of(newer, "a"), cluster_of(newer, "c")}
    newest = routing_config("a", "c", "d", generation=3)
    ads.publish(newest, install=False)
    chain = next(c["name"] for c in envoygen.clusters(newest, OPTIONS) if c["name"].startswith(xds.CHAIN_PREFIX))
    envoy.ask(CLUSTER_TYPE, chain)  # a request needs the policy's new chain
    changed = await envoy.clusters()  # later answers do not wait: what is known travels
    assert set(changed) == {chain}
    ads.tables.install(newest)
    assert set(await envoy.next()) == {cluster_of(newest, "d")}


async def test_a_first_answer_waits_for_a_backend_endpoint_only_so_long(ads, monkeypatch):
    monkeypatch.setattr(xds, "FIRST_ANSWER_WAIT_S", 0.5)
    ads.tables.install(routing_config("a"))
    ads.publish(routing_config("a", "c"), install=False)
    envoy = ads.connect()
    assert set(await envoy.next()) == {cluster_of(routing_config("a"), "a")}


async def test_a_rest_takes_the_endpoint_out_and_its_end_puts_it_back_without_being_asked(ads):
    cfg = routing_config("a", "b")
    ads.publish(cfg)
    envoy = ads.connect()
    await envoy.next()
    started = time.monotonic()
    ads.cooldowns.observe("default/a/m", 429, {"retry-after": "1"}, time.time())
    rested = await envoy.next()
    assert set(rested) == {cluster_of(cfg, "a")}  # only what changed travels
    assert hosts(rested[cluster_of(cfg, "a")]) == [("127.0.0.1", "UNHEALTHY")]
    # Where Envoy sends an attempt while no host of the backend is healthy: the resting
    # listener, which refuses at once (a chain walked by its route's groups moves on).
    resting_host = [(1, envoygen.contract.RESTING_LISTENER, "default/a/m", "DEGRADED")]
    assert refusing(rested[cluster_of(cfg, "a")]) == resting_host
    back = await envoy.next()
    assert hosts(back[cluster_of(cfg, "a")]) == [("127.0.0.1", "UNKNOWN")]
    assert refusing(back[cluster_of(cfg, "a")]) == resting_host  # always there, used only so
    assert time.monotonic() - started >= 1.0  # not before the Retry-After has passed


async def test_host_names_are_looked_up_and_a_failed_lookup_keeps_the_last_addresses(ads, monkeypatch):
    monkeypatch.setattr(xds, "DNS_REFRESH_S", 0.0)  # look up on every tick
    ads.lookups["llm.internal"] = ["10.0.0.1", "10.0.0.2"]
    cfg = routing_config("a", host="llm.internal")
    ads.publish(cfg)
    name = cluster_of(cfg, "a")
    envoy = ads.connect()
    got = await envoy.next()
    assert hosts(got[name]) == [("10.0.0.1", "UNKNOWN"), ("10.0.0.2", "UNKNOWN")]
    host = got[name]["endpoints"][0]["lbEndpoints"][0]["endpoint"]
    # The host is named by its backend (TLS checks the provider's name from the cluster's own
    # settings, options.upstream_tls).
    assert host["hostname"] == "default/a/m"
    ads.lookups["llm.internal"] = OSError("DNS is down")
    await envoy.nothing()  # a failed lookup changes nothing
    ads.lookups["llm.internal"] = ["10.0.0.3"]
    assert hosts((await envoy.next())[name]) == [("10.0.0.3", "UNKNOWN")]


def _tls_config():
    providers = [provider(n, "https://llm.example.com/v1", [model("m")]) for n in ("a", "b")]
    pol = policy("p", ["auto"], [backend("a", "m"), backend("b", "m")], strategy="failover")
    result = compile_config(providers, [pol])
    assert result.ok, result.problems
    return result.config


async def test_a_tls_backend_gets_its_address_and_one_of_a_shared_endpoint_its_origin(ads, monkeypatch):
    """A TLS provider's own cluster gets the addresses looked up; once its endpoint is shared
    (`endpoints.ORIGIN_MIN_BACKENDS`) each backend cluster gets the origin's internal listener
    instead, whatever was looked up. A rest marks the backend unhealthy either way."""
    monkeypatch.setattr(xds, "DNS_REFRESH_S", 0.0)
    ads.lookups["llm.example.com"] = ["10.0.0.9"]
    cfg = _tls_config()
    a, b = cluster_of(cfg, "a"), cluster_of(cfg, "b")
    ads.publish(cfg)
    envoy = ads.connect()
    got = await envoy.next()
    assert hosts(got[a]) == [("10.0.0.9", "UNKNOWN")]
    monkeypatch.setattr(envoy_endpoints, "ORIGIN_MIN_BACKENDS", 2)  # a and b now share one origin
    ads.publish(cfg)
    got = await envoy.next()
    places = set()
    for name in (a, b):
        (host,) = got[name]["endpoints"][0]["lbEndpoints"]
        assert set(host["endpoint"]["address"]) == {"envoyInternalAddress"}
        places.add(host["endpoint"]["address"]["envoyInternalAddress"]["serverListenerName"])
        assert host["endpoint"]["hostname"] in ("default/a/m", "default/b/m")  # the backend's id
        assert "metadata" not in host
    assert places == {"origin.llm.example.com.443.2000ms"}  # one origin for both
    ads.cooldowns.observe("default/a/m", 429, {"retry-after": "30"}, time.time())
    rested = await envoy.next()
    assert set(rested) == {a}
    (host,) = rested[a]["endpoints"][0]["lbEndpoints"]
    assert host["healthStatus"] == "UNHEALTHY"


async def test_a_cluster_written_for_another_way_of_reaching_its_backend_gets_no_host(ads):
    """The file and the config in force can differ for a moment (a provider's https:// turned
    http://, or back): a cluster that speaks TLS is never given the plain address, nor a plain
    one the TLS provider's address, key and all in clear text. It gets no host until both
    agree."""
    plain = routing_config("a", "b")
    ads.publish(_tls_config(), install=False)  # the file: TLS clusters
    ads.tables.install(plain)  # the config: a plain provider
    envoy = ads.connect()
    a = cluster_of(plain, "a")
    assert (await envoy.next())[a].get("endpoints", []) == []
    ads.publish(plain)  # the file catches up
    assert hosts((await envoy.next())[a]) == [("127.0.0.1", "UNKNOWN")]
    ads.lookups["llm.example.com"] = ["10.0.0.9"]
    ads.tables.install(_tls_config())  # and the reverse
    assert (await envoy.next())[a].get("endpoints", []) == []


async def test_a_host_never_found_gets_a_cluster_with_no_endpoint(ads):
    cfg = routing_config("a", "b", host="nowhere.invalid")
    ads.publish(cfg)
    envoy = ads.connect()
    got = await envoy.next()
    assert got[cluster_of(cfg, "a")].get("endpoints", []) == []  # as STRICT_DNS: a cluster with no host


async def test_a_new_stream_gets_everything_and_a_reconnecting_envoy_what_differs_from_any_worker(ads, tmp_path):
    """A cluster's version is the same in every worker: an Envoy that reconnects to another
    worker, holding what the first sent, is sent nothing again."""
    cfg = routing_config("a")
    ads.publish(cfg)
    first = ads.connect()
    await first.next()
    assert cluster_of(cfg, "a") in await ads.connect().next()  # a new stream: everything
    other = TableHolder()
    other.install(cfg)
    server, channel, _ = await _serve(tmp_path, other, Cooldowns(tmp_path / "other.db"), {})
    again = Envoy(channel, holds=first.held)
    try:
        assert await again.clusters() == {}  # its first answer (an Envoy starting waits for one): empty
        await again.nothing()
    finally:
        again.close()
        await channel.close()
        await server.stop(None)


async def test_a_large_answer_is_split_so_that_no_message_outgrows_the_grpc_limit(ads):
    ads.lookups["many.internal"] = [
        f"10.{i // 62500}.{i // 250 % 250}.{i % 250}" for i in range(1000)
    ]  # one name, 1,000 addresses
    cfg = routing_config(*(f"p{i}" for i in range(12)), host="many.internal")
    ads.publish(cfg)
    names = {b.cluster for b in cfg.backends}
    envoy = ads.connect()
    got: set[str] = set()
    sizes = []
    while not names <= got:
        response = await asyncio.wait_for(envoy.responses.get(), WAIT_S)
        sizes.append(response.ByteSize())
        envoy.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER_TYPE, response_nonce=response.nonce))
        got |= {r.name for r in response.resources}
    assert len(sizes) > 1 and max(sizes) < xds.BATCH_BYTES + 64 * 1024


async def test_a_rest_reaches_every_open_stream(ads):
    """A reconnecting Envoy's new stream overlaps the old one: both hear of a rest."""
    cfg = routing_config("a")
    ads.publish(cfg)
    streams = [ads.connect(), ads.connect()]
    for stream in streams:
        await stream.next()
    ads.cooldowns.observe("default/a/m", 429, {"retry-after": "30"}, time.time())
    for stream in streams:
        assert hosts((await stream.next())[cluster_of(cfg, "a")]) == [("127.0.0.1", "UNHEALTHY")]


@settings(max_examples=200, deadline=None)
@given(
    host=st.one_of(
        st.ip_addresses().map(str), st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z0-9-]{1,10}){0,3}", fullmatch=True)
    ),
    port=st.integers(1, 65535),
    names=st.lists(st.text(min_size=1, max_size=30), min_size=2, max_size=2),
    addresses=st.lists(st.ip_addresses().map(str), max_size=5),
    resting=st.booleans(),
    origin=st.one_of(st.just(""), st.text(min_size=1, max_size=40)),
    reach=st.sampled_from(sorted(REACHES)),
)
def test_an_assignment_is_the_message_its_description_parses_to(host, port, names, addresses, resting, origin, reach):
    """The worker builds assignments without json_format (5 times faster); what it sends must
    be exactly what the shared description (envoygen.endpoints) says."""
    assume("/" not in names[0])  # a cluster's name never holds one (compiler._cluster_name)
    endpoint = BackendEndpoint(names[0], names[1], host, port, origin)
    described = endpoint.load_assignment(addresses, resting, reach, refusing=True)
    want = json_format.ParseDict(described, endpoint_pb2.ClusterLoadAssignment())
    got = xds.load_assignment(endpoint, addresses, resting, reach)
    assert parse_resource(got.cluster_name) == (endpoint.cluster, reach)
    if reach != endpoint.reach:  # another way than the provider's: never an address, whatever is known
        assert not any(e.endpoint.address.HasField("socket_address") for g in got.endpoints for e in g.lb_endpoints)
    assert got == want
