"""Backend endpoints over ADS (issue 12): what Envoy's backend clusters get from the ext_proc
over a real delta-xDS gRPC stream (grpc.aio, port 0, Envoy's own protos), a rest's health
pushed without being asked, host names looked up by the ext_proc."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from signalbox.core.compiler import compile_config
from signalbox.core.envoygen.endpoints import (
    LOAD_ASSIGNMENT_TYPE,
    ORIGIN_SUFFIX,
    REACHES,
    BackendEndpoint,
    parse_resource,
)
from signalbox.extproc import xds
from signalbox.extproc.cooldown import Cooldowns
from signalbox.extproc.reload import TableHolder
from signalbox.extproc.strategies import SelectionState
from tests.extproc.adsclient import DeltaStream
from tests.factories import backend, model, policy, provider

WAIT_S = 5.0  # the longest a push may take here (it takes a tick, xds.TICK_S)


def routing_config(*names: str, host: str = "127.0.0.1", generation: int = 1):
    providers = [provider(n, f"http://{host}:{9000 + i}/v1", [model("m")]) for i, n in enumerate(names)]
    pol = policy("p", ["auto"], [backend(n, "m") for n in names], strategy="failover")
    result = compile_config(providers, [pol], generation=generation)
    assert result.ok, result.problems
    return result.config


def cluster_of(cfg, name: str) -> str:
    return next(b.cluster for b in cfg.backends if b.id == f"default/{name}/m")


class Envoy(DeltaStream):
    """The client side of the stream, as Envoy speaks it for endpoints: subscribe, read, ACK."""

    def ask(self, subscribe=(), unsubscribe=(), nonce=""):
        self.send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=LOAD_ASSIGNMENT_TYPE,
                resource_names_subscribe=list(subscribe),
                resource_names_unsubscribe=list(unsubscribe),
                response_nonce=nonce,
            )
        )

    async def next(self, timeout: float = WAIT_S) -> dict[str, dict]:
        """The next response's assignments by cluster, as JSON; ACKed."""
        response = await asyncio.wait_for(self.responses.get(), timeout)
        assert response.type_url == LOAD_ASSIGNMENT_TYPE
        self.ask(nonce=response.nonce)
        out = {}
        for resource in response.resources:
            message = endpoint_pb2.ClusterLoadAssignment()
            assert resource.resource.Unpack(message)
            out[resource.name] = json_format.MessageToDict(message)
        return out


def hosts(assignment: dict) -> list[tuple[str, str]]:
    """(address, health) of each host of one assignment."""
    return [
        (e["endpoint"]["address"]["socketAddress"]["address"], e.get("healthStatus", "UNKNOWN"))
        for group in assignment.get("endpoints", [])
        for e in group["lbEndpoints"]
    ]


