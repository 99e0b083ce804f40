"""Envoy's clusters over ADS (delta CDS, issue 12): what the worker holding Envoy's stream
sends from the cluster file the publisher writes (gatewayfiles, the real generator and encoder),
over a real gRPC stream (grpc.aio, port 0, Envoy's own protos): a compiled policy's chains and
their backend clusters at first, a decided policy's chain with its backends once Envoy asks for
it by name (on-demand CDS, as its on_demand filter does the first time a request needs it), then
only what a change added or altered, removals after their grace, and nothing that Envoy already
has."""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from signalbox import gatewayfiles
from signalbox.core import envoygen
from signalbox.core.compiler import compile_config
from signalbox.extproc import clusterfeed, xds
from signalbox.extproc.clusterfeed import CLUSTER_TYPE, ClusterFile
from signalbox.extproc.cooldown import Cooldowns
from signalbox.extproc.reload import TableHolder, file_signature
from signalbox.extproc.strategies import SelectionState
from tests.extproc.adsclient import DeltaStream
from tests.factories import backend, model, policy, provider

WAIT_S = 5.0  # the longest an answer may take here (a file event, or a tick: xds.TICK_S)
OPTIONS = envoygen.GatewayOptions(ads=True)


def routing_config(*policies: tuple, strategy: str = "cost"):
    """Policies (name, providers[, strategy]) over providers of one model each: decided by
    default (their chains and backends go to Envoy when it asks), compiled with
    `strategy="failover"` (sent unasked)."""
    names = sorted({n for _, members, *_ in policies for n in members})
    providers = [provider(n, f"http://127.0.0.1:{9000 + i}/v1", [model("m")]) for i, n in enumerate(names)]
    pols = [
        policy(name, [name], [backend(n, "m", priority=k) for k, n in enumerate(members)], strategy=(*own, strategy)[0])
        for name, members, *own in policies
    ]
    result = compile_config(providers, pols)
    assert result.ok, result.problems
    return result.config


def publish(workdir: Path, cfg, tables: TableHolder) -> set[str]:
    """Envoy's files as `signalbox up` writes them, and the config in force as the workers load
    it after (a backend cluster's endpoint comes from it: extproc.xds writes it into the
    cluster); the names of the clusters in the files. The routes do not wait for Envoy to hold
    the clusters (test_held_clusters): this Envoy ACKs only when a test reads its answer."""
    gatewayfiles.write_envoy_files(gatewayfiles.envoy_files(cfg, workdir, OPTIONS))
    tables.install(cfg)
    return {c["name"] for c in gatewayfiles.read_envoy_file(workdir / gatewayfiles.ENVOY_DIR, "cds.json")["resources"]}


def cluster_path(workdir: Path) -> Path:
    return Path(envoygen.resource_file(str(workdir / gatewayfiles.ENVOY_DIR), "cds.json"))


def chains(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith(xds.CHAIN_PREFIX)}


def backends(names: set[str]) -> set[str]:
    """The backend clusters of `names`: all a compiled policy's routes need of the file (they
    walk its chains by priority groups, contract.chain_groups)."""
    return names - chains(names)


