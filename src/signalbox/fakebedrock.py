"""What the fake provider needs to be AWS Bedrock's runtime (Converse and ConverseStream):
requests checked against botocore's own service model, SigV4 signatures verified with botocore's
own signer, Bedrock's error shape, and answers and streams in AWS's binary event stream.

botocore ships a decoder of the event stream but no encoder: the few lines that write frames
(prelude, string headers, payload, two CRC-32s) are here, and the gateway's decoder is
botocore's, so the two are checked against each other in every streamed test.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import struct
import zlib
from typing import Any
from urllib.parse import unquote

# Bedrock's error type (the x-amzn-ErrorType header) for an HTTP status.
ERROR_TYPES = {
    400: "ValidationException",
    401: "UnrecognizedClientException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}
EVENT_STREAM = "application/vnd.amazon.eventstream"

_PATH = re.compile(r"/model/([^/]+)/(converse|converse-stream)$")
_AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, ?"
    r"SignedHeaders=([a-z0-9;-]+), ?Signature=([0-9a-f]{64})$"
)


def operation(path: str) -> tuple[str, str] | None:
    """(model ID, "converse" or "converse-stream") of a Converse path, else None."""
    found = _PATH.search(path)
    return (unquote(found.group(1)), found.group(2)) if found else None


@functools.cache
def _service_model() -> Any:
    from botocore.session import get_session

    return get_session().get_service_model("bedrock-runtime")


def request_problems(model_id: str, stream: bool, body: dict[str, Any]) -> list[str]:
    """Why Bedrock would refuse this Converse body ([] when it would not): botocore's validation
    of the operation's input shape (unknown fields, types, required members, enums)."""
    from botocore.validate import ParamValidator

    shape = _service_model().operation_model("ConverseStream" if stream else "Converse").input_shape
    report = ParamValidator().validate({"modelId": model_id, **body}, shape)
    return [report.generate_report()] if report.has_errors() else []


def signature_problem(
    method: str, host: str, path_qs: str, headers: dict[str, str], body: bytes, secrets: dict[str, str]
) -> str | None:
    """Why AWS would reject this request's SigV4 signature (None when it is right), computed
    again with botocore's signer over exactly the headers the request says it signed."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    lower = {k.lower(): v for k, v in headers.items()}
    found = _AUTHORIZATION.match(lower.get("authorization", ""))
    if found is None:
        return "MissingAuthenticationTokenException: no SigV4 Authorization header"
    access, day, region, service, signed, signature = found.groups()
    if access not in secrets:
        return "UnrecognizedClientException: The security token included in the request is invalid."
    if service != "bedrock":
        return f"InvalidSignatureException: credential scope names service {service!r}, not 'bedrock'"
    amz_date = lower.get("x-amz-date", "")
    if not amz_date.startswith(day):
        return "InvalidSignatureException: x-amz-date does not match the credential scope's date"
    names = signed.split(";")
    if "host" not in names or "x-amz-date" not in names:
        return "InvalidSignatureException: host and x-amz-date must be signed"
    if lower.get("x-amz-content-sha256", hashlib.sha256(body).hexdigest()) != hashlib.sha256(body).hexdigest():
        return "InvalidSignatureException: x-amz-content-sha256 is not the body's hash"
    request = AWSRequest(
        method=method, url=f"http://{host}{path_qs}", data=body, headers={n: lower.get(n, "") for n in names}
    )
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(access, secrets[access], lower.get("x-amz-security-token")), service, region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if expected != signature:
        return (
            "InvalidSignatureException: The request signature we calculated does not match the signature you provided."
        )
    return None


def error(status: int, message: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Bedrock's error body and headers for a status."""
    return {"message": message}, {"x-amzn-ErrorType": f"{ERROR_TYPES.get(status, 'InternalServerException')}:"}


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event stream message: prelude (total and headers length, CRC), string headers
    (type 7), payload, CRC of all before it."""
    encoded = b"".join(
        bytes([len(k)]) + k.encode() + b"\x07" + struct.pack(">H", len(v.encode())) + v.encode()
        for k, v in headers.items()
    )
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event(kind: str, body: dict[str, Any]) -> bytes:
    headers = {":event-type": kind, ":content-type": "application/json", ":message-type": "event"}
    return frame(headers, json.dumps({**body, "p": "abcd"}).encode())


def exception(kind: str, message: str) -> bytes:
    headers = {":exception-type": kind, ":content-type": "application/json", ":message-type": "exception"}
    return frame(headers, json.dumps({"message": message}).encode())


def usage(output_tokens: int) -> dict[str, int]:
    return {"inputTokens": 10, "outputTokens": output_tokens, "totalTokens": 10 + output_tokens}


def answer(text: str, tool: str, arguments: dict[str, Any], call_id: str) -> dict[str, Any]:
    """A ConverseResponse: the text (and a tool call when steered), its stop reason and usage."""
    content: list[dict[str, Any]] = [{"text": text}]
    if tool:
        content.append({"toolUse": {"toolUseId": call_id, "name": tool, "input": arguments}})
    return {
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": "tool_use" if tool else "end_turn",
        "usage": usage(7),
        "metrics": {"latencyMs": 5},
    }
