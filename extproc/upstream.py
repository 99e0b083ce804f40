"""The upstream phase: one gRPC stream per attempt whose backend speaks another API family.

Envoy runs this ext_proc as an upstream filter of every chain, skipped (by a matcher) unless
attempt.lua marked the attempt with TRANSLATE_HEADER. The stream then carries, in order: the
request headers, the buffered request body (translated here), the response headers (the body
mode is chosen from them: a stream is translated chunk by chunk as it arrives, anything else
whole) and the response body.

A request the backend's API cannot express gets a 400 in the client's API naming what (Envoy
sends an upstream filter's own answer straight to the client: no retry follows it). The router
phase keeps such backends from being a request's first choice (`decide.refused_apis`), so this
is met only when a later member of a failover chain cannot take the request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from signalbox.core.envoygen.contract import TRANSLATE_HEADER
from signalbox.core.errors import RequestError

from . import wire
from .translate import Translation, parse_route

log = logging.getLogger("signalbox.extproc.upstream")


def is_translation(headers: dict[str, str]) -> bool:
    return TRANSLATE_HEADER in headers


def _body(body: bytes, phase: str) -> ep.ProcessingResponse:
    common = ep.CommonResponse(status=ep.CommonResponse.CONTINUE_AND_REPLACE)
    common.body_mutation.body = body
    return ep.ProcessingResponse(**{phase: ep.BodyResponse(response=common)})


def _streamed(body: bytes) -> ep.ProcessingResponse:
    """A streamed chunk's replacement (possibly empty while an event is incomplete)."""
    common = ep.CommonResponse()
    common.body_mutation.body = body
    return ep.ProcessingResponse(response_body=ep.BodyResponse(response=common))


async def translate(
    first: ep.ProcessingRequest, rest: AsyncIterator[ep.ProcessingRequest], metrics
) -> AsyncIterator[ep.ProcessingResponse]:
    headers = wire.header_map(first.request_headers)
    route = parse_route(headers.get(TRANSLATE_HEADER, ""))
    if route is None:
        # Only attempt.lua sets the marker (clients' copies are removed): a config mismatch.
        raise ValueError(f"unknown translation {headers.get(TRANSLATE_HEADER)!r}")
    src, dst = route
    translation = Translation(src, dst)
    outcome = "ok"
    try:
        # The header map is shared by every attempt of the request, so no length is set here (the
        # next attempt's body may differ): without one, Envoy frames the body itself.
        yield wire.headers_response(set_headers=translation.request_headers(), remove=["content-length"])
        stream = None
        status = 200
        async for message in rest:
            kind = message.WhichOneof("request")
            if kind == "request_body":
                try:
                    translated = translation.request(message.request_body.body)
                except RequestError as err:
                    outcome = err.code
                    yield wire.immediate_error(err, api=src)
                    return
                yield _body(translated, "request_body")
            elif kind == "response_headers":
                got = wire.header_map(message.response_headers)
                status = int(got.get(":status", "200") or 200)
                streaming = status == 200 and "text/event-stream" in got.get("content-type", "")
                response = ep.ProcessingResponse(
                    response_headers=ep.HeadersResponse(
                        response=ep.CommonResponse(
                            header_mutation=wire.mutation(
                                [] if streaming else [("content-type", "application/json")], remove=["content-length"]
                            )
                        )
                    )
                )
                if streaming:
                    stream = translation.stream()
                    response.mode_override.response_body_mode = pm.ProcessingMode.STREAMED
                else:
                    response.mode_override.response_body_mode = pm.ProcessingMode.BUFFERED
                yield response
            elif kind == "response_body":
                chunk = message.response_body
                if stream is None:
                    yield _body(translation.answer(chunk.body, status), "response_body")
                    return
                out = stream.feed(chunk.body)
                if chunk.end_of_stream:
                    out += stream.end()
                yield _streamed(out)
                if chunk.end_of_stream:
                    return
    finally:
        metrics.translations.labels(src, dst, outcome).inc()