class Envoy(DeltaStream):
    """The client side of the stream as Envoy speaks it for clusters: a wildcard subscription
    (with what it holds and the chains it asked for, when it reconnects), then an ACK per
    answer; a chain is asked for by name when a request needs it (`DeltaStream.ask`)."""

    def __init__(self, channel: grpc.aio.Channel, holds: dict[str, str] | None = None, asked: set[str] = frozenset()):
        super().__init__(channel)
        self.held: dict[str, str] = dict(holds or {})
        self.send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=CLUSTER_TYPE,
                resource_names_subscribe=[xds.WILDCARD, *sorted(asked)] if asked else [],
                initial_resource_versions=self.held,
            )
        )

    async def next(self, timeout: float = WAIT_S) -> tuple[dict[str, cluster_pb2.Cluster], list[str]]:
        """The next answer's clusters and removed names, applied to what this Envoy holds; ACKed."""
        response = await asyncio.wait_for(self.responses.get(), timeout)
        assert response.type_url == CLUSTER_TYPE
        self.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER_TYPE, response_nonce=response.nonce))
        got = {}
        for resource in response.resources:
            cluster = cluster_pb2.Cluster()
            assert resource.resource.Unpack(cluster)
            assert cluster.name == resource.name
            got[resource.name] = cluster
            self.held[resource.name] = resource.version
        for name in response.removed_resources:
            self.held.pop(name, None)
        return got, list(response.removed_resources)

    async def until(self, name: str) -> list[dict[str, cluster_pb2.Cluster]]:
        """The answers up to the one that brings cluster `name`, each as the clusters it
        brought (ACKed): a chain asked for comes in an answer of its own, after its new
        backends' (xds._Stream._batches)."""
        answers: list[dict[str, cluster_pb2.Cluster]] = []
        while not answers or name not in answers[-1]:
            got, _ = await self.next()
            answers.append(got)
        return answers