@pytest.fixture
async def ads(tmp_path):
    tables = TableHolder()
    cooldowns = Cooldowns(tmp_path / "cooldowns.db")
    lookups: dict[str, list[str] | Exception] = {}

    async def resolver(host: str, port: int) -> list[str]:
        found = lookups.get(host, OSError("no such host"))
        if isinstance(found, Exception):
            raise found
        return found

    server = grpc.aio.server()
    endpoints = xds.Endpoints(tables, SelectionState(cooldowns=cooldowns), resolver=resolver)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(xds.AggregatedDiscovery(endpoints), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    envoy = Envoy(channel)
    yield envoy, tables, cooldowns, lookups
    envoy.close()
    await channel.close()
    await server.stop(None)


async def test_each_backend_cluster_gets_its_address_and_the_host_metadata_attempts_read(ads):
    envoy, tables, _, _ = ads
    cfg = routing_config("a", "b")
    tables.install(cfg)
    envoy.ask(subscribe=[cluster_of(cfg, "a"), cluster_of(cfg, "b")])
    got = await envoy.next()
    assert set(got) == {cluster_of(cfg, "a"), cluster_of(cfg, "b")}
    a = got[cluster_of(cfg, "a")]
    assert hosts(a) == [("127.0.0.1", "UNKNOWN")]
    (host,) = a["endpoints"][0]["lbEndpoints"]
    assert host["endpoint"]["address"]["socketAddress"]["portValue"] == 9000
    assert host["metadata"]["filterMetadata"]["signalbox"]["backend"] == "default/a/m"
    await envoy.nothing()  # nothing changed, nothing sent again


async def test_a_cluster_of_a_config_not_loaded_yet_is_answered_once_it_is(ads):
    envoy, tables, _, _ = ads
    tables.install(routing_config("a"))
    newer = routing_config("a", "c", generation=2)
    envoy.ask(subscribe=[cluster_of(newer, "c")])  # Envoy read the new clusters first
    await envoy.nothing()
    tables.install(newer)
    assert hosts((await envoy.next())[cluster_of(newer, "c")]) == [("127.0.0.1", "UNKNOWN")]


async def test_a_rest_takes_the_endpoint_out_and_its_end_puts_it_back_without_being_asked(ads):
    envoy, tables, cooldowns, _ = ads
    cfg = routing_config("a", "b")
    tables.install(cfg)
    envoy.ask(subscribe=[cluster_of(cfg, "a"), cluster_of(cfg, "b")])
    await envoy.next()
    started = time.monotonic()
    cooldowns.observe("default/a/m", 429, {"retry-after": "1"}, time.time())
    rested = await envoy.next()
    assert set(rested) == {cluster_of(cfg, "a")}  # only what changed travels
    assert hosts(rested[cluster_of(cfg, "a")]) == [("127.0.0.1", "UNHEALTHY")]
    back = await envoy.next()
    assert hosts(back[cluster_of(cfg, "a")]) == [("127.0.0.1", "UNKNOWN")]
    assert time.monotonic() - started >= 1.0  # not before the Retry-After has passed


async def test_host_names_are_looked_up_and_a_failed_lookup_keeps_the_last_addresses(ads, monkeypatch):
    envoy, tables, _, lookups = ads
    monkeypatch.setattr(xds, "DNS_REFRESH_S", 0.0)  # look up on every tick
    lookups["llm.internal"] = ["10.0.0.1", "10.0.0.2"]
    cfg = routing_config("a", host="llm.internal")
    tables.install(cfg)
    name = cluster_of(cfg, "a")
    envoy.ask(subscribe=[name])
    got = await envoy.next()
    assert hosts(got[name]) == [("10.0.0.1", "UNKNOWN"), ("10.0.0.2", "UNKNOWN")]
    host = got[name]["endpoints"][0]["lbEndpoints"][0]["endpoint"]
    assert host["hostname"] == "llm.internal"  # TLS and logs keep the name
    lookups["llm.internal"] = OSError("DNS is down")
    await envoy.nothing()  # a failed lookup changes nothing
    lookups["llm.internal"] = ["10.0.0.3"]
    assert hosts((await envoy.next())[name]) == [("10.0.0.3", "UNKNOWN")]


async def test_each_way_of_reaching_a_backend_is_its_own_resource_answered_only_for_that_way(ads, monkeypatch):
    """A cluster asks for its endpoints by its name and how it reaches the backend (plain, its
    own TLS, the endpoint's shared origin: envoygen.endpoints.resource_name). The worker answers
    an origin's resource with the origin's listener whatever it has looked up, a TLS provider's
    own with its addresses, and a plain cluster's with no host at all: a cluster that stopped
    speaking TLS, held by Envoy with its old provider for a moment, is never given the TLS port.
    A rest marks the backend unhealthy in every resource that has a host."""
    envoy, tables, cooldowns, lookups = ads
    monkeypatch.setattr(xds, "DNS_REFRESH_S", 0.0)
    lookups["llm.example.com"] = ["10.0.0.9"]
    providers = [provider(n, "https://llm.example.com/v1", [model("m")]) for n in ("a", "b")]
    pol = policy("p", ["auto"], [backend("a", "m"), backend("b", "m")], strategy="failover")
    result = compile_config(providers, [pol])
    assert result.ok, result.problems
    cfg = result.config
    tables.install(cfg)
    a, b = cluster_of(cfg, "a"), cluster_of(cfg, "b")
    envoy.ask(subscribe=[a, a + "/tls", a + ORIGIN_SUFFIX, b + ORIGIN_SUFFIX])
    got = await envoy.next()
    assert hosts(got[a + "/tls"]) == [("10.0.0.9", "UNKNOWN")]
    assert got[a].get("endpoints", []) == []  # a plain cluster: not the TLS provider's address
    places = set()
    for name in (a + ORIGIN_SUFFIX, b + ORIGIN_SUFFIX):
        assert got[name]["clusterName"] == name
        (host,) = got[name]["endpoints"][0]["lbEndpoints"]
        assert set(host["endpoint"]["address"]) == {"envoyInternalAddress"}
        places.add(host["endpoint"]["address"]["envoyInternalAddress"]["serverListenerName"])
        assert host["endpoint"]["hostname"] == "llm.example.com"
        assert host["metadata"]["filterMetadata"]["signalbox"]["provider"] in ("a", "b")
    assert places == {"origin.llm.example.com.443.2000ms"}  # one origin for both
    cooldowns.observe("default/a/m", 429, {"retry-after": "30"}, time.time())
    rested = await envoy.next()
    assert {a + "/tls", a + ORIGIN_SUFFIX} <= set(rested) <= {a, a + "/tls", a + ORIGIN_SUFFIX}
    for name in (a + "/tls", a + ORIGIN_SUFFIX):
        (host,) = rested[name]["endpoints"][0]["lbEndpoints"]
        assert host["healthStatus"] == "UNHEALTHY"
    assert rested.get(a, {}).get("endpoints", []) == []  # still no host


async def test_a_plain_providers_tls_resource_gets_no_host(ads):
    """The reverse move: a cluster still speaking TLS to a provider now on http:// is given no
    host rather than the plain address (a TLS handshake to a plain port helps nobody)."""
    envoy, tables, _, _ = ads
    cfg = routing_config("a")
    tables.install(cfg)
    a = cluster_of(cfg, "a")
    envoy.ask(subscribe=[a, a + "/tls"])
    got = await envoy.next()
    assert hosts(got[a]) == [("127.0.0.1", "UNKNOWN")]
    assert got[a + "/tls"].get("endpoints", []) == []


async def test_a_host_never_found_gets_no_endpoint_and_an_unsubscribed_cluster_no_news(ads):
    envoy, tables, cooldowns, _ = ads
    cfg = routing_config("a", "b", host="nowhere.invalid")
    tables.install(cfg)
    envoy.ask(subscribe=[cluster_of(cfg, "a"), cluster_of(cfg, "b")])
    got = await envoy.next()
    assert got[cluster_of(cfg, "a")].get("endpoints", []) == []  # as STRICT_DNS: a cluster with no host
    envoy.ask(unsubscribe=[cluster_of(cfg, "a")])
    await asyncio.sleep(xds.TICK_S)
    cooldowns.observe("default/a/m", 429, {"retry-after": "30"}, time.time())
    await envoy.nothing()


async def test_a_new_stream_gets_everything_again(ads):
    envoy, tables, _, _ = ads
    cfg = routing_config("a")
    tables.install(cfg)
    envoy.ask(subscribe=[cluster_of(cfg, "a")])
    await envoy.next()
    second = Envoy(envoy.channel)  # Envoy reconnected (to this worker or another)
    second.ask(subscribe=[cluster_of(cfg, "a")])
    assert cluster_of(cfg, "a") in await second.next()
    second.close()


async def test_a_large_answer_is_split_so_that_no_message_outgrows_the_grpc_limit(ads):
    envoy, tables, _, lookups = ads
    lookups["many.internal"] = [f"10.0.{i // 250}.{i % 250}" for i in range(400)]  # one name, 400 addresses
    cfg = routing_config(*(f"p{i}" for i in range(12)), host="many.internal")
    tables.install(cfg)
    names = [b.cluster for b in cfg.backends]
    envoy.ask(subscribe=names)
    got: dict[str, dict] = {}
    sizes = []
    while len(got) < len(names):
        response = await asyncio.wait_for(envoy.responses.get(), WAIT_S)
        sizes.append(response.ByteSize())
        envoy.ask(nonce=response.nonce)
        got.update({r.name: r for r in response.resources})
    assert len(sizes) > 1 and max(sizes) < xds.BATCH_BYTES + 64 * 1024


async def test_a_rest_reaches_every_open_stream(ads):
    """A reconnecting Envoy's new stream overlaps the old one: both hear of a rest."""
    envoy, tables, cooldowns, _ = ads
    cfg = routing_config("a")
    tables.install(cfg)
    second = Envoy(envoy.channel)
    try:
        for stream in (envoy, second):
            stream.ask(subscribe=[cluster_of(cfg, "a")])
            await stream.next()
        cooldowns.observe("default/a/m", 429, {"retry-after": "30"}, time.time())
        for stream in (envoy, second):
            assert hosts((await stream.next())[cluster_of(cfg, "a")]) == [("127.0.0.1", "UNHEALTHY")]
    finally:
        second.close()


@settings(max_examples=200, deadline=None)
@given(
    host=st.one_of(
        st.ip_addresses().map(str), st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z0-9-]{1,10}){0,3}", fullmatch=True)
    ),
    port=st.integers(1, 65535),
    names=st.lists(st.text(min_size=1, max_size=30), min_size=4, max_size=4),
    addresses=st.lists(st.ip_addresses().map(str), max_size=5),
    resting=st.booleans(),
    origin=st.one_of(st.just(""), st.text(min_size=1, max_size=40)),
    reach=st.sampled_from(sorted(REACHES)),
)
def test_an_assignment_is_the_message_its_description_parses_to(host, port, names, addresses, resting, origin, reach):
    """The worker builds assignments without json_format (5 times faster); what it sends must
    be exactly what the shared description (envoygen.endpoints) says."""
    assume("/" not in names[0])  # a cluster's name never holds one (compiler._cluster_name)
    endpoint = BackendEndpoint(names[0], names[1], names[2], names[3], "m", "openai", host, port, origin)
    described = endpoint.load_assignment(addresses, resting, reach)
    want = json_format.ParseDict(described, endpoint_pb2.ClusterLoadAssignment())
    got = endpoint_pb2.ClusterLoadAssignment()
    assert xds.load_assignment(endpoint, addresses, resting, reach).Unpack(got)
    assert parse_resource(got.cluster_name) == (endpoint.cluster, reach)
    if reach != endpoint.reach:  # another way than the provider's: never an address, whatever is known
        assert not any(e.endpoint.address.HasField("socket_address") for g in got.endpoints for e in g.lb_endpoints)
    assert got == want
