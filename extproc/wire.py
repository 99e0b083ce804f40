"""Translation between Envoy's ext_proc protobuf messages and the pure phase functions.

The one place `RequestError`s become Envoy immediate responses, and the one place header maps
are read (raw_value first: Envoy fills it, not `value`, for non-UTF-8-safe transport).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format

from signalbox.core.envoygen.contract import (
    JWT_NAMESPACE,
    JWT_PAYLOAD_KEY,
    METADATA_NS,
    SPLIT_KEY,
    TARGET_NS,
    VIRTUAL_HOST_ATTRIBUTE,
    put_target_groups,
    routes_key_of,
)
from signalbox.core.errors import RequestError

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def header_map(headers: ep.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in headers.headers.headers:
        out[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


# Attributes of the router phase's message, and the header names the decision code reads them by.
_ATTRIBUTE_HEADERS = {
    "request.path": ":path",
    "request.method": ":method",
    "request.id": "x-request-id",
}
_HEADER_ATTRIBUTE = re.compile(r"^request\.headers\['([^']+)'\]$")


def attribute_headers(request: ep.ProcessingRequest) -> dict[str, str]:
    """The request's headers as the router phase receives them: attributes of its one message
    (the request line, its id, the peer, and the headers policies read), not a headers message."""
    out: dict[str, str] = {}
    for attrs in request.attributes.values():
        for name, value in attrs.fields.items():
            text = value.string_value
            if name in _ATTRIBUTE_HEADERS:
                out[_ATTRIBUTE_HEADERS[name]] = text
            elif name == "source.address":
                # The client address (hash fallback), as Envoy's x-envoy-external-address would say.
                out["x-envoy-external-address"] = text.rsplit(":", 1)[0].strip("[]")
            elif (header := _HEADER_ATTRIBUTE.match(name)) and text:
                out[header.group(1)] = text
    return out


def routes_key(request: ep.ProcessingRequest) -> str:
    """The routes key (contract.routes_key) of the config whose routes the request arrived
    under (Envoy's attribute `xds.virtual_host_name`); "" when it does not say."""
    for attrs in request.attributes.values():
        value = attrs.fields.get(VIRTUAL_HOST_ATTRIBUTE)
        if value is not None:
            return routes_key_of(value.string_value)
    return ""


def jwt_payload(request: ep.ProcessingRequest) -> dict[str, Any] | None:
    """The payload of a JWT Envoy's jwt_authn verified for this request (forwarded metadata),
    or None: no token, or one that failed (jwt_authn lets those through for the key check)."""
    meta = request.metadata_context.filter_metadata
    if JWT_NAMESPACE not in meta:
        return None
    payload = meta[JWT_NAMESPACE].fields.get(JWT_PAYLOAD_KEY)
    if payload is None or not payload.HasField("struct_value"):
        return None
    return json_format.MessageToDict(payload.struct_value)


def mutation(set_headers: Iterable[tuple[str, str]], remove: Iterable[str] = ()) -> ep.HeaderMutation:
    return ep.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE
            )
            for k, v in set_headers
        ],
        remove_headers=list(remove),
    )


def headers_response(
    set_headers: Iterable[tuple[str, str]] = (),
    remove: Iterable[str] = (),
    clear_route_cache: bool = False,
) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(
            response=ep.CommonResponse(
                header_mutation=mutation(set_headers, remove), clear_route_cache=clear_route_cache
            )
        )
    )


def body_response(
    set_headers: Iterable[tuple[str, str]] = (),
    remove: Iterable[str] = (),
    body: bytes | None = None,
    clear_route_cache: bool = False,
    metadata: dict[str, str] | None = None,
) -> ep.ProcessingResponse:
    common = ep.CommonResponse(header_mutation=mutation(set_headers, remove), clear_route_cache=clear_route_cache)
    if body is not None:
        common.status = ep.CommonResponse.CONTINUE_AND_REPLACE
        common.body_mutation.body = body
        # Envoy recomputes nothing by itself: the old content-length would truncate or stall.
        common.header_mutation.set_headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="content-length", raw_value=str(len(body)).encode()),
                append_action=_OVERWRITE,
            )
        )
    response = ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))
    if metadata:
        response.dynamic_metadata.update({METADATA_NS: metadata})
        if metadata.get("target"):
            # What the decided policy's route reads its cluster from (contract.TARGET_NS).
            groups = response.dynamic_metadata.fields[TARGET_NS].struct_value
            put_target_groups(groups, metadata["target"], metadata.get(SPLIT_KEY, ""))
    return response


def immediate(
    status: int, body: bytes, headers: Iterable[tuple[str, str]] = (), details: str = ""
) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=mutation([("content-type", "application/json"), *headers]),
            body=body,
            details=details,
        )
    )


def immediate_error(err: RequestError, policy: str = "", api: str = "") -> ep.ProcessingResponse:
    """Every refusal as a JSON error in the client's API (`api`, OpenAI's by default), with the
    gateway's headers set."""
    return immediate(
        err.status,
        err.body_for(api),
        [
            ("x-signalbox-provider", "none"),
            ("x-signalbox-model", "none"),
            ("x-signalbox-policy", policy or "none"),
            ("x-signalbox-reason", err.code),
            *err.headers,
        ],
        details=f"signalbox_{err.code}",
    )