@pytest.fixture
async def ads(tmp_path):
    feed = ClusterFile(cluster_path(tmp_path))
    stop = asyncio.Event()
    watch = asyncio.create_task(feed.watch(stop))
    server = grpc.aio.server()
    tables = TableHolder()
    endpoints = xds.Endpoints(tables, SelectionState(cooldowns=Cooldowns(tmp_path / "cooldowns.db")), clusters=feed)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(xds.AggregatedDiscovery(endpoints), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    opened: list[Envoy] = []

    def connect(holds: dict[str, str] | None = None, asked: set[str] = frozenset()) -> Envoy:
        """An Envoy connecting (holding `holds`: name -> version, having asked for the chains
        `asked`), closed after the test."""
        opened.append(Envoy(channel, holds, asked))
        return opened[-1]

    yield functools.partial(publish, tmp_path, tables=tables), connect, tmp_path
    for envoy in opened:
        envoy.close()
    stop.set()
    watch.cancel()
    await channel.close()
    await server.stop(None)


async def test_envoy_gets_compiled_policies_clusters_then_only_what_a_change_adds(ads):
    publish, connect, _workdir = ads
    names = publish(routing_config(("p", ["a", "b"]), ("c", ["c"]), strategy="failover"))
    envoy = connect()
    while set(envoy.held) != backends(names):  # (the config may reach the worker after the file)
        got, removed = await envoy.next()
        assert not removed
    assert chains(names)  # in the file, for a request the router phase decides anyway
    # The same config written again: nothing travels.
    publish(routing_config(("p", ["a", "b"]), ("c", ["c"]), strategy="failover"))
    await envoy.nothing()
    # A policy over a new provider: its backend cluster travels, nothing is removed.
    more = publish(routing_config(("p", ["a", "b"]), ("c", ["c"]), ("d", ["d"]), strategy="failover"))
    got, removed = await envoy.next()
    assert set(got) == backends(more - names) == {"b.default.d.m"} and not removed
    assert set(envoy.held) == backends(more)


async def test_a_chain_travels_once_envoy_asks_for_it(ads):
    """Envoy's on_demand filter asks for a route's chain the first time a request needs it: the
    2,000-provider fleet's 7,712 chains held at once cost Envoy 182 MB and 1.6 s of its start."""
    publish, connect, _workdir = ads
    names = publish(routing_config(("p", ["a", "b"])))
    envoy = connect()
    got, _ = await envoy.next()
    assert not got  # nothing of a decided policy's before a request needs it, not its backends
    assert len(chains(names)) == 2  # one per first choice
    chain = min(chains(names))
    envoy.ask(CLUSTER_TYPE, chain)
    # The chain with its backends, the backends first and apart (an aggregate skips a member it
    # lacks, and the request goes on as soon as Envoy has the chain).
    backends, got = await envoy.until(chain)
    assert list(backends) == ["b.default.a.m", "b.default.b.m"] and list(got) == [chain]
    assert got[chain].cluster_type.name == "envoy.clusters.aggregate"  # the generator's own cluster
    assert backends["b.default.a.m"].load_assignment.endpoints  # a backend's endpoint inline, as ever
    # A policy over a new chain: nothing travels until a request needs it, then only the chain.
    more = publish(routing_config(("p", ["a", "b"]), ("q", ["a"])))
    await envoy.nothing()
    (new,) = chains(more) - chains(names)
    envoy.ask(CLUSTER_TYPE, new)
    got, removed = await envoy.next()
    assert set(got) == {new} and not removed
    assert set(envoy.held) == (more - chains(more)) | {chain, new}


async def test_a_backend_only_decided_policies_name_travels_with_the_first_chain_asked_for(ads):
    """At the 2,000-provider fleet the 4,286 backends that only decided policies route to were
    held by Envoy from its start, 23 KB and more each, whether or not a request went there."""
    publish, connect, _workdir = ads
    publish(routing_config(("p", ["a"], "failover"), ("q", ["b", "a"])))
    envoy = connect()
    while "b.default.a.m" not in envoy.held:  # (the config may reach the worker after the file)
        await envoy.next()
    assert "b.default.b.m" not in envoy.held  # only q, decided, names it
    # A decided policy over a provider new to the fleet: nothing travels.
    more = publish(routing_config(("p", ["a"], "failover"), ("q", ["b", "a"]), ("r", ["c", "b"])))
    await envoy.nothing()
    r_first = next(n for n in chains(more) if n.startswith("t.default.c.m.2."))
    envoy.ask(CLUSTER_TYPE, r_first)
    assert [list(got) for got in await envoy.until(r_first)] == [["b.default.b.m", "b.default.c.m"], [r_first]]


async def test_a_compiled_policys_backends_travel_unasked_and_its_chain_when_asked(ads):
    """Envoy routes a compiled policy's requests alone, walking its chain by the route's
    priority groups: the chain's backends are there before any request, and while no worker
    could answer Envoy's asking. The chain's aggregate (about 24 KB of Envoy; 3,432 of them at
    the 2,000 fleet) serves only a request the router phase decided for the policy anyway,
    which asks for it."""
    publish, connect, _workdir = ads
    names = publish(routing_config(("p", ["a", "b"]), strategy="failover"))
    (chain,) = chains(names)
    envoy = connect()
    while set(envoy.held) != backends(names):  # (the config may reach the worker after the file)
        await envoy.next()
    await envoy.nothing()
    envoy.ask(CLUSTER_TYPE, chain)
    got, _ = await envoy.next()
    assert set(got) == {chain}


async def test_a_chain_asked_for_before_the_file_holds_it_travels_once_it_does(ads):
    """An Envoy may ask for a chain before the file holding it is read (a route of a config
    still being written): it is said missing, and sent once the file holds it (Envoy's
    subscription stands)."""
    publish, connect, _workdir = ads
    publish(routing_config(("p", ["a", "b"])))
    envoy = connect()
    await envoy.next()
    more = routing_config(("p", ["a", "b"]), ("q", ["a"]))
    (new,) = chains(names_of(more)) - chains(names_of(routing_config(("p", ["a", "b"]))))
    envoy.ask(CLUSTER_TYPE, new)
    got, removed = await envoy.next()  # the file does not hold it yet: said missing, once
    assert not got and removed == [new]
    await envoy.nothing()
    publish(more)  # still asked for: it travels once the file holds it, after its backend
    assert [list(got) for got in await envoy.until(new)] == [["b.default.a.m"], [new]]


async def test_a_chain_the_file_never_holds_is_said_missing_once(ads):
    """A route of a config gone meanwhile: the request waiting for its chain is answered now
    (`routing_unavailable`), not after the on_demand filter's timeout."""
    publish, connect, _workdir = ads
    publish(routing_config(("p", ["a"])))
    envoy = connect()
    await envoy.next()
    envoy.ask(CLUSTER_TYPE, "t.default.nowhere.m.2.0000000000")
    got, removed = await envoy.next()
    assert not got and removed == ["t.default.nowhere.m.2.0000000000"]
    await envoy.nothing()


def names_of(cfg) -> set[str]:
    return {c["name"] for c in envoygen.clusters(cfg, OPTIONS)}


async def test_a_cluster_gone_from_the_file_leaves_envoy_after_its_grace(ads, monkeypatch):
    """Routes are written after clusters: a cluster removed at once would leave the old routes
    naming a cluster Envoy no longer has (503s) until the new routes arrive."""
    monkeypatch.setattr(clusterfeed, "REMOVAL_GRACE_S", 1.0)
    publish, connect, _workdir = ads
    both = publish(routing_config(("p", ["a", "b"]), ("q", ["a"]), ("c", ["c"])))
    envoy = connect()
    await envoy.next()
    envoy.ask(CLUSTER_TYPE, *chains(both))
    while set(envoy.held) != both:
        await envoy.next()
    started = asyncio.get_running_loop().time()
    left = publish(routing_config(("p", ["a", "b"])))
    got, removed = await envoy.next()
    assert not got and set(removed) == both - left
    assert asyncio.get_running_loop().time() - started >= 1.0
    assert set(envoy.held) == left
    # Back before its grace ended: never removed (and asked for before: sent unasked again).
    publish(routing_config(("p", ["a", "b"]), ("q", ["a"])))
    got, _ = await envoy.next()
    publish(routing_config(("p", ["a", "b"]), ("q", ["a"]), ("r", ["d"], "failover")))
    got, removed = await envoy.next()
    assert set(got) == {"b.default.d.m"} and not removed  # a compiled policy's: its backend


async def test_a_reconnecting_envoy_gets_only_what_differs_from_what_it_holds(ads):
    publish, connect, _workdir = ads
    names = publish(routing_config(("p", ["a", "b"])))
    first = connect()
    await first.next()
    first.ask(CLUSTER_TYPE, *chains(names))
    while set(first.held) != names:
        await first.next()
    held = dict(first.held)
    more = publish(routing_config(("p", ["a", "b"]), ("q", ["a"]), ("c", ["c"], "failover")))
    # The Envoy reconnects holding what it had (and asking again for the chains it asked for
    # before), and one cluster this config never had.
    second = connect(holds={**held, "b.default.gone.m": "1"}, asked=chains(names))
    sent: set[str] = set()
    gone: list[str] = []
    # (the new file may reach the feed after the stream)
    while set(second.held) != set(held) | {"b.default.c.m"}:
        got, removed = await second.next()
        sent |= set(got)
        gone += removed
    # Only the new compiled policy's backend: nothing it held again, no chain unasked.
    assert sent == {"b.default.c.m"} and more > set(second.held)
    assert gone == ["b.default.gone.m"]  # never in the file: no grace


async def test_envoy_waits_for_a_first_file_and_a_bad_file_changes_nothing(ads):
    publish, connect, workdir = ads
    envoy = connect()
    await envoy.nothing()  # no file yet: Envoy's start waits for its clusters
    names = publish(routing_config(("p", ["a"]), strategy="failover"))
    while set(envoy.held) != backends(names):  # (the config may reach the worker after the file)
        await envoy.next()
    path = cluster_path(workdir)
    tmp = path.with_name(".garbage")
    tmp.write_bytes(b"\xff not a DiscoveryResponse")
    os.replace(tmp, path)
    await envoy.nothing()  # logged; Envoy keeps what it has
    more = publish(routing_config(("p", ["a"]), ("q", ["a", "b"]), strategy="failover"))
    got, removed = await envoy.next()
    assert set(got) <= more and set(envoy.held) == backends(more) and not removed


async def test_an_empty_cluster_file_still_answers_envoy(ads):
    """An Envoy starting on a config with no clusters waits for an answer: an empty one."""
    _publish, connect, workdir = ads
    envoy = connect()
    path = cluster_path(workdir)
    gatewayfiles.write_atomic(path, discovery_pb2.DiscoveryResponse().SerializeToString())
    got, removed = await envoy.next()
    assert got == {} and removed == []


def _held(workdir: Path) -> str:
    marker = clusterfeed.held_file(cluster_path(workdir))
    return marker.read_text() if marker.exists() else ""


def _signature(workdir: Path) -> str:
    return " ".join(map(str, file_signature(cluster_path(workdir))))


async def _until(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)


async def test_routes_naming_new_clusters_wait_until_envoy_has_acked_them(ads, caplog):
    """Envoy reads its routes from their file, its clusters from the stream: written one after
    the other, a route naming a new backend reached Envoy before its cluster (a 503 until it
    came). Now the publisher writes the routes once the stream says Envoy ACKed the clusters.
    A new chain holds nothing up: Envoy asks for it when a route first needs it."""
    publish, connect, workdir = ads
    publish(routing_config(("p", ["a", "b"])))
    envoy = connect()
    await envoy.next()  # ACKed: the stream says Envoy holds this file
    await _until(lambda: _held(workdir) == _signature(workdir), "the first file held")
    routes = Path(envoygen.resource_file(str(workdir / gatewayfiles.ENVOY_DIR), "rds.json"))
    old_routes = routes.read_bytes()
    more = routing_config(("p", ["a", "b"]), ("q", ["c", "a"], "failover"))
    publish.keywords["tables"].install(more)  # the workers load a config before its clusters are written
    publisher = asyncio.create_task(asyncio.to_thread(gatewayfiles.write_envoy, more, workdir, OPTIONS))
    # The config in force makes backend a one Envoy is to hold unasked (q, compiled, names it):
    # it may travel from the old file first (ACKed here); then q's new backend, not ACKed yet
    # (q's route walks its chain by priority groups: no aggregate).
    answer = await asyncio.wait_for(envoy.responses.get(), WAIT_S)
    if [r.name for r in answer.resources] == ["b.default.a.m"]:
        envoy.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER_TYPE, response_nonce=answer.nonce))
        answer = await asyncio.wait_for(envoy.responses.get(), WAIT_S)
    names = [r.name for r in answer.resources]
    assert names == ["b.default.c.m"]
    assert not publisher.done() and routes.read_bytes() == old_routes  # the routes wait
    envoy.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER_TYPE, response_nonce=answer.nonce))
    await asyncio.wait_for(publisher, WAIT_S)
    assert routes.read_bytes() != old_routes
    assert _held(workdir) == _signature(workdir)
    # A decided policy, even over a provider new to the fleet: the routes go at once (its
    # chain and backends go when a request asks for the chain).
    most = routing_config(("p", ["a", "b"]), ("q", ["c", "a"], "failover"), ("r", ["b", "d"]))
    publish.keywords["tables"].install(most)
    publisher = asyncio.create_task(asyncio.to_thread(gatewayfiles.write_envoy, most, workdir, OPTIONS))
    await asyncio.wait_for(publisher, WAIT_S * 2)
    assert "writing the routes anyway" not in caplog.text  # held at once: no wait ran out
    await _until(lambda: _held(workdir) == _signature(workdir), "the file with a new chain held")


