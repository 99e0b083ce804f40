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

from signalbox.core.errors import RequestError
from signalbox.extproc import decide
from signalbox.extproc.decisions import DecisionSigner
from signalbox.extproc.reload import TableHolder
from signalbox.extproc.server import Processor
from signalbox.extproc.strategies import SelectionState

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
