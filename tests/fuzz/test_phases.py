"""Fuzz tier, part 1: hostile bodies through the router phase, as pure functions and through the
servicer's own `Process` loop (no gRPC transport, so hundreds of cases a second).

The property: every body is routed or refused with the client's 4xx; nothing raises out of the
phase functions but a `RequestError`, and the servicer never answers 500 (which is what any
other exception turns into at its boundary).
"""

from __future__ import annotations

import asyncio
import json

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signalbox.core.compiler import compile_config
from signalbox.core.errors import RequestError
from signalbox.core.keys import key_hash
from signalbox.extproc import decide
from signalbox.extproc.decisions import DecisionSigner
from signalbox.extproc.reload import TableHolder
from signalbox.extproc.runtime import RuntimeTable
from signalbox.extproc.server import Processor
from signalbox.extproc.strategies import SelectionState
from tests.factories import backend, consumer, model, policy, provider

from .bodies import PHASE_EXAMPLES, raw_bodies

FUZZ = settings(
    max_examples=PHASE_EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/feedback", "/v1/models", "/v2/x"]


@FUZZ
@given(raw=raw_bodies)
def test_router_phase_functions_refuse_only_with_a_client_error(table, raw):
    state = SelectionState()
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        try:
            prepared = decide.prepare(table, path, {":path": path, "x-request-id": "r"}, raw, "10.0.0.1", 1 << 20)
            outcome = decide.finish(prepared, state)
        except RequestError as err:
            assert err.status < 500 or err.code == "no_healthy_backend", err
            json.loads(err.body())  # a well-formed OpenAI error
            continue
        sent = json.loads(outcome.body)
        assert sent["model"] == outcome.selection.choice.backend.upstream_model
        if prepared.features.embeddings:
            assert "embeddings" in outcome.selection.choice.backend.capabilities
    try:
        decide.apply_feedback(table, state, raw, DecisionSigner())
    except RequestError as err:
        assert err.status < 500


def _header_map(headers: dict[str, str]) -> ep.HttpHeaders:
    return ep.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
        )
    )


async def _drive(processor: Processor, path: str, raw: bytes, one_message: bool) -> list[ep.ProcessingResponse]:
    if one_message:  # as the gateway's Envoy sends it: the body, the request line as attributes
        if not raw:
            return [ep.ProcessingResponse(immediate_response=ep.ImmediateResponse())]  # Envoy answers itself
        message = ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=True))
        attrs = message.attributes["envoy.filters.http.ext_proc"].fields
        for name, value in (("request.path", path), ("request.method", "POST"), ("request.id", "fuzz-1")):
            attrs[name].string_value = value
        messages = [message]
    else:
        headers = {":method": "POST", ":path": path, "x-request-id": "fuzz-1", "content-length": str(len(raw))}
        head = _header_map(headers)
        head.end_of_stream = not raw  # Envoy sends no body message for an empty body
        messages = [ep.ProcessingRequest(request_headers=head)]
        if raw:
            messages.append(ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=True)))
    messages.append(ep.ProcessingRequest(response_headers=_header_map({":status": "200"})))

    async def stream():
        for m in messages:
            yield m

    return [r async for r in processor.Process(stream(), None)]


@FUZZ
@given(raw=raw_bodies | st.just(b""))
def test_the_servicer_never_answers_500(table, raw):
    # A holder of its own per example: a processor registers itself with its holder, and one
    # holder for the session kept every example's processor (12.9 GB after `make fuzz`'s 50,000).
    processor = Processor(TableHolder(table), max_body_bytes=1 << 20)
    for path, one_message in ((path, mode) for path in PATHS for mode in (True, False)):
        responses = asyncio.run(_drive(processor, path, raw, one_message))
        assert responses, path
        kinds = [r.WhichOneof("response") for r in responses]
        # The request phase must end in a body answer or a reply: a bare headers answer to a
        # request with no body leaves Envoy waiting for a decision that never comes.
        assert "request_body" in kinds or "immediate_response" in kinds or path == "/v2/x", (path, kinds)
        for response in responses:
            if response.WhichOneof("response") == "immediate_response":
                status = response.immediate_response.status.code
                assert status < 500 or response.immediate_response.details == "signalbox_no_healthy_backend", (
                    path,
                    response.immediate_response.body[:300],
                )
    assert processor.metrics.internal_errors._value.get() == 0


