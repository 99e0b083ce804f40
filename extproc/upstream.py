"""The upstream phase: one gRPC stream per attempt whose backend speaks another API family.

Envoy runs this ext_proc as an upstream filter of every chain, skipped (by a matcher) unless
attempt.lua marked the attempt with TRANSLATE_HEADER. Which translation comes as metadata
(attempt.lua's notes, TRANSLATE_KEY). The stream carries:

1. the request's headers, only held and answered unchanged but for their length (in an
   upstream filter, a body replaced without its headers held is not the body sent: measured);
2. the buffered request body, translated here;
3. the answer chunk by chunk, without its headers: attempt.lua fixes those on the way back, and
   CEL attributes in an upstream filter describe the client's response, not the attempt's, so
   the first bytes tell a stream (translated event by event as it comes) from JSON (held and
   translated whole at its end; an error is known by its shape, the status passes as it is).

A translated JSON request costs three gRPC messages, a stream one more per chunk.

A request the backend's API cannot express gets a 400 in the client's API naming what (Envoy
sends an upstream filter's own answer straight to the client: no retry follows it). The router
phase keeps such backends from being a request's first choice (`decide.refused_apis`), so this
is met only when a later member of a failover chain cannot take the request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from signalbox.core.envoygen.contract import ATTEMPT_NS, TRANSLATE_KEY
from signalbox.core.errors import BEDROCK_API, GEMINI_API, RequestError

from . import wire
from .translate import StreamTranslator, Translation, bedrock, gemini, parse_route

log = logging.getLogger("signalbox.extproc.upstream")


def translation_of(request: ep.ProcessingRequest) -> str:
    """The translation attempt.lua marked this attempt for ("" for a router-phase stream)."""
    notes = request.metadata_context.filter_metadata.get(ATTEMPT_NS)
    if notes is None or TRANSLATE_KEY not in notes.fields:
        return ""
    return notes.fields[TRANSLATE_KEY].string_value


async def first_token(
    first: ep.ProcessingRequest, rest: AsyncIterator[ep.ProcessingRequest], metrics
) -> AsyncIterator[ep.ProcessingResponse]:
    """An attempt of a policy with a first-token deadline (envoygen `_first_token_holder`): its
    answer's headers (the first message) are answered only when its first body bytes have come,
    so Envoy's per-attempt timer runs until then; then this stream ends and the rest of the
    answer flows without Python. An answer without a body is let through at once."""
    if first.response_headers.end_of_stream:
        yield ep.ProcessingResponse(response_headers=ep.HeadersResponse())
        metrics.first_token_holds.labels("released").inc()
        return
    async for message in rest:
        if message.WhichOneof("request") == "response_body":
            yield ep.ProcessingResponse(response_headers=ep.HeadersResponse())
            yield ep.ProcessingResponse(response_body=ep.BodyResponse())
            metrics.first_token_holds.labels("released").inc()
            return
    metrics.first_token_holds.labels("ended").inc()


def _body(body: bytes, phase: str, replace: bool) -> ep.ProcessingResponse:
    """A body answer: the whole buffered body replaced, or a streamed chunk's replacement
    (possibly empty while an event or a JSON answer is incomplete)."""
    common = ep.CommonResponse(status=ep.CommonResponse.CONTINUE_AND_REPLACE if replace else ep.CommonResponse.CONTINUE)
    common.body_mutation.body = body
    return ep.ProcessingResponse(**{phase: ep.BodyResponse(response=common)})


async def _next_body(rest: AsyncIterator[ep.ProcessingRequest], kind: str) -> ep.ProcessingRequest | None:
    async for message in rest:
        if message.WhichOneof("request") == kind:
            return message
    return None


async def translate(
    first: ep.ProcessingRequest, marker: str, rest: AsyncIterator[ep.ProcessingRequest], metrics
) -> AsyncIterator[ep.ProcessingResponse]:
    """After the request's headers (the first message, already read: answered here, unchanged),
    the request body, then the answer's chunks."""
    route = parse_route(marker)
    if route is None:
        # Only attempt.lua sets the marker: a config this data plane does not understand.
        raise ValueError(f"unknown translation {marker!r}")
    src, dst, stream_usage = route
    translation = Translation(src, dst, stream_usage)
    outcome = "ok"
    try:
        # The header map is every attempt's: no length is set for a body the next attempt may
        # not send. Without one, Envoy frames the translated body itself.
        yield wire.headers_response(remove=["content-length"])
        path = wire.header_map(first.request_headers).get(":path", "")
        if dst == BEDROCK_API:
            translation.path_model = bedrock.model_of(path)
        body = await _next_body(rest, "request_body")
        if body is None:
            return
        try:
            translated = translation.request(body.request_body.body)
        except RequestError as err:
            outcome = err.code
            yield wire.immediate_error(err, api=src)
            return
        answer = _body(translated, "request_body", replace=False)
        if translation.streaming and dst in (GEMINI_API, BEDROCK_API):
            # Gemini and Bedrock stream on another method (the headers are still held, so this
            # applies).
            streamed = gemini.stream_path(path) if dst == GEMINI_API else bedrock.stream_path(path)
            answer.request_body.response.header_mutation.CopyFrom(wire.mutation([(":path", streamed)]))
        yield answer
        stream: StreamTranslator | None = None
        held: list[bytes] = []
        first_chunk = True
        async for message in rest:
            if message.WhichOneof("request") != "response_body":
                continue
            chunk = message.response_body
            if first_chunk and chunk.body:
                first_chunk = False
                if translation.is_stream(chunk.body):
                    stream = translation.stream()
            if stream is not None:
                out = stream.feed(chunk.body) + (stream.end() if chunk.end_of_stream else b"")
            else:
                held.append(chunk.body)
                out = translation.answer(b"".join(held)) if chunk.end_of_stream else b""
            yield _body(out, "response_body", replace=False)
            if chunk.end_of_stream:
                return
    finally:
        metrics.translations.labels(src, dst, outcome).inc()
