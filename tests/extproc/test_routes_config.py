"""A request is decided by the config whose routes it arrived under (issue 12).

A change reaches the workers before Envoy's routes, and Envoy keeps the routes a request
arrived under for the whole request. A worker that decided by its newest config sent a policy's
new target to routes that had no route for it (a 503 until the routes came). Envoy names the
config of the request's routes in the virtual host (`contract.virtual_host_name`, sent as the
attribute `xds.virtual_host_name`), and the router phase decides by that config while it has it.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import json_format, struct_pb2

from signalbox.core.compiler import compile_config
from signalbox.core.envoygen.contract import VIRTUAL_HOST_ATTRIBUTE, routes_key, virtual_host_name
from signalbox.extproc import reload
from signalbox.extproc.reload import TableHolder
from signalbox.extproc.server import serve
from tests.extproc.test_grpc import exchange, router_message
from tests.factories import backend, model, policy, provider

PROVIDERS = [
    provider("a", "http://127.0.0.1:9001/v1", [model("m")]),
    provider("b", "http://127.0.0.1:9002/v1", [model("m")]),
]


def config(*policies: tuple[str, str]):
    """Providers a and b; each policy (alias, its one provider), decided by the router phase."""
    result = compile_config(PROVIDERS, [policy(a, [a], [backend(p, "m")], strategy="cost") for a, p in policies])
    assert result.ok
    return result.config


OLD = config(("moving", "a"))
NEW = config(("moving", "b"), ("added", "a"))


def arriving(alias: str, under: str | None) -> object:
    """The router phase's message for `alias`, as Envoy sends it under the routes of the config
    with routes key `under` (None: an Envoy that does not say)."""
    payload = json.dumps({"model": alias, "messages": [{"role": "user", "content": "hi"}]}).encode()
    message = router_message(payload)
    if under is not None:
        name = virtual_host_name(under)
        message.attributes["envoy.filters.http.ext_proc"].fields[VIRTUAL_HOST_ATTRIBUTE].CopyFrom(
            struct_pb2.Value(string_value=name)
        )
    return message


def target_of(cfg, alias: str) -> str:
    return next(p for p in cfg.policies if p.name == alias).backends[0].target


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def changed():
    """A worker that loaded OLD, then NEW (Envoy's routes may still be OLD's)."""
    clock = Clock()
    holder = TableHolder(clock=clock)
    holder.install(OLD)
    holder.install(NEW)
    server, port = await serve(holder, "127.0.0.1:0", max_body_bytes=4096)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield ep_grpc.ExternalProcessorStub(channel), holder, clock
    await channel.close()
    await server.stop(None)


async def decided(stub, alias: str, under: str | None) -> dict:
    (answer,) = await exchange(stub, arriving(alias, under))
    assert answer.HasField("request_body"), answer
    return json_format.MessageToDict(answer.dynamic_metadata)["signalbox"]


async def test_a_request_under_the_old_routes_goes_where_they_route(changed):
    stub, _, _ = changed
    assert target_of(OLD, "moving") != target_of(NEW, "moving")
    assert (await decided(stub, "moving", routes_key(OLD)))["target"] == target_of(OLD, "moving")
    assert (await decided(stub, "moving", routes_key(NEW)))["target"] == target_of(NEW, "moving")


async def test_routes_of_no_config_the_worker_has_are_decided_by_the_one_in_force(changed):
    stub, _, _ = changed
    for under in (None, "", "f" * 64):  # an Envoy that does not say, or a worker behind it
        assert (await decided(stub, "moving", under))["target"] == target_of(NEW, "moving")


async def test_an_alias_the_old_routes_lack_is_decided_by_the_config_in_force(changed):
    """Not a 404: the newest config serves it, and Envoy answers 503 until its routes come."""
    stub, _, _ = changed
    assert (await decided(stub, "added", routes_key(OLD)))["target"] == target_of(NEW, "added")


async def test_the_old_table_goes_once_envoy_has_had_the_new_routes_for_a_while(changed):
    stub, holder, clock = changed
    clock.now = 1000.0  # however long Envoy took: no request under the new routes yet
    assert (await decided(stub, "moving", routes_key(OLD)))["target"] == target_of(OLD, "moving")
    await decided(stub, "moving", routes_key(NEW))  # Envoy has the new routes
    clock.now += reload.PREVIOUS_KEPT_S - 1
    assert (await decided(stub, "moving", routes_key(OLD)))["target"] == target_of(OLD, "moving")
    clock.now += 1
    assert (await decided(stub, "moving", routes_key(OLD)))["target"] == target_of(NEW, "moving")
    assert holder.previous is None


async def test_the_old_table_goes_in_time_without_another_request(monkeypatch):
    """A worker that gets no request after Envoy's new routes still lets the old table go."""
    monkeypatch.setattr(reload, "PREVIOUS_KEPT_S", 0.05)
    holder = TableHolder()
    holder.install(OLD)
    holder.install(NEW)
    assert holder.for_routes(routes_key(NEW)) is holder.current  # the first under the new routes
    deadline = time.monotonic() + 5
    while holder.previous is not None:
        assert time.monotonic() < deadline, "the old table was kept"
        await asyncio.sleep(0.01)


def test_a_change_that_sends_no_policy_elsewhere_keeps_no_table_before_it():
    """Added policies, and policies that keep their targets: every decision the new config
    makes for an old alias has a route in the old routes, so the old table is not kept (at
    the 2,000-provider fleet a table is about 10 MB of each worker)."""
    holder = TableHolder()
    holder.install(OLD)
    holder.install(config(("moving", "a"), ("added", "b")))
    assert holder.previous is None
    holder.install(config(("added", "b")))  # "moving" is gone: its old routes still serve it
    assert holder.previous is not None


def test_only_a_changed_config_keeps_the_one_before():
    holder = TableHolder()
    holder.install(OLD)
    assert holder.previous is None  # the first table has none before it
    holder.install(OLD)  # the same config again (a key rotation rewrites it)
    assert holder.previous is None
    holder.install(NEW)
    assert holder.previous is not None and holder.previous.routes_key == routes_key(OLD)
    holder.install(config(("moving", "a"), ("third", "b")))
    assert holder.previous.routes_key == routes_key(NEW)  # one table before, never more
