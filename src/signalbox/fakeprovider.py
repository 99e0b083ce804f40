"""A fake LLM provider for the quickstart, tests and benchmarks, speaking OpenAI's API,
Anthropic's Messages API, Gemini's and AWS Bedrock's Converse API (`signalbox.fakebedrock`).

It answers chat/completions/embeddings/models on any base path (so OpenAI, vLLM and Azure
deployment paths all work) and `/messages` as Anthropic does (its answers, stream events, error
shapes, `x-api-key`), checks each request against the official SDKs' own type models (a field
or content block the API does not define is the provider's 400), names itself in every answer
(`x-fake-provider` header and `system_fingerprint`), and records what arrived (path, headers,
model, body) so a test can prove where a request went, in what shape, with which credentials.

Steering: per server with `POST /_fake/behaviour` {"status": 500, "delay_ms": 0,
"api_key": "...", "fault": {...}}; per request with headers `x-fake-status` / `x-fake-delay-ms`
/ `x-fake-fault: <JSON of a Fault>`, optionally limited to one server by `x-fake-only: <id>`.
`stream: true` answers with server-sent events, `x-fake-chunks` of them,
`x-fake-chunk-delay-ms` apart. `x-fake-tool-call: <name>` answers with a call of that tool.

Faults (`Fault`) are the ways real providers misbehave: errors with and without `Retry-After`,
a reset before any header, no answer at all, a slow first token, a stream that stalls or is cut
after some chunks, a malformed event, a stream without `[DONE]`, context-length and
content-policy refusals in OpenAI's error shape, rate-limit headers, and flapping (the fault on
every n-th request, or on the first n only).

Vertex AI: Gemini's API on Vertex's paths, with `Authorization: Bearer <token>`, where the token
must come from this fake's OAuth2 token endpoint (`POST /token`, the `token_uri` of a test's
service account) and not have expired (`token_lifetime_s`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import itertools
import json
import ssl
import struct
import sys
import threading
import time
import typing
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import typing_extensions
from aiohttp import web

from signalbox import fakebedrock, parentwatch
from signalbox.core.errors import anthropic_error_type

FAULT_KINDS = (
    "",
    "reset",
    "hang",
    "stall",
    "cut",
    "malformed",
    "no_done",
    "context_length",
    "content_filter",
    "html",  # a 200 web page, as a wrong base URL or a proxy's login page answers
    # A redirect (307, to this server's path under /moved), as a base URL with http:// for an
    # https:// API, a path a server moved, or a login in front of the API answers.
    "redirect",
    # Streams written in pieces that split events, lines and UTF-8 characters (each text delta
    # carries TORN_TEXT), as proxies and CDNs pass a provider's stream on.
    "torn",
    # A server's keep-alive (`Fault.keepalive_ms`): a request on a connection idle that long is
    # dropped unanswered, as when the server closes it just as the request is sent (vLLM's
    # uvicorn closes idle connections after 5 s, load balancers after their own idle time).
    "stale",
)
# What the `html` fault answers.
# What each streamed text delta adds under the `torn` fault: characters of 2, 3 and 4 bytes.
TORN_TEXT = "é你🙂"
# The pause between the pieces of a torn write, so that each travels on its own.
TORN_GAP_S = 0.002
# The most answers one chat completion gives (`n`); OpenAI takes up to 128.
MAX_CHOICES = 128
HTML_PAGE = "<!doctype html><html><head><title>Sign in</title></head><body><form>...</form></body></html>"


@dataclass
class Fault:
    """One misbehaviour, applied to the requests `times`/`every` select (both 0: all of them)."""

    kind: str = ""  # one of FAULT_KINDS ("" : only the status/headers below)
    after: int = 0  # stall / cut / malformed: chunks sent first
    first_token_ms: int = 0  # streams: headers at once, the first event this much later
    retry_after: str = ""  # sent as Retry-After with an error status (seconds or an HTTP date)
    retry_after_ms: int = 0  # sent as retry-after-ms with an error status
    remaining: int = -1  # >= 0: x-ratelimit-remaining-requests on every answer
    times: int = 0  # only the first `times` requests since the last reset
    every: int = 0  # only every `every`-th request (1st, (every+1)th, ...): flapping
    keepalive_ms: int = 0  # stale: how long a connection may idle before the server drops it

    def applies(self, count: int) -> bool:
        if self.times and count > self.times:
            return False
        return not self.every or (count - 1) % self.every == 0


HANG_SECONDS = 3600.0
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Google's OAuth2 access tokens start so; the fake's own are checked against what it issued.
ACCESS_TOKEN_PREFIX = "ya29."
# Refusals about the request itself (OpenAI's 400s): fault kind -> (code, message).
REFUSALS = {
    "context_length": (
        "context_length_exceeded",
        "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.",
    ),
    "content_filter": (
        "content_filter",
        "The response was filtered due to the prompt triggering the content management policy.",
    ),
}  # "never answers": far past any deadline a test sets


@dataclass
class Behaviour:
    status: int = 200
    delay_ms: int = 0
    # When set, requests must carry it as `Authorization: Bearer <key>` or `api-key: <key>`.
    api_key: str = ""
    # When set, the assistant's answer (e.g. JSON for a classifier); else it names server and model.
    content: str = ""
    fault: dict[str, Any] | None = None
    # OpenAI requests checked against the SDK's type models too (Anthropic's always are).
    strict: bool = False
    # Seconds an access token from the OAuth2 token endpoint (`POST /token`) lives.
    token_lifetime_s: int = 3600
    # Bedrock: AWS access key ID -> secret key; when set, Converse requests must carry a SigV4
    # signature made with one of them (verified with botocore's signer).
    aws_keys: dict[str, str] = field(default_factory=dict)
    # Extra headers on every answer (a provider that sends headers of the gateway's own names).
    headers: dict[str, str] = field(default_factory=dict)
    # Whole answers (JSON) compressed with gzip when the request's Accept-Encoding allows it, as
    # OpenAI's and Anthropic's APIs (behind their CDN) answer the official SDKs. Event streams
    # stay plain: aiohttp's compressor would hold their events back until the end.
    compress: bool = True
    # Top-level request fields this server refuses with a 422, as some OpenAI-compatible APIs
    # refuse `stream_options` ("Extra inputs are not permitted").
    refuse_fields: list[str] = field(default_factory=list)


def _fault(raw: dict[str, Any] | None) -> Fault:
    fault = Fault(**(raw or {}))
    if fault.kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {fault.kind!r}")
    return fault


# ---------------------------------------------------------------- the published request shapes


@functools.cache
def _shapes() -> dict[str, Any] | None:
    """What each API accepts, from the official SDKs' own type models (top-level fields, message
    roles, content block types); None when the SDKs are not installed (the fake then checks
    nothing, as in a bare `signalbox up`)."""
    try:
        from anthropic.types import MessageParam, ToolResultBlockParam
        from anthropic.types.message_count_tokens_params import MessageCountTokensParams
        from anthropic.types.message_create_params import MessageCreateParamsStreaming
        from openai.types.chat.completion_create_params import CompletionCreateParamsStreaming
    except ImportError:
        return None
    roles: set[str] = set()
    blocks: set[str] = set()
    for message in typing.get_args(MessageParam):
        hints = typing.get_type_hints(message)
        roles |= _literals(hints["role"])
        blocks |= _literal_types(hints["content"])
    blocks |= _literal_types(typing.get_type_hints(ToolResultBlockParam)["content"])
    return {
        "anthropic": set(typing.get_type_hints(MessageCreateParamsStreaming)),
        "anthropic_count": set(typing.get_type_hints(MessageCountTokensParams)),
        "anthropic_roles": roles,
        "anthropic_blocks": blocks,
        "openai": set(typing.get_type_hints(CompletionCreateParamsStreaming)),
    }


def _literal_types(annotation: Any) -> set[str]:
    """The `type` literals of every TypedDict inside a union/iterable annotation."""
    if isinstance(annotation, type) and typing_extensions.is_typeddict(annotation):
        kind = typing.get_type_hints(annotation).get("type")
        return _literals(kind) if kind is not None else set()
    out: set[str] = set()
    for arg in typing.get_args(annotation):
        out |= _literal_types(arg)
    return out


def _literals(annotation: Any) -> set[str]:
    """The strings of a Literal, also inside Required[...] / unions."""
    if typing.get_origin(annotation) is typing.Literal:
        return {a for a in typing.get_args(annotation) if isinstance(a, str)}
    out: set[str] = set()
    for arg in typing.get_args(annotation):
        out |= _literals(arg)
    return out


def request_problems(api: str, body: dict[str, Any], counting: bool = False) -> list[str]:
    """Why a provider of `api` would refuse this request body ([] when it would not);
    `counting`: Anthropic's count_tokens, which takes no max_tokens."""
    shapes = _shapes()
    if shapes is None:
        return []
    fields = shapes["anthropic_count"] if counting else shapes[api]
    problems = [f"unknown field {k!r}" for k in sorted(body) if k not in fields]
    if api == "openai":
        return problems
    for name in ("model", "messages") if counting else ("model", "max_tokens", "messages"):
        if name not in body:
            problems.append(f"{name}: Field required")
    for i, message in enumerate(body.get("messages") or []):
        if not isinstance(message, dict) or message.get("role") not in shapes["anthropic_roles"]:
            problems.append(f"messages.{i}.role: not one of {sorted(shapes['anthropic_roles'])}")
            continue
        content = message.get("content")
        blocks = content if isinstance(content, list) else []
        for j, block in enumerate(blocks):
            nested = block.get("content") if isinstance(block, dict) else None
            for b in [block, *(nested if isinstance(nested, list) else [])]:
                if not isinstance(b, dict) or b.get("type") not in shapes["anthropic_blocks"]:
                    problems.append(f"messages.{i}.content.{j}: unknown block {b!r}")
    return problems


