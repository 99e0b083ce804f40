"""Envoy's clusters over ADS (delta CDS, issue 12): what the worker holding Envoy's stream
sends from the cluster file the publisher writes (gatewayfiles, the real generator and encoder),
over a real gRPC stream (grpc.aio, port 0, Envoy's own protos): everything at first, then only
what a change added or altered, removals after their grace, and nothing that Envoy already has."""

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
from signalbox.extproc.reload import TableHolder
from signalbox.extproc.strategies import SelectionState
from tests.extproc.adsclient import DeltaStream
from tests.factories import backend, model, policy, provider

WAIT_S = 5.0  # the longest an answer may take here (a file event, or a tick: xds.TICK_S)
OPTIONS = envoygen.GatewayOptions(ads=True)


def routing_config(*policies: tuple[str, list[str]]):
    names = sorted({n for _, members in policies for n in members})
    providers = [provider(n, f"http://127.0.0.1:{9000 + i}/v1", [model("m")]) for i, n in enumerate(names)]
    pols = [
        policy(name, [name], [backend(n, "m", priority=k) for k, n in enumerate(members)], strategy="failover")
        for name, members in policies
    ]
    result = compile_config(providers, pols)
    assert result.ok, result.problems
    return result.config


def publish(workdir: Path, cfg, tables: TableHolder) -> set[str]:
    """Envoy's files as `signalbox up` writes them, and the config in force as the workers load
    it after (a backend cluster's endpoint comes from it: extproc.xds writes it into the
    cluster); the names of the clusters in the files."""
    gatewayfiles.write_envoy(cfg, workdir, OPTIONS)
    tables.install(cfg)
    return {c["name"] for c in gatewayfiles.read_envoy_file(workdir / gatewayfiles.ENVOY_DIR, "cds.json")["resources"]}


def cluster_path(workdir: Path) -> Path:
    return Path(envoygen.resource_file(str(workdir / gatewayfiles.ENVOY_DIR), "cds.json"))


class Envoy(DeltaStream):
    """The client side of the stream as Envoy speaks it for clusters: a wildcard subscription
    (with what it holds, when it reconnects), then an ACK per answer."""

    def __init__(self, channel: grpc.aio.Channel, holds: dict[str, str] | None = None):
        super().__init__(channel)
        self.held: dict[str, str] = dict(holds or {})
        self.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER_TYPE, initial_resource_versions=self.held))

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

    def connect(holds: dict[str, str] | None = None) -> Envoy:
        """An Envoy connecting (holding `holds`: name -> version), closed after the test."""
        opened.append(Envoy(channel, holds))
        return opened[-1]

    yield functools.partial(publish, tmp_path, tables=tables), connect, tmp_path
    for envoy in opened:
        envoy.close()
    stop.set()
    watch.cancel()
    await channel.close()
    await server.stop(None)


async def test_envoy_gets_every_cluster_then_only_what_a_change_adds(ads):
    publish, connect, _workdir = ads
    names = publish(routing_config(("p", ["a", "b"])))
    envoy = connect()
    got, removed = await envoy.next()
    assert set(got) == names and not removed
    aggregate = next(c for n, c in got.items() if n.startswith("t."))
    assert aggregate.cluster_type.name == "envoy.clusters.aggregate"  # the generator's own clusters
    # The same config written again: nothing travels.
    publish(routing_config(("p", ["a", "b"])))
    await envoy.nothing()
    # A policy over a new chain: its chain's aggregate alone travels, nothing is removed.
    more = publish(routing_config(("p", ["a", "b"]), ("q", ["b", "a"])))
    got, removed = await envoy.next()
    assert set(got) == more - names and len(got) == 1 and not removed
    assert set(envoy.held) == more


async def test_a_cluster_gone_from_the_file_leaves_envoy_after_its_grace(ads, monkeypatch):
    """Routes are written after clusters: a cluster removed at once would leave the old routes
    naming a cluster Envoy no longer has (503s) until the new routes arrive."""
    monkeypatch.setattr(clusterfeed, "REMOVAL_GRACE_S", 1.0)
    publish, connect, _workdir = ads
    both = publish(routing_config(("p", ["a", "b"]), ("q", ["b", "a"])))
    envoy = connect()
    await envoy.next()
    started = asyncio.get_running_loop().time()
    left = publish(routing_config(("p", ["a", "b"])))
    got, removed = await envoy.next()
    assert not got and set(removed) == both - left
    assert asyncio.get_running_loop().time() - started >= 1.0
    assert set(envoy.held) == left
    # Back before its grace ended: never removed.
    publish(routing_config(("p", ["a", "b"]), ("q", ["b", "a"])))
    got, _ = await envoy.next()
    publish(routing_config(("p", ["a", "b"]), ("q", ["b", "a"]), ("r", ["a"])))
    got, removed = await envoy.next()
    assert not removed


async def test_a_reconnecting_envoy_gets_only_what_differs_from_what_it_holds(ads):
    publish, connect, _workdir = ads
    names = publish(routing_config(("p", ["a", "b"])))
    first = connect()
    await first.next()
    held = dict(first.held)
    more = publish(routing_config(("p", ["a", "b"]), ("q", ["b", "a"])))
    # The Envoy reconnects holding what it had, and one cluster this config never had.
    second = connect(holds={**held, "b.default.gone.m": "1"})
    sent: set[str] = set()
    gone: list[str] = []
    while set(second.held) != more:  # (the new file may reach the feed after the stream)
        got, removed = await second.next()
        sent |= set(got)
        gone += removed
    assert sent == more - names  # only the new chain's aggregate: nothing it held again
    assert gone == ["b.default.gone.m"]  # never in the file: no grace


async def test_envoy_waits_for_a_first_file_and_a_bad_file_changes_nothing(ads):
    publish, connect, workdir = ads
    envoy = connect()
    await envoy.nothing()  # no file yet: Envoy's start waits for its clusters
    names = publish(routing_config(("p", ["a"])))
    got, _ = await envoy.next()
    assert set(got) == names
    path = cluster_path(workdir)
    tmp = path.with_name(".garbage")
    tmp.write_bytes(b"\xff not a DiscoveryResponse")
    os.replace(tmp, path)
    await envoy.nothing()  # logged; Envoy keeps what it has
    more = publish(routing_config(("p", ["a"]), ("q", ["a", "b"])))
    got, removed = await envoy.next()
    assert set(got) <= more and set(envoy.held) == more and not removed


async def test_an_empty_cluster_file_still_answers_envoy(ads):
    """An Envoy starting on a config with no clusters waits for an answer: an empty one."""
    _publish, connect, workdir = ads
    envoy = connect()
    path = cluster_path(workdir)
    gatewayfiles.write_atomic(path, discovery_pb2.DiscoveryResponse().SerializeToString())
    got, removed = await envoy.next()
    assert got == {} and removed == []