async def test_clusters_envoy_refused_are_never_said_to_be_held(ads, monkeypatch, caplog):
    """A NACK leaves Envoy with its old clusters: the publisher's wait ends in its timeout, and
    the routes follow with a warning (they answer 503 routing_unavailable where they name what
    Envoy refused, as before the wait)."""
    monkeypatch.setattr(gatewayfiles, "HELD_WAIT_S", 0.5)
    publish, connect, workdir = ads
    publish(routing_config(("p", ["a"])))
    envoy = connect()
    await envoy.next()
    await _until(lambda: _held(workdir) == _signature(workdir), "the first file held")
    held_before = _held(workdir)
    more = routing_config(("p", ["a"]), ("q", ["b", "a"], "failover"))
    publish.keywords["tables"].install(more)
    publisher = asyncio.create_task(asyncio.to_thread(gatewayfiles.write_envoy, more, workdir, OPTIONS))
    answer = await asyncio.wait_for(envoy.responses.get(), WAIT_S)  # q's backends and chain
    refusal = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER_TYPE, response_nonce=answer.nonce)
    refusal.error_detail.code, refusal.error_detail.message = 3, "refused by the test"
    envoy.send(refusal)
    await asyncio.wait_for(publisher, WAIT_S)
    assert _held(workdir) == held_before != _signature(workdir)
    assert "writing the routes anyway" in caplog.text


