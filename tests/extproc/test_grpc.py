"""The ext_proc servicer over a real gRPC stream (grpc.aio, port 0) with Envoy's own protos."""

import asyncio
import json
import threading
import time
from collections import Counter

import grpc
import pytest
import watchfiles
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.protobuf import json_format, struct_pb2
from grpc._cython import cygrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from signalbox.core.compiler import compile_config
from signalbox.core.envoygen.contract import TARGET_NS, target_groups
from signalbox.extproc import decisions
from signalbox.extproc.reload import TableHolder
from signalbox.extproc.server import serve
from tests.factories import backend, model, policy, provider

KEY = "sk-grpc-test-key"


def routing_config(generation=1, weight_b=1):
    providers = [
        provider("a", "http://127.0.0.1:9001/v1", [model("m", upstreamName="model-a")], auth={"env": "A_KEY"}),
        provider("b", "http://127.0.0.1:9002/v1", [model("m", upstreamName="model-b")]),
    ]
    pol = policy("p", ["auto"], [backend("a", "m", weight=1), backend("b", "m", weight=weight_b)], strategy="failover")
    result = compile_config(providers, [pol], generation=generation)
    assert result.ok
    return result.config


@pytest.fixture
async def stub(monkeypatch):
    monkeypatch.setenv("A_KEY", KEY)
    holder = TableHolder()
    holder.install(routing_config())
    server, port = await serve(holder, "127.0.0.1:0", max_body_bytes=1024)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield ep_grpc.ExternalProcessorStub(channel), channel, holder
    await channel.close()
    await server.stop(None)


def table_target(stub) -> str:
    """The aggregate cluster of the test policy's first backend (named by its chain)."""
    return routing_config().policies[0].backends[0].target


def headers_msg(headers, end_of_stream=False, attributes=None):
    req = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
            ),
            end_of_stream=end_of_stream,
        )
    )
    for name, value in (attributes or {}).items():
        req.attributes["envoy.filters.http.ext_proc"].fields[name].CopyFrom(struct_pb2.Value(string_value=value))
    return req


def body_msg(payload: bytes):
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=payload, end_of_stream=True))


async def exchange(stub, *messages):
    call = stub.Process()
    out = []
    for m in messages:
        await call.write(m)
        response = await call.read()
        out.append(response)
        if response.HasField("immediate_response"):
            break
    await call.done_writing()
    return out


def set_headers(mutation):
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


CHAT = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}


def router_message(payload: bytes, headers: dict[str, str] | None = None) -> ep.ProcessingRequest:
    """What the gateway's Envoy sends the router phase: one body message, the request line and
    the headers policies read as attributes."""
    attributes = {"request.path": CHAT[":path"], "request.method": "POST", "request.id": "req-1"}
    attributes |= {f"request.headers['{k}']": v for k, v in (headers or {}).items()}
    attributes["source.address"] = "10.1.2.3:5555"
    message = body_msg(payload)
    for name, value in attributes.items():
        message.attributes["envoy.filters.http.ext_proc"].fields[name].CopyFrom(struct_pb2.Value(string_value=value))
    return message


async def test_router_phase_decides_in_one_message_and_names_its_target_in_metadata(stub):
    s, _, _ = stub
    payload = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode()
    (only,) = await exchange(s, router_message(payload))
    common = only.request_body.response
    assert common.status == ep.CommonResponse.CONTINUE_AND_REPLACE
    assert json.loads(common.body_mutation.body)["model"] == "model-a"
    assert common.clear_route_cache
    # No key and no header for Envoy to apply: attempt.lua prepares every attempt in Envoy.
    assert KEY.encode() not in only.SerializeToString()
    second = only
    meta = json_format.MessageToDict(second.dynamic_metadata)["signalbox"]
    assert meta["target"] == table_target(stub)
    # ... and once more where the policy's one decided route reads its cluster from (Envoy's
    # priority group cluster specifier), in the shape that specifier reads.
    groups = json_format.MessageToDict(second.dynamic_metadata)[TARGET_NS]
    assert groups == target_groups(meta["target"], meta["split"])  # what the route's specifier reads
    # The policy is compiled (failover): Envoy sends its requests to the first chain, and so
    # does the decided route.
    assert groups["priority_groups"][0]["clusters"] == [{"cluster_name": meta["target"], "weight": 1}]

    assert (meta["policy"], meta["reason"]) == ("p", "failover:priority")
    assert meta["body_model"] == "model-a"  # attempt.lua leaves this backend's body alone
    token = meta["decision"]  # what the client echoes back with quality feedback
    assert decisions.unpack(token) == ("p", "chat/simple", "default/a/m")
    payload, _, mac = token.partition(".")
    assert len(mac) >= 20  # signed: feedback cannot name a decision the gateway did not make