def _embeddings(body: dict[str, Any], model: str) -> dict[str, Any]:
    """OpenAI's embeddings answer: one vector per input (a string, a list of strings, or token
    arrays), `dimensions` long (3 by default), as floats or, when `encoding_format` is base64
    (the OpenAI SDK asks for it unless told otherwise), as little-endian float32 in base64."""
    given = body.get("input")
    inputs = given if isinstance(given, list) and given and not isinstance(given[0], int) else [given]
    asked = body.get("dimensions")
    dims = asked if isinstance(asked, int) and asked > 0 else 3
    data = []
    for i, _ in enumerate(inputs):
        vector = [round(0.1 * (k + 1) + 0.01 * i, 4) for k in range(dims)]
        encoded: Any = vector
        if body.get("encoding_format") == "base64":
            encoded = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    tokens = 3 * len(inputs)
    return {"object": "list", "model": model, "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def provider_request_id(ident: str, count: int) -> str:
    """The id the fake `ident` gives its `count`-th request's answer."""
    return f"req_{ident}_{count}"


class FakeProvider:
    def __init__(self, ident: str, record: int = 2000):
        self.ident = ident
        self.url = ""
        self.behaviour = Behaviour()
        self.requests: deque[dict[str, Any]] = deque(maxlen=record)
        self.count = 0
        # Access tokens issued by `POST /token` -> when each expires (time.time()).
        self.tokens: dict[str, float] = {}
        # When each open connection last finished an answer (the `stale` fault reads it).
        self._idle_since: weakref.WeakKeyDictionary[asyncio.BaseTransport, float] = weakref.WeakKeyDictionary()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._answers])
        app.on_response_prepare.append(self._name_answer)
        app.router.add_post("/_fake/behaviour", self.set_behaviour)
        app.router.add_get("/_fake/requests", self.list_requests)
        app.router.add_post("/_fake/reset", self.reset)
        app.router.add_post("/token", self.issue_token)
        app.router.add_get("/{tail:.*}", self.handle_get)
        app.router.add_post("/{tail:.*}", self.handle_post)
        return app

    def _compress(self, request: web.Request, response: web.StreamResponse) -> None:
        """gzip when the client accepts it (`Behaviour.compress`), on answers, not on the fake's
        own steering endpoints. Before the answer is prepared (its headers are sent then)."""
        if not self.behaviour.compress or request.path.startswith("/_fake/"):
            return
        accepted = request.headers.get("accept-encoding", "").lower()
        if "gzip" in accepted and response.content_type == "application/json":
            response.enable_compression(web.ContentCoding.gzip)

    async def _name_answer(self, request: web.Request, response: web.StreamResponse) -> None:
        """Each answer's id, as providers send theirs (OpenAI's `x-request-id`, Anthropic's
        `request-id`): what a user quotes to the provider's support."""
        if not request.path.startswith("/_fake/"):
            name = "request-id" if _api(request) == "anthropic" else "x-request-id"
            response.headers[name] = provider_request_id(self.ident, self.count)

    @web.middleware
    async def _answers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Each answer gzipped when it may be (`_compress`), and the moment its connection went
        idle noted (the `stale` fault)."""
        response: web.StreamResponse = await handler(request)
        if not response.prepared:  # a whole answer (a stream was sent as it was made)
            self._compress(request, response)
        if request.transport is not None:
            self._idle_since[request.transport] = time.monotonic()
        return response

    async def set_behaviour(self, request: web.Request) -> web.Response:
        behaviour = Behaviour(**{**asdict(Behaviour()), **await request.json()})
        _fault(behaviour.fault)  # refuse an unknown kind here, not on the next request
        self.behaviour = behaviour
        return web.json_response(asdict(self.behaviour))

    async def list_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"id": self.ident, "count": self.count, "requests": list(self.requests)})

    async def reset(self, request: web.Request) -> web.Response:
        self.requests.clear()
        self.count = 0
        self.behaviour = Behaviour()
        self.tokens.clear()
        return web.json_response({"ok": True})

    def _steer(self, request: web.Request) -> tuple[int, int, Fault]:
        status, delay, fault = self.behaviour.status, self.behaviour.delay_ms, _fault(self.behaviour.fault)
        only = request.headers.get("x-fake-only")
        if only is None or only == self.ident:
            status = int(request.headers.get("x-fake-status", status))
            delay = int(request.headers.get("x-fake-delay-ms", delay))
            if "x-fake-fault" in request.headers:
                fault = _fault(json.loads(request.headers["x-fake-fault"]))
        if not fault.applies(self.count):
            return 200, delay, Fault()
        return status, delay, fault

    async def issue_token(self, request: web.Request) -> web.Response:
        """Google's OAuth2 token endpoint for service accounts (RFC 7523 JWT bearer grant): a
        form with `grant_type` and a signed `assertion` (recorded, for the test to verify with
        the account's public key), answered with an access token that Vertex AI paths of this
        fake then accept until it expires."""
        form = await request.post()
        fields = {k: str(v) for k, v in form.items()}
        self.requests.append({"at": time.time(), "path": request.path_qs, "api": "oauth2", "body": fields})
        if fields.get("grant_type") != JWT_BEARER or fields.get("assertion", "").count(".") != 2:
            return web.json_response({"error": "invalid_grant", "error_description": "bad grant"}, status=400)
        token = f"{ACCESS_TOKEN_PREFIX}{self.ident}.{len(self.tokens) + 1}"
        lifetime = self.behaviour.token_lifetime_s
        self.tokens[token] = time.time() + lifetime
        return web.json_response({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"})

    def _authorized(self, request: web.Request) -> bool:
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if bearer.startswith(ACCESS_TOKEN_PREFIX):
            # Google Cloud (Vertex AI): an access token this fake's token endpoint issued, not yet
            # expired.
            return self.tokens.get(bearer, 0.0) > time.time()
        key = self.behaviour.api_key
        if not key:
            return True
        if _api(request) == "bedrock":
            return True  # signed, not keyed: handle_post verifies the signature over the body
        if _api(request) == "anthropic":
            return request.headers.get("x-api-key") == key
        if _api(request) == "gemini":
            return request.headers.get("x-goog-api-key") == key
        return request.headers.get("authorization") == f"Bearer {key}" or request.headers.get("api-key") == key

    def _error(
        self,
        status: int,
        message: str,
        code: str = "",
        kind: str = "fake_error",
        headers: dict[str, str] | None = None,
        api: str = "openai",
    ) -> web.Response:
        text = f"[{self.ident}] {message}"
        if api == "anthropic":
            body: dict[str, Any] = {
                "type": "error",
                "error": {"type": anthropic_error_type(status), "message": text},
            }
        elif api == "gemini":
            body = {"error": {"code": status, "message": text, "status": GEMINI_STATUSES.get(status, "UNKNOWN")}}
        elif api == "bedrock":
            body, extra = fakebedrock.error(status, text)
            headers = {**extra, **(headers or {})}
        else:
            body = {"error": {"message": text, "type": kind, "param": None, "code": code or str(status)}}
        return web.json_response(body, status=status, headers={"x-fake-provider": self.ident, **(headers or {})})

    def _headers(self, fault: Fault) -> dict[str, str]:
        headers = {**self.behaviour.headers, "x-fake-provider": self.ident}
        if fault.remaining >= 0:
            headers["x-ratelimit-remaining-requests"] = str(fault.remaining)
            headers["x-ratelimit-reset-requests"] = "1s"
        return headers

    async def _refusal(self, request: web.Request, steered: tuple[int, int, Fault]) -> web.Response | None:
        """Steered delay and faults that end a request before it starts, then the error this
        request should get (wrong key, steered status, a refusal), if any. `steered`: _steer's."""
        status, delay, fault = steered
        assert request.transport is not None
        idle_since = self._idle_since.get(request.transport)
        if (
            fault.kind == "stale"
            and idle_since is not None
            and time.monotonic() - idle_since >= fault.keepalive_ms / 1000
        ):
            request.transport.abort()  # as a closed socket answers the request written to it
            raise asyncio.CancelledError
        if delay:
            await asyncio.sleep(delay / 1000)
        if fault.kind == "reset":
            assert request.transport is not None
            request.transport.abort()  # no status line, no headers: a reset before the response
            raise asyncio.CancelledError
        if fault.kind == "hang":
            await asyncio.sleep(HANG_SECONDS)
        api = _api(request)
        if not self._authorized(request):
            return self._error(401, "missing or wrong API key", api=api)
        if fault.kind == "html":
            return web.Response(text=HTML_PAGE, content_type="text/html", headers=self._headers(fault))
        if fault.kind == "redirect":
            moved = f"{request.scheme}://{request.host}/moved{request.path_qs}"
            return web.Response(status=307, headers={**self._headers(fault), "location": moved})
        if fault.kind in REFUSALS:
            code, message = REFUSALS[fault.kind]
            return self._error(400, message, code=code, kind="invalid_request_error", api=api)
        if status != 200:
            headers = {}
            if fault.retry_after:
                headers["retry-after"] = fault.retry_after
            if fault.retry_after_ms:
                headers["retry-after-ms"] = str(fault.retry_after_ms)
            code, kind = OPENAI_ERRORS.get(status, (str(status), "fake_error"))
            return self._error(status, f"steered to fail with {status}", code=code, kind=kind, headers=headers, api=api)
        return None

    async def handle_get(self, request: web.Request) -> web.Response:
        refusal = await self._refusal(request, self._steer(request))
        if refusal is not None:
            return refusal
        if request.path.endswith("/models"):
            return web.json_response(
                {
                    "object": "list",
                    "data": [{"id": f"{self.ident}-model", "object": "model", "created": 0, "owned_by": self.ident}],
                },
                headers={"x-fake-provider": self.ident},
            )
        if request.path.endswith("/foundation-models"):
            # Bedrock's ListFoundationModels: signed like the runtime's calls.
            if self.behaviour.aws_keys:
                headers = dict(request.headers.items())
                problem = fakebedrock.signature_problem(
                    "GET", request.host, request.path_qs, headers, b"", self.behaviour.aws_keys
                )
                if problem:
                    return self._error(403, problem, api="bedrock")
            summary = {"modelId": f"{self.ident}.model-v1:0", "providerName": self.ident}
            return web.json_response({"modelSummaries": [summary]}, headers={"x-fake-provider": self.ident})
        if "/publishers/" in request.path and "/models/" in request.path:
            # Vertex AI's Model Garden entry of one model (GetPublisherModel).
            name = request.path[request.path.index("publishers/") :]
            return web.json_response({"name": name, "versionId": "001"}, headers={"x-fake-provider": self.ident})
        return self._error(404, f"no route {request.path}")

    async def handle_post(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            return self._error(400, "body is not JSON")
        if not isinstance(body, dict):
            return self._error(400, "body is not a JSON object")
        api = _api(request)
        self.count += 1
        self.requests.append(
            {
                "at": time.time(),
                "path": request.path_qs,
                "headers": dict(request.headers),
                "api": api,
                "model": body.get("model") or (fakebedrock.operation(request.path) or (None,))[0],
                "stream": bool(body.get("stream")),
                "stream_options": body.get("stream_options"),
                "body": body,
            }
        )
        steered = self._steer(request)
        fault = steered[2]
        refusal = await self._refusal(request, steered)
        if refusal is not None:
            return refusal
        refused = [name for name in self.behaviour.refuse_fields if name in body]
        if refused:
            return self._error(422, f"Extra inputs are not permitted: {refused}", kind="invalid_request_error", api=api)
        counting = request.path.endswith("/messages/count_tokens")
        if request.path.endswith(("/chat/completions", "/messages")) or counting:
            strict = api == "anthropic" or self.behaviour.strict
            problems = request_problems(api, body, counting) if strict else []
            if api == "anthropic" and not request.headers.get("anthropic-version"):
                problems.append("anthropic-version: header required")
            if problems:
                return self._error(400, "; ".join(problems), kind="invalid_request_error", api=api)
        model = body.get("model", "")
        tool = request.headers.get("x-fake-tool-call", "")
        if counting:
            return web.json_response({"input_tokens": COUNTED_TOKENS}, headers=self._headers(fault))
        if api == "anthropic":
            raw_choice = body.get("tool_choice")
            choice: dict[str, Any] = raw_choice if isinstance(raw_choice, dict) else {}
            forced = choice.get("type") == "tool" and isinstance(choice.get("name"), str)
            tool = choice["name"] if forced else tool
            if body.get("stream"):
                return await self._anthropic_stream(request, model, fault, tool, forced)
            return web.json_response(self._anthropic_answer(model, tool, forced), headers=self._headers(fault))
        if api == "bedrock":
            return await self._bedrock(request, raw, body, fault, tool)
        if api == "gemini":
            problems = gemini_problems(body, request.path_qs)
            if problems:
                return self._error(400, "; ".join(problems), api=api)
            model = request.path.rsplit("/models/", 1)[-1].split(":", 1)[0]
            if ":streamGenerateContent" in request.path:
                return await self._gemini_stream(request, model, fault, tool)
            return web.json_response(self._gemini_answer(model, tool, 7, True), headers=self._headers(fault))
        if request.path.endswith("/responses"):
            # OpenAI's Responses API, served natively (a provider with responsesApi).
            if body.get("stream"):
                return await self._responses_stream(request, model, fault)
            return web.json_response(self._response(model, 7), headers=self._headers(fault))
        if request.path.endswith("/embeddings"):
            return web.json_response(_embeddings(body, model), headers={"x-fake-provider": self.ident})
        legacy = not request.path.endswith("/chat/completions")  # OpenAI's legacy /completions
        # OpenAI's own answers to wrong types (a client's hostile body, passed on as sent).
        for field_name, kind in (("stream", bool), ("stream_options", dict)):
            if body.get(field_name) is not None and not isinstance(body[field_name], kind):
                return self._error(400, f"Invalid type for '{field_name}'.", kind="invalid_request_error")
        if body.get("stream"):
            return await self._stream(request, body, model, fault, legacy, "" if legacy else tool)
        content = self.behaviour.content or f"[{self.ident}] answer from {model}"
        if legacy:
            return web.json_response(self._text_completion(model, content), headers=self._headers(fault))
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if tool:
            message["tool_calls"] = [
                {
                    "id": f"call_{self.count}",
                    "type": "function",
                    "function": {"name": tool, "arguments": TOOL_ARGUMENTS},
                }
            ]
        # `n` answers, as OpenAI gives them (each its index; 7 completion tokens apiece).
        asked = body.get("n")
        n = asked if isinstance(asked, int) and 1 <= asked <= MAX_CHOICES else 1
        answer = {
            "id": f"chatcmpl-{self.ident}-{self.count}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": self.ident,
            "choices": [
                {"index": i, "finish_reason": "tool_calls" if tool else "stop", "message": message} for i in range(n)
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 7 * n, "total_tokens": 10 + 7 * n},
        }
        if fault.first_token_ms:
            await asyncio.sleep(fault.first_token_ms / 1000)
        return web.json_response(answer, headers=self._headers(fault))

    def _text_completion(self, model: str, text: str, finish: str | None = "stop") -> dict[str, Any]:
        """OpenAI's legacy completions answer (`text_completion`), or one chunk of its stream."""
        return {
            "id": f"cmpl-{self.ident}-{self.count}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            **({"usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}} if finish else {}),
        }

    @staticmethod
    def _writer(response: web.StreamResponse, fault: Fault) -> Callable[[bytes], Awaitable[None]]:
        """How a stream's events are written: whole, or (`torn`) each in pieces, cut inside its
        first line and inside TORN_TEXT's 3- and 4-byte characters (one piece of a character
        is no text on its own)."""
        if fault.kind != "torn":
            return response.write

        async def torn(data: bytes) -> None:
            cuts = {len(data) // 3}
            for char in TORN_TEXT[1:]:
                at = data.find(char.encode())
                if at >= 0:
                    cuts.add(at + 1)
            edges = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
            for start, end in itertools.pairwise(edges):
                await response.write(data[start:end])
                await asyncio.sleep(TORN_GAP_S)

        return torn

    async def _stream(
        self, request: web.Request, body: dict[str, Any], model: str, fault: Fault, legacy: bool = False, tool: str = ""
    ) -> web.StreamResponse:
        """A chat (or legacy completions) stream: text chunks, then, when steered to call `tool`,
        the call as OpenAI streams one (its id and name first, the arguments in two pieces)."""
        chunks = int(request.headers.get("x-fake-chunks", 5))
        gap = int(request.headers.get("x-fake-chunk-delay-ms", 0)) / 1000
        response = web.StreamResponse(headers={"content-type": "text/event-stream", **self._headers(fault)})
        await response.prepare(request)
        write = self._writer(response, fault)
        extra = f"{TORN_TEXT} " if fault.kind == "torn" else ""
        if fault.first_token_ms:
            await asyncio.sleep(fault.first_token_ms / 1000)

        def event(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> bytes:
            chunk: dict[str, Any]
            if legacy:  # the legacy API's chunks carry text, not a delta
                chunk = self._text_completion(model, delta.get("content", ""), None)
                chunk["choices"][0]["finish_reason"] = finish
                if usage is not None:
                    chunk["choices"], chunk["usage"] = [], usage
                return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()
            chunk = {
                "id": f"chatcmpl-{self.ident}-{self.count}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": self.ident,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage is not None:
                chunk["choices"], chunk["usage"] = [], usage
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()

        for i in range(chunks):
            await _break_if_due(request, fault, i)
            if i == fault.after and fault.kind == "malformed":
                await write(b'data: {"id": "broken", "choices": [{"delta": {"content": \n\n')
            await write(
                event({"content": f"chunk{i} {extra}"} if i else {"role": "assistant", "content": f"chunk0 {extra}"})
            )
            if gap:
                await asyncio.sleep(gap)
        if tool:
            call = {
                "index": 0,
                "id": f"call_{self.count}",
                "type": "function",
                "function": {"name": tool, "arguments": ""},
            }
            half = len(TOOL_ARGUMENTS) // 2
            await write(event({"tool_calls": [call]}))
            for piece in (TOOL_ARGUMENTS[:half], TOOL_ARGUMENTS[half:]):
                await write(event({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
        await write(event({}, finish="tool_calls" if tool else "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            await write(
                event({}, usage={"prompt_tokens": 10, "completion_tokens": chunks, "total_tokens": 10 + chunks})
            )
        if fault.kind != "no_done":
            await write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _response(self, model: str, tokens: int, text: str | None = None) -> dict[str, Any]:
        """A Responses API `response` object, completed, with one output message."""
        text = text if text is not None else self.behaviour.content or f"[{self.ident}] answer from {model}"
        return {
            "id": f"resp_{self.ident}_{self.count}",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": model,
            "output": [
                {
                    "type": "message",
                    "id": f"msg_{self.ident}_{self.count}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": 10,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 10 + tokens,
            },
        }

    async def _responses_stream(self, request: web.Request, model: str, fault: Fault) -> web.StreamResponse:
        """The Responses API's stream: typed events, the text in `response.output_text.delta`
        events and the usage in `response.completed`."""
        chunks = int(request.headers.get("x-fake-chunks", 5))
        response = web.StreamResponse(headers={"content-type": "text/event-stream", **self._headers(fault)})
        await response.prepare(request)
        whole = self._response(model, chunks, "".join(f"chunk{i} " for i in range(chunks)))
        item, seq = whole["output"][0], iter(range(1_000_000))

        async def send(kind: str, **data: Any) -> None:
            payload = json.dumps({"type": kind, "sequence_number": next(seq), **data})
            await response.write(f"event: {kind}\ndata: {payload}\n\n".encode())

        started = {**whole, "status": "in_progress", "output": [], "usage": None}
        await send("response.created", response=started)
        await send("response.output_item.added", output_index=0, item={**item, "status": "in_progress", "content": []})
        part = {"type": "output_text", "text": "", "annotations": []}
        await send("response.content_part.added", item_id=item["id"], output_index=0, content_index=0, part=part)
        for i in range(chunks):
            await send(
                "response.output_text.delta", item_id=item["id"], output_index=0, content_index=0, delta=f"chunk{i} "
            )
        text = item["content"][0]["text"]
        await send("response.output_text.done", item_id=item["id"], output_index=0, content_index=0, text=text)
        await send(
            "response.content_part.done", item_id=item["id"], output_index=0, content_index=0, part=item["content"][0]
        )
        await send("response.output_item.done", output_index=0, item=item)
        await send("response.completed", response=whole)
        await response.write_eof()
        return response

    def _anthropic_answer(self, model: str, tool: str, forced: bool = False) -> dict[str, Any]:
        """`forced`: the request named the tool in tool_choice; the answer is that call alone."""
        content: list[dict[str, Any]] = [
            {"type": "text", "text": self.behaviour.content or f"[{self.ident}] answer from {model}"}
        ][forced:]
        if tool:
            content.append(
                {"type": "tool_use", "id": f"toolu_{self.count}", "name": tool, "input": json.loads(TOOL_ARGUMENTS)}
            )
        return {
            "id": f"msg_{self.ident}_{self.count}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": "tool_use" if tool else "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 7},
        }

    def _gemini_answer(self, model: str, tool: str, tokens: int, whole: bool) -> dict[str, Any]:
        parts: list[dict[str, Any]] = [{"text": self.behaviour.content or f"[{self.ident}] answer from {model}"}]
        if tool:
            parts.append({"functionCall": {"name": tool, "args": json.loads(TOOL_ARGUMENTS)}})
        usage = {"promptTokenCount": 10, "candidatesTokenCount": tokens, "totalTokenCount": 10 + tokens}
        return _gemini_chunk(model, parts if whole else [], "STOP", usage, f"gem-{self.ident}-{self.count}")

    async def _gemini_stream(self, request: web.Request, model: str, fault: Fault, tool: str) -> web.StreamResponse:
        """Gemini's `alt=sse` stream: a GenerateContentResponse per event, text parts first, the
        last with the finish reason (and a function call when steered) and the usage."""
        chunks = int(request.headers.get("x-fake-chunks", 5))
        gap = int(request.headers.get("x-fake-chunk-delay-ms", 0)) / 1000
        response = web.StreamResponse(headers={"content-type": "text/event-stream", **self._headers(fault)})
        await response.prepare(request)
        rid = f"gem-{self.ident}-{self.count}"
        for i in range(chunks):
            await _break_if_due(request, fault, i)
            chunk = _gemini_chunk(model, [{"text": f"chunk{i} "}], None, None, rid)
            await response.write(f"data: {json.dumps(chunk)}\r\n\r\n".encode())
            if gap:
                await asyncio.sleep(gap)
        parts = [{"functionCall": {"name": tool, "args": json.loads(TOOL_ARGUMENTS)}}] if tool else []
        usage = {"promptTokenCount": 10, "candidatesTokenCount": chunks, "totalTokenCount": 10 + chunks}
        await response.write(f"data: {json.dumps(_gemini_chunk(model, parts, 'STOP', usage, rid))}\r\n\r\n".encode())
        await response.write_eof()
        return response

    async def _anthropic_stream(
        self, request: web.Request, model: str, fault: Fault, tool: str, forced: bool = False
    ) -> web.StreamResponse:
        """Anthropic's event sequence: message_start, ping, a text block of `x-fake-chunks` deltas (and
        a tool_use block when steered; that block alone when `forced`), message_delta with the
        usage, message_stop."""
        chunks = 0 if forced else int(request.headers.get("x-fake-chunks", 5))
        gap = int(request.headers.get("x-fake-chunk-delay-ms", 0)) / 1000
        response = web.StreamResponse(headers={"content-type": "text/event-stream", **self._headers(fault)})
        await response.prepare(request)
        write = self._writer(response, fault)
        extra = f"{TORN_TEXT} " if fault.kind == "torn" else ""
        if fault.first_token_ms:
            await asyncio.sleep(fault.first_token_ms / 1000)

        async def send(name: str, data: dict[str, Any]) -> None:
            await write(f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n".encode())

        message = {**self._anthropic_answer(model, ""), "content": [], "stop_reason": None}
        message["usage"] = {"input_tokens": 10, "output_tokens": 1}
        await send("message_start", {"message": message})
        await send("ping", {})  # as Anthropic's API sends right after the start
        if not forced:
            await send("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        for i in range(chunks):
            await _break_if_due(request, fault, i)
            await send(
                "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": f"chunk{i} {extra}"}}
            )
            if gap:
                await asyncio.sleep(gap)
        if not forced:
            await send("content_block_stop", {"index": 0})
        if tool:
            index = 0 if forced else 1
            block = {"type": "tool_use", "id": f"toolu_{self.count}", "name": tool, "input": {}}
            await send("content_block_start", {"index": index, "content_block": block})
            for piece in (TOOL_ARGUMENTS[:5], TOOL_ARGUMENTS[5:]):  # JSON arrives in pieces
                await send(
                    "content_block_delta",
                    {"index": index, "delta": {"type": "input_json_delta", "partial_json": piece}},
                )
            await send("content_block_stop", {"index": index})
        stop = {"stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None}
        await send("message_delta", {"delta": stop, "usage": {"output_tokens": chunks}})
        if fault.kind != "no_done":
            await send("message_stop", {})
        await response.write_eof()
        return response

    async def _bedrock(
        self, request: web.Request, raw: bytes, body: dict[str, Any], fault: Fault, tool: str
    ) -> web.StreamResponse:
        """Bedrock's Converse (JSON) or ConverseStream (event stream): the signature first, then
        the body against botocore's model of the operation."""
        op = fakebedrock.operation(request.path)
        assert op is not None  # _api said bedrock
        model, kind = op
        if self.behaviour.aws_keys:
            headers = {k: v for k, v in request.headers.items()}
            problem = fakebedrock.signature_problem(
                request.method, request.host, request.path_qs, headers, raw, self.behaviour.aws_keys
            )
            if problem:
                return self._error(403, problem, api="bedrock")
        problems = fakebedrock.request_problems(model, kind == "converse-stream", body)
        if problems:
            return self._error(400, "; ".join(problems), api="bedrock")
        text = self.behaviour.content or f"[{self.ident}] answer from {model}"
        arguments = json.loads(TOOL_ARGUMENTS)
        if kind == "converse":
            answer = fakebedrock.answer(text, tool, arguments, f"tooluse_{self.count}")
            return web.json_response(answer, headers=self._headers(fault))
        chunks = int(request.headers.get("x-fake-chunks", 5))
        gap = int(request.headers.get("x-fake-chunk-delay-ms", 0)) / 1000
        response = web.StreamResponse(headers={"content-type": fakebedrock.EVENT_STREAM, **self._headers(fault)})
        await response.prepare(request)
        if fault.first_token_ms:
            await asyncio.sleep(fault.first_token_ms / 1000)
        event = fakebedrock.event
        await response.write(event("messageStart", {"role": "assistant"}))
        for i in range(chunks):
            await _break_if_due(request, fault, i)
            await response.write(event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": f"chunk{i} "}}))
            if gap:
                await asyncio.sleep(gap)
        await response.write(event("contentBlockStop", {"contentBlockIndex": 0}))
        if tool:
            start = {"toolUse": {"toolUseId": f"tooluse_{self.count}", "name": tool}}
            await response.write(event("contentBlockStart", {"contentBlockIndex": 1, "start": start}))
            for piece in (TOOL_ARGUMENTS[:5], TOOL_ARGUMENTS[5:]):  # JSON arrives in pieces
                delta = {"contentBlockIndex": 1, "delta": {"toolUse": {"input": piece}}}
                await response.write(event("contentBlockDelta", delta))
            await response.write(event("contentBlockStop", {"contentBlockIndex": 1}))
        await response.write(event("messageStop", {"stopReason": "tool_use" if tool else "end_turn"}))
        if fault.kind != "no_done":
            metadata = {"usage": fakebedrock.usage(chunks), "metrics": {"latencyMs": 5}}
            await response.write(event("metadata", metadata))
        await response.write_eof()
        return response


async def _break_if_due(request: web.Request, fault: Fault, i: int) -> None:
    """Before a stream's chunk `i`: a `stall` fault falls silent there with the connection open,
    a `cut` fault drops the connection there (no final event, no end), once `fault.after`
    chunks were sent."""
    if i != fault.after or fault.kind not in ("stall", "cut"):
        return
    if fault.kind == "stall":
        await asyncio.sleep(HANG_SECONDS)
    assert request.transport is not None
    request.transport.abort()
    raise asyncio.CancelledError


def _gemini_chunk(model: str, parts: list[dict[str, Any]], finish: str | None, usage: dict | None, rid: str) -> dict:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    chunk: dict[str, Any] = {"candidates": [candidate], "modelVersion": model, "responseId": rid}
    if usage:
        chunk["usageMetadata"] = usage
    return chunk


def _api(request: web.Request) -> str:
    """Anthropic's Messages API on `/messages` (and its `/models` with x-api-key), Gemini's on
    `/models/<model>:generateContent` (and its `/models` with x-goog-api-key), else OpenAI's."""
    if request.path.endswith(("/messages", "/messages/count_tokens")):
        return "anthropic"
    if fakebedrock.operation(request.path) is not None:
        return "bedrock"
    if ":generateContent" in request.path or ":streamGenerateContent" in request.path:
        return "gemini"
    if "x-goog-api-key" in request.headers:
        return "gemini"
    return "anthropic" if "x-api-key" in request.headers and "anthropic-version" in request.headers else "openai"


# Gemini's error status (google.rpc code name) for an HTTP status.
GEMINI_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
# What a GenerateContentRequest may hold (Gemini API reference), and the kinds of part.
GEMINI_FIELDS = {
    "contents",
    "systemInstruction",
    "generationConfig",
    "tools",
    "toolConfig",
    "safetySettings",
    "cachedContent",
    "labels",
}
GEMINI_PARTS = {
    "text",
    "inlineData",
    "fileData",
    "functionCall",
    "functionResponse",
    "executableCode",
    "codeExecutionResult",
}


def gemini_problems(body: dict[str, Any], path: str) -> list[str]:
    """Why Gemini would refuse this request ([] when it would not), from its API reference."""
    problems = [f"Invalid JSON payload received. Unknown name {k!r}" for k in sorted(body) if k not in GEMINI_FIELDS]
    if ":streamGenerateContent" in path and "alt=sse" not in path:
        problems.append("streams are asked for with alt=sse")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        problems.append("contents is required")
        contents = []
    for i, content in enumerate(contents):
        if not isinstance(content, dict) or content.get("role") not in ("user", "model"):
            problems.append(f"contents[{i}].role must be user or model")
            continue
        for j, part in enumerate(content.get("parts") or []):
            if not isinstance(part, dict) or len(set(part) & GEMINI_PARTS) != 1 or set(part) - GEMINI_PARTS:
                problems.append(f"contents[{i}].parts[{j}] must hold one of {sorted(GEMINI_PARTS)}")
    return problems


# OpenAI's error (code, type) for a status, as its API sends them.
OPENAI_ERRORS = {
    401: ("invalid_api_key", "invalid_request_error"),
    429: ("rate_limit_exceeded", "requests"),
    500: ("server_error", "server_error"),
}
# What the fake's count_tokens always answers.
COUNTED_TOKENS = 42
# The arguments of every steered tool call.
TOOL_ARGUMENTS = '{"city": "Paris"}'

BACKLOG = 8192


@contextlib.asynccontextmanager
async def serving(ident: str, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[FakeProvider]:
    """A fake provider in the caller's event loop; `.url` is set to where it listens."""
    fake = FakeProvider(ident)
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    fake.url = f"http://{host}:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        yield fake
    finally:
        await runner.cleanup()


async def run(
    ident: str,
    host: str,
    port: int,
    ready: asyncio.Event | None = None,
    tls: tuple[str, str] | None = None,
    parent_pid: int = 0,
) -> None:
    # Reading the SDKs' type models takes seconds: done while the server starts, not on the
    # first request (where it would look like a slow provider).
    threading.Thread(target=_shapes, name="fake-provider-shapes", daemon=True).start()
    runner = web.AppRunner(FakeProvider(ident).app(), access_log=None)
    await runner.setup()
    # A deep accept queue: the scale bench opens thousands of streams within seconds, and a
    # provider that drops SYNs would be measured instead of the gateway.
    context = None
    if tls is not None:  # (certificate chain file, key file): a provider's HTTPS endpoint
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
    site = web.TCPSite(runner, host, port, backlog=BACKLOG, reuse_address=True, ssl_context=context)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    # The line tests and `signalbox up` wait for: the real port when 0 was asked for.
    scheme = "https" if tls is not None else "http"
    print(f"fake-provider {ident} listening on {scheme}://{host}:{bound}", flush=True)
    stopped = asyncio.Event()
    try:
        if parent_pid:  # started by `signalbox up`: not left running if it is killed
            await parentwatch.stop_with_parent(parent_pid, stopped)
        else:
            await stopped.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="signalbox fake-provider", description=__doc__.splitlines()[0])
    parser.add_argument("--id", required=True, help="name reported in every answer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", help="...and this private key (PEM)")
    parser.add_argument("--parent-pid", type=int, default=0, help="stop when this process is gone (parentwatch)")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args.id, args.host, args.port, tls=tls, parent_pid=args.parent_pid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