def test_a_publisher_waits_for_no_envoy_that_never_held_clusters(tmp_path):
    """Before any stream said what Envoy holds (an Envoy yet to start, config-sync's init), the
    routes are written at once; `held` (what `signalbox up` waits for before it says ready)
    is true only once a stream said so of the file as it is now."""
    path = cluster_path(tmp_path)
    gatewayfiles.write_atomic(path, discovery_pb2.DiscoveryResponse().SerializeToString())
    assert clusterfeed.wait_held(path, timeout=60) and not clusterfeed.held(path)
    ClusterFile(path).mark_held(file_signature(path))
    assert clusterfeed.held(path)
    gatewayfiles.write_atomic(path, discovery_pb2.DiscoveryResponse(version_info="2").SerializeToString())
    assert not clusterfeed.held(path) and not clusterfeed.wait_held(path, timeout=0.05)


def test_a_cluster_is_taken_from_where_the_file_held_it_and_a_replaced_file_is_read_again(tmp_path):
    """A chain asked for is taken at its place in the file as read (digesting every cluster to
    find it made the request wait 38 ms at the 2,000-provider fleet); a file replaced since it
    was read gives its own bytes, never another cluster's."""

    def write(*clusters: cluster_pb2.Cluster) -> None:
        response = discovery_pb2.DiscoveryResponse(version_info="v" * 200)  # a length of two bytes
        for c in clusters:
            response.resources.add().Pack(c)
        gatewayfiles.write_atomic(cluster_path(tmp_path), response.SerializeToString())

    # Clusters whose Any needs one byte of length, and one that needs two.
    a, b, c = (cluster_pb2.Cluster(name=n, connect_timeout={"seconds": 1}) for n in ("t.a", "t.b", "t.c"))
    big = cluster_pb2.Cluster(name="t.big", alt_stat_name="x" * 300)
    write(a, big, b, c)
    feed = ClusterFile(cluster_path(tmp_path))
    versions = dict(feed.current())
    whole = []  # reads of the whole file: none while the file is as read
    real_named = feed._named
    feed._named = lambda path: whole.append(path) or real_named(path)  # type: ignore[method-assign]
    taken = {name: (version, value) for name, version, value in feed.packed({"t.b", "t.big"})}
    assert {n: v for n, (v, _) in taken.items()} == {"t.b": versions["t.b"], "t.big": versions["t.big"]}
    assert cluster_pb2.Cluster.FromString(taken["t.b"][1]) == b
    assert cluster_pb2.Cluster.FromString(taken["t.big"][1]) == big and not whole
    b2 = cluster_pb2.Cluster(name="t.b", connect_timeout={"seconds": 2})
    write(b2, c, a)  # replaced, not read since: every place differs
    ((name, version, value),) = feed.packed({"t.b"})
    assert name == "t.b" and cluster_pb2.Cluster.FromString(value) == b2 and version != versions["t.b"]
    assert whole  # read whole to find it


def test_the_publishers_file_is_read_at_its_spans(tmp_path):
    """The spans are worked out from the parsed file's sizes (`ClusterFile._spans`): the file
    the publisher writes (xdsbinary's encoder, not protobuf's own serializer) must be laid out
    as they assume, or every chain asked for would parse the whole file again."""
    names = publish(tmp_path, routing_config(("p", ["a", "b", "c"])), TableHolder())
    feed = ClusterFile(cluster_path(tmp_path))
    assert set(feed.current()) == names
    taken = feed._at_positions(names)
    assert taken is not None and {name for name, _, _ in taken} == names