async def test_a_compiled_policys_decision_goes_by_its_split_not_the_backend_picked(monkeypatch):
    """A weighted policy is Envoy's to route; a request the router phase decides for it anyway
    goes where Envoy would send it: one of its chains by its weights (the decided route reads
    the groups), whichever backend the router phase picked."""
    monkeypatch.setenv("A_KEY", KEY)
    providers = [
        provider("a", "http://127.0.0.1:9001/v1", [model("m")], auth={"env": "A_KEY"}),
        provider("b", "http://127.0.0.1:9002/v1", [model("m")]),
    ]
    weighted = policy("p", ["auto"], [backend("a", "m", weight=1), backend("b", "m", weight=3)], strategy="weighted")
    cfg = compile_config(providers, [weighted]).config
    assert cfg.policies[0].compiled
    holder = TableHolder()
    holder.install(cfg)
    server, port = await serve(holder, "127.0.0.1:0", max_body_bytes=1024)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        payload = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode()
        (only,) = await exchange(ep_grpc.ExternalProcessorStub(channel), router_message(payload))
        meta = json_format.MessageToDict(only.dynamic_metadata)
        (group,) = meta[TARGET_NS]["priority_groups"]
        a, b = (x.target for x in cfg.policies[0].backends)
        assert group["clusters"] == [{"cluster_name": a, "weight": 1}, {"cluster_name": b, "weight": 3}]
    finally:
        await channel.close()
        await server.stop(None)


async def test_router_phase_errors_are_openai_json_immediate_responses(stub):
    s, _, _ = stub
    (resp,) = await exchange(s, headers_msg({":method": "POST", ":path": "/v1/nope"}))
    assert resp.immediate_response.status.code == 404
    (_, resp) = await exchange(s, headers_msg(CHAT), body_msg(b'{"model": "gpt-9"}'))
    err = json.loads(resp.immediate_response.body)["error"]
    assert resp.immediate_response.status.code == 404 and err["code"] == "model_not_found"
    assert "available: auto" in err["message"]
    assert set_headers(resp.immediate_response.headers)["x-signalbox-reason"] == "model_not_found"
    (resp,) = await exchange(s, headers_msg({**CHAT, "content-length": "5000"}))
    assert resp.immediate_response.status.code == 413
    (resp,) = await exchange(s, headers_msg({":method": "GET", ":path": "/v1/models"}, end_of_stream=True))
    assert [m["id"] for m in json.loads(resp.immediate_response.body)["data"]] == ["auto"]


async def test_a_headers_first_stream_is_still_answered(stub):
    s, _, _ = stub
    payload = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode()
    first, second = await exchange(s, headers_msg(CHAT), body_msg(payload))
    assert first.HasField("request_headers")
    assert json_format.MessageToDict(second.dynamic_metadata)["signalbox"]["target"] == table_target(stub)


async def test_bad_config_file_keeps_the_good_table(stub, tmp_path):
    _, _, holder = stub
    good = tmp_path / "config.json"
    good.write_text(json_format.MessageToJson(routing_config(generation=2)))
    assert holder.load_file(good) and holder.current.generation == 2
    good.write_text("{not json")
    assert not holder.load_file(good)
    future = routing_config(generation=3)
    future.schema_version = 42
    good.write_text(json_format.MessageToJson(future))
    assert not holder.load_file(good)
    assert holder.current.generation == 2 and holder.reload_failures == 2


async def test_a_reload_builds_its_table_off_the_event_loop_and_keeps_a_good_one(stub, tmp_path, monkeypatch):
    """A table at the 2,000-provider fleet takes 0.25 s to build: in a thread, so the worker
    keeps answering meanwhile; a bad file still leaves the table in force."""
    import threading

    from signalbox.extproc import runtime

    _, _, holder = stub
    built_on: list[str] = []
    original = runtime.RuntimeTable.from_config

    def recording(*args, **kwargs):
        built_on.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(runtime.RuntimeTable, "from_config", staticmethod(recording))
    path = tmp_path / "config.json"
    path.write_text(json_format.MessageToJson(routing_config(generation=5)))
    assert await holder.load_file_async(path) and holder.current.generation == 5
    assert built_on and built_on[0] != threading.current_thread().name
    path.write_text("{not json")
    assert not await holder.load_file_async(path)
    assert holder.current.generation == 5 and holder.last_error


async def until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def count_table_builds(monkeypatch) -> list[int]:
    """The generation of each routing table built from now on, in order."""
    from signalbox.extproc import runtime

    builds: list[int] = []
    original = runtime.RuntimeTable.from_config

    def counting(cfg, *args, **kwargs):
        builds.append(cfg.generation)
        return original(cfg, *args, **kwargs)

    monkeypatch.setattr(runtime.RuntimeTable, "from_config", staticmethod(counting))
    return builds