def _consumer_table() -> RuntimeTable:
    """Two consumers (one given an alias, one everything) and a policy for anonymous callers."""
    providers = [provider("p", "http://127.0.0.1:1/v1", [model("m")])]
    policies = [
        policy("mine", ["mine"], [backend("p", "m")]),
        policy("open", ["open"], [backend("p", "m")], allowAnonymous=True),
    ]
    consumers = [consumer("team", apiKey={"env": "K"}, models=["mine"]), consumer("all", apiKey={"env": "L"})]
    hashes = {"default/team": [(key_hash(CONSUMER_KEY), 0)]}
    result = compile_config(providers, policies, consumers=consumers, key_hashes=hashes)
    assert result.ok, result.problems
    return RuntimeTable.from_config(result.config)


CONSUMER_KEY = "sbx-fuzz-consumer-key-0123456789abcdef"
CONSUMER_TABLE = _consumer_table()
MODELS_PREFIXES = ["/v1/models", "/openai/models", "/openai/v1/models"]


@FUZZ
@given(
    prefix=st.sampled_from(MODELS_PREFIXES),
    # What Envoy's models route sends on: the listing, its query, or `/<id>` (any characters).
    rest=st.tuples(
        st.sampled_from(["", "?", "/"]),
        st.text(max_size=30) | st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
    ).map(lambda parts: parts[0] + parts[1] if parts[0] else ""),
    key=st.sampled_from(["", CONSUMER_KEY, "sbx-wrong"]) | st.text(max_size=40),
    key_header=st.sampled_from(["authorization", "x-api-key", "api-key"]),
    anthropic=st.booleans(),
    raw=raw_bodies,
)
def test_a_consumer_gateway_answers_any_models_or_feedback_request_with_a_client_answer(
    prefix, rest, key, key_header, anthropic, raw
):
    """With consumers the ext_proc answers the models API (per caller) and authorizes feedback:
    whatever the path, credential and body, a client answer in the caller's shape, never a 500."""
    processor = Processor(TableHolder(CONSUMER_TABLE), max_body_bytes=1 << 20)
    value = f"Bearer {key}" if key_header == "authorization" else key
    headers = {":method": "GET", ":path": prefix + rest, "x-request-id": "fuzz-2", key_header: value}
    if anthropic:
        headers["anthropic-version"] = "2023-06-01"
    head = _header_map(headers)
    head.end_of_stream = True

    async def models():
        yield ep.ProcessingRequest(request_headers=head)

    async def feedback():
        message = ep.ProcessingRequest(request_body=ep.HttpBody(body=raw, end_of_stream=True))
        attrs = message.attributes["envoy.filters.http.ext_proc"].fields
        for name, v in (("request.path", "/v1/feedback"), ("request.method", "POST"), ("request.id", "fuzz-3")):
            attrs[name].string_value = v
        attrs[f"request.headers['{key_header}']"].string_value = value
        yield message

    async def run(stream):
        return [r async for r in processor.Process(stream, None)]

    for stream, shape in ((models(), "anthropic" if anthropic else "openai"), (feedback(), "openai")):
        (answer,) = asyncio.run(run(stream))
        reply = answer.immediate_response
        assert reply.status.code in (200, 400, 401, 403, 404), (reply.status.code, reply.body[:200])
        body = json.loads(reply.body)
        if reply.status.code >= 400:
            assert "message" in body["error"] and (body.get("type") == "error") == (shape == "anthropic"), body
    assert processor.metrics.internal_errors._value.get() == 0