@pytest.mark.parametrize("changed_before_the_watch", [False, True])
async def test_the_watch_builds_no_second_table_for_the_file_loaded_at_start(
    stub, tmp_path, monkeypatch, changed_before_the_watch
):
    """A worker loads its config, then watches the file. The watch built the same file's table
    again, beside the first and in another thread: each worker at the 2,000-provider fleet was
    about 9 MB larger for good. A file that changed in between is still loaded."""
    _, _, holder = stub
    builds = count_table_builds(monkeypatch)
    # When the watch starts watching (after its catch-up load, if any): only then is a write
    # one it must see.
    watching_now = asyncio.Event()
    real_awatch = watchfiles.awatch

    def awatch(*args, **kwargs):
        watching_now.set()
        return real_awatch(*args, **kwargs)

    monkeypatch.setattr(watchfiles, "awatch", awatch)
    path = tmp_path / "config" / "config.json"
    path.parent.mkdir()
    path.write_text(json_format.MessageToJson(routing_config(generation=7)))
    assert holder.load_file(path)
    if changed_before_the_watch:
        path.write_text(json_format.MessageToJson(routing_config(generation=8)))
    stop = asyncio.Event()
    watching = asyncio.create_task(holder.watch(path, stop))
    try:
        await asyncio.wait_for(watching_now.wait(), 10)
        assert holder.current.generation == (8 if changed_before_the_watch else 7)
        path.write_text(json_format.MessageToJson(routing_config(generation=9)))
        await until(lambda: holder.current.generation == 9)
    finally:
        stop.set()
        await watching
    assert builds == ([7, 8, 9] if changed_before_the_watch else [7, 9])


async def test_the_watch_waits_quietly_for_the_file_and_rebuilds_only_when_it_changes(stub, tmp_path, monkeypatch):
    """`signalbox up` starts its workers before the config is written: each logged an error
    and counted a reload failure for the file not being there yet. Other files written in the
    folder rebuilt the table in force each time, and a bad file was reported again on each."""
    _, _, holder = stub
    builds = count_table_builds(monkeypatch)
    events = asyncio.Queue()
    real_awatch = watchfiles.awatch

    async def awatch(*args, **kwargs):
        async for changes in real_awatch(*args, **kwargs):
            yield changes
            events.put_nowait(changes)  # after the watch has handled them

    monkeypatch.setattr(watchfiles, "awatch", awatch)
    path = tmp_path / "config" / "config.json"
    stop = asyncio.Event()
    watching = asyncio.create_task(holder.watch(path, stop))
    try:
        await until(path.parent.exists)
        for n in range(3):  # a writer's temporary files, before the config exists and after
            (path.parent / f".tmp{n}").write_text("x")
            await asyncio.wait_for(events.get(), 10)
            if n == 0:
                assert holder.reload_failures == 0 and builds == []
                path.write_text(json_format.MessageToJson(routing_config(generation=4)))
                await until(lambda: holder.current.generation == 4)
        assert builds == [4] and holder.reload_failures == 0
        path.write_text("{not json")
        await until(lambda: holder.reload_failures == 1)
        (path.parent / ".tmp9").write_text("x")
        await asyncio.wait_for(events.get(), 10)
        while not events.empty():
            events.get_nowait()
        (path.parent / ".tmp10").write_text("x")
        await asyncio.wait_for(events.get(), 10)
        assert holder.reload_failures == 1 and holder.current.generation == 4
    finally:
        stop.set()
        await watching
    assert builds == [4]


async def test_health_service_reports_serving(stub):
    _, channel, _ = stub
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _calls_started() -> int:
    """Calls every gRPC server of this process has received (channelz), taken or not yet taken
    by its application."""
    servers = json.loads(cygrpc.channelz_get_servers(0)).get("server", [])
    return sum(int(s.get("data", {}).get("callsStarted", 0)) for s in servers)


async def test_a_burst_of_streams_waits_for_a_busy_worker_instead_of_being_refused():
    """gRPC core holds calls the worker's event loop has not taken yet, and refused them at
    random past 1,000 waiting and all past 3,000: 5,000 streams opened at once lost up to 343
    (503 routing_unavailable from Envoy). Here the worker's loop is busy until gRPC has received
    every call of a burst larger than that; each must then be answered."""
    holder = TableHolder()
    holder.install(routing_config())
    server, port = await serve(holder, "127.0.0.1:0", max_body_bytes=1024)
    burst = 3500
    codes: list[grpc.StatusCode] = []

    def open_burst() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            calls = [check.future(health_pb2.HealthCheckRequest(), timeout=120) for _ in range(burst)]
            codes.extend(call.code() for call in calls)

    try:
        before = _calls_started()
        client = threading.Thread(target=open_burst)
        client.start()
        # The event loop is held here (as by a busy worker) until every call has reached gRPC.
        deadline = time.monotonic() + 60
        while _calls_started() - before < burst:
            assert time.monotonic() < deadline, f"{_calls_started() - before} of {burst} calls reached the server"
            time.sleep(0.01)
        await asyncio.to_thread(client.join, 120)
        assert len(codes) == burst
        refused = Counter(code for code in codes if code != grpc.StatusCode.OK)
        assert not refused, f"{sum(refused.values())} of {burst} refused: {dict(refused)}"
    finally:
        await server.stop(None)
