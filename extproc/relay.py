"""The stream relay: what a policy's client gets when its stream breaks after tokens were sent.

Envoy's router fails over until an answer's headers arrive. After that, a provider that resets
its stream (or goes silent past the policy's idle deadline) makes Envoy reset the client's
stream, and no filter can write to it any more: every SDK raises a protocol error. For a policy
whose `failover.onBrokenStream` is `error` or `continue`, the router phase sends streams here
instead (envoygen.listener.relay_route) with a signed copy of its decision. The relay sends the
request back to Envoy's listener with that copy, where the router phase puts the same decision
in force (server.Processor); Envoy still does every attempt (failover, keys, translation,
accounting per attempt). The relay passes the answer to the client as it comes and keeps the
text it carried. If the answer breaks before its end:

- `error`: the client's stream ends with a well-formed error event in its own API's format,
  never `[DONE]`;
- `continue`: the next backend of the chain is asked to go on from the text already sent: as
  the start of its own answer where its API takes one (Anthropic's and Bedrock's assistant
  prefill), else as a request to continue it. Its events join the client's stream (the first
  answer's id; no second start), so the client sees one answer. A backend that refuses, or
  breaks in turn, leads to the next, then to the error event.

The relay is Python in the stream's path: it costs throughput (bench/README.md), so only
policies that ask for it use it. Continuation covers Chat Completions and Messages clients
whose answer so far is text; a Responses client, or an answer that was streaming a tool call,
gets the error event.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from signalbox.core.envoygen.contract import (
    BODY_MODEL_KEY,
    RELAY_BACK_HEADER,
    RELAY_HEADER,
    RELAY_PATH_PREFIX,
    api_of_path,
)
from signalbox.core.errors import (
    ANTHROPIC_API,
    BEDROCK_API,
    OPENAI_API,
    RESPONSES_API,
    Forbidden,
    InternalError,
    StreamBroken,
)

from .decisions import DecisionSigner
from .translate import sse

log = logging.getLogger("signalbox.extproc")

RELAY_PURPOSE = "relay"
# Backend APIs that take an assistant message at the end as the start of their answer.
PREFILL_APIS = frozenset({ANTHROPIC_API, BEDROCK_API})
CONTINUE_INSTRUCTION = (
    "Your previous message was cut off. Continue it exactly from where it stopped: do not repeat "
    "any of it, do not comment, just write the rest."
)
# What a continuation must not carry: the first request's admission holds are settled by its
# own access log entry (a continuation is charged its usage, never released twice).
_FIRST_ONLY = ("hold", "limit_hold")
# Hop-by-hop and per-connection headers, and what the relay sets itself.
_NOT_FORWARDED = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        RELAY_HEADER,
        RELAY_BACK_HEADER,
    }
)


def seal(signer: DecisionSigner, metadata: dict[str, str], seconds: float, now: float) -> str:
    """The router phase's decision, signed for the relay and for its return to the listener."""
    return signer.seal(RELAY_PURPOSE, metadata, now + seconds)


@dataclass
class Transcript:
    """What one relayed answer has carried so far, read from its events: the text (for a
    continuation), whether it ended as its API ends a stream, and what a continuation must
    not repeat (the answer's start)."""

    api: str
    text: list[str] = field(default_factory=list)
    ended: bool = False
    # A tool call or another kind of block was streaming: no continuation can take it up.
    only_text: bool = True
    answer_id: str = ""
    events: int = 0
    # The Messages events that open an answer which the client has had (a continuation's own
    # are left out; a break before them lets the continuation's through).
    opened: set[str] = field(default_factory=set)

    def read(self, event: sse.Event) -> None:
        self.events += 1
        if self.api == OPENAI_API:
            if event.data.strip() == "[DONE]":
                self.ended = True
                return
            chunk = event.json()
            if not isinstance(chunk, dict):
                return
            self.answer_id = self.answer_id or str(chunk.get("id") or "")
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {} if isinstance(choice, dict) else {}
                if not isinstance(delta, dict):
                    continue
                if isinstance(delta.get("content"), str):
                    self.text.append(delta["content"])
                if delta.get("tool_calls") or delta.get("function_call"):
                    self.only_text = False
        elif self.api == ANTHROPIC_API:
            body = event.json()
            kind = event.name or (body.get("type") if isinstance(body, dict) else "")
            if kind == "message_stop":
                self.ended = True
            elif kind == "message_start":
                self.opened.add(kind)
            elif kind == "content_block_start" and isinstance(body, dict):
                self.opened.add(kind)
                block = body.get("content_block") or {}
                if not isinstance(block, dict) or block.get("type") != "text" or body.get("index", 0) != 0:
                    self.only_text = False
            elif kind == "content_block_delta" and isinstance(body, dict):
                delta = body.get("delta") or {}
                if isinstance(delta, dict) and delta.get("type") == "text_delta":
                    self.text.append(str(delta.get("text", "")))
                else:
                    self.only_text = False
        else:  # Responses: its stream is not continued; only its end is read.
            body = event.json()
            kind = event.name or (body.get("type") if isinstance(body, dict) else "")
            self.ended = self.ended or kind in ("response.completed", "response.incomplete", "response.failed")

    @property
    def continuable(self) -> bool:
        return self.api in (OPENAI_API, ANTHROPIC_API) and self.only_text


def error_event(api: str, message: str, sequence: int = 0) -> bytes:
    """A broken stream's end in the client's API format (never followed by [DONE]): the error
    tree's StreamBroken as Chat Completions and Messages clients parse errors mid-stream, or the
    Responses API's own `error` event."""
    err = StreamBroken(message)
    if api == RESPONSES_API:
        fields = {"type": "error", "code": err.code, "message": message, "param": None, "sequence_number": sequence}
        return sse.encode(fields, "error")
    if api == ANTHROPIC_API:
        return sse.encode(err.body_for(api).decode(), "error")
    return sse.encode(err.body().decode())


def continuation_body(body: dict[str, Any], api: str, text: str, prefill: bool) -> dict[str, Any] | None:
    """The client's request, asking for the rest of `text`: the text as the start of the
    answer (`prefill`), else the text then a request to continue it. With no text sent yet
    (the break came before the first token reached the client), the request as it was."""
    if not text.strip():
        return dict(body)
    if not isinstance(body.get("messages"), list):
        return None  # not a chat or Messages request: nothing to continue
    messages = list(body["messages"])
    if api == ANTHROPIC_API:
        # Anthropic refuses a final assistant turn that ends in whitespace.
        messages.append(
            {"role": "assistant", "content": [{"type": "text", "text": text.rstrip() if prefill else text}]}
        )
        if not prefill:
            messages.append({"role": "user", "content": [{"type": "text", "text": CONTINUE_INSTRUCTION}]})
    else:
        messages.append({"role": "assistant", "content": text.rstrip() if prefill else text})
        if not prefill:
            messages.append({"role": "user", "content": CONTINUE_INSTRUCTION})
    out = dict(body, messages=messages)
    out.pop("n", None)
    return out


class Splicer:
    """A continuation's events as the rest of the client's first answer: its start left out
    (the client has one), its chunks under the first answer's id, and leading whitespace the
    prefill dropped not doubled."""

    def __init__(self, api: str, answer_id: str, trimmed: bool, opened: frozenset[str] = frozenset()):
        self.api, self.answer_id, self.trim = api, answer_id, trimmed
        self.opened = set(opened)

    def _trim(self, text: str) -> str:
        if self.trim and text:
            self.trim = False
            return text.lstrip() if text[:1].isspace() else text
        return text

    def splice(self, event: sse.Event) -> bytes:
        if self.api == ANTHROPIC_API:
            body = event.json()
            kind = event.name or (body.get("type") if isinstance(body, dict) else "")
            if kind == "ping" or not isinstance(body, dict):
                return b""
            if kind in ("message_start", "content_block_start"):
                if kind in self.opened:
                    return b""  # the client has its own
                self.opened.add(kind)
            if kind == "content_block_delta" and isinstance(body.get("delta"), dict):
                delta = body["delta"]
                if delta.get("type") == "text_delta":
                    delta["text"] = self._trim(str(delta.get("text", "")))
            return sse.encode(body, str(kind))
        if event.data.strip() == "[DONE]":
            return sse.encode("[DONE]")
        chunk = event.json()
        if not isinstance(chunk, dict):
            return b""
        if self.answer_id:
            chunk["id"] = self.answer_id
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict):
                delta.pop("role", None)
                if isinstance(delta.get("content"), str):
                    delta["content"] = self._trim(delta["content"])
        return sse.encode(chunk)


class ClientGone(Exception):
    """The client's side of a relayed stream closed: nothing more to send, nothing to continue."""


async def _send(response: Any, data: bytes) -> None:
    """Write to the client; its connection closing is ClientGone, never taken for the
    provider's stream breaking (which the relay would try to continue)."""
    try:
        await response.write(data)
    except (ConnectionError, RuntimeError) as exc:
        raise ClientGone from exc


def forwarded(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _NOT_FORWARDED}


def is_stream(headers: Any, status: int) -> bool:
    return status == 200 and "text/event-stream" in headers.get("content-type", "")


def next_choice(policy: Any, provider: str, model: str) -> list[Any]:
    """The backends that may continue an answer `provider`/`model` began: the policy's others,
    those after it in its order first."""
    choices = list(policy.choices)
    at = next(
        (i for i, c in enumerate(choices) if c.backend.provider.name == provider and c.backend.model == model), -1
    )
    ordered = choices[at + 1 :] + choices[: max(at, 0)] if at >= 0 else choices
    return [c for c in ordered if c.target]


class Relay:
    """The relay's HTTP side (served by the admin API's app, extproc.admin)."""

    def __init__(self, processor: Any):
        self.processor = processor
        self._session: Any = None

    def session(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            # No read deadline of its own: the policy's deadlines are Envoy's, on the way back.
            self._session = aiohttp.ClientSession(
                # As many streams at once as Envoy sends (its circuit breakers bound them), not
                # aiohttp's default 100.
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=5),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        path = request.path[len(RELAY_PATH_PREFIX) :] or "/"
        if request.query_string:
            path = f"{path}?{request.query_string}"
        api = api_of_path(path)
        token, back = request.headers.get(RELAY_HEADER, ""), request.headers.get(RELAY_BACK_HEADER, "")
        request_id = request.headers.get("x-request-id", "")
        try:
            decision = self.processor.signer.unseal(RELAY_PURPOSE, token, time.time())
        except ValueError:
            refused = Forbidden("this path takes only streams the gateway relays")
            return web.Response(status=refused.status, body=refused.body_for(api), content_type="application/json")
        try:
            return await self._relay(request, path, api, back, token, decision, request_id)
        except ClientGone:
            log.info("relayed stream %s: the client left", request_id or "(no id)")
            self.processor.metrics.relayed_streams.labels(decision.get("policy", ""), "client_left").inc()
            return web.Response(status=499)
        except Exception:
            # Before the answer's headers: a 500 the client can quote. After them, the stream
            # ends without its normal end (aiohttp closes it), never as a complete answer.
            log.exception("stream relay failed on request %s", request_id or "(no id)")
            self.processor.metrics.internal_errors.inc()
            err = InternalError(request_id)
            return web.Response(status=err.status, body=err.body_for(api), content_type="application/json")

    async def _relay(
        self, request: Any, path: str, api: str, back: str, token: str, decision: dict[str, str], request_id: str
    ) -> Any:
        from aiohttp import web

        raw = await request.read()
        headers = forwarded(request.headers)
        policy = self.processor.tables.current.by_id.get(decision.get("policy_id", ""))
        mode = policy.broken_stream if policy is not None else "error"
        url = f"http://{back}{path}"
        async with self.session().post(url, data=raw, headers={**headers, RELAY_HEADER: token}) as upstream:
            response = web.StreamResponse(status=upstream.status, headers=forwarded(upstream.headers))
            try:
                await response.prepare(request)
            except (ConnectionError, RuntimeError) as exc:
                raise ClientGone from exc
            if not is_stream(upstream.headers, upstream.status):
                async for chunk in upstream.content.iter_any():
                    await _send(response, chunk)
                await response.write_eof()
                return response
            transcript = Transcript(api)
            broken = await self._pipe(upstream, response, transcript)
        outcome = "complete"
        if broken is not None:
            outcome = "error"
            served = (upstream.headers.get("x-signalbox-provider", ""), upstream.headers.get("x-signalbox-model", ""))
            can_continue = mode == "continue" and transcript.continuable and policy is not None
            if can_continue and await self._continue(url, headers, raw, decision, policy, served, transcript, response):
                outcome = "continued"
            if outcome == "error":
                message = f"the provider's stream broke after it started ({broken}); the answer is incomplete"
                await _send(response, error_event(api, message, transcript.events))
            log.warning("relayed stream %s broke (%s): %s", request_id or "(no id)", broken, outcome)
        self.processor.metrics.relayed_streams.labels(decision.get("policy", ""), outcome).inc()
        await response.write_eof()
        return response

    async def _pipe(
        self, upstream: Any, response: Any, transcript: Transcript, splicer: Splicer | None = None
    ) -> str | None:
        """Copy `upstream`'s answer to the client as it comes (spliced, for a continuation),
        each whole event read into `transcript`; what broke it, or None when it ended."""
        import aiohttp

        reader = sse.Reader()
        try:
            async for chunk in upstream.content.iter_any():
                events = reader.feed(chunk)
                for event in events:
                    transcript.read(event)
                out = chunk if splicer is None else b"".join(splicer.splice(e) for e in events)
                if out:
                    await _send(response, out)
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            return type(exc).__name__
        rest = reader.close()
        for event in rest:
            transcript.read(event)
        if splicer is not None and rest:
            await _send(response, b"".join(splicer.splice(e) for e in rest))
        return None

    async def _continue(
        self,
        url: str,
        headers: dict[str, str],
        raw: bytes,
        decision: dict[str, str],
        policy: Any,
        served: tuple[str, str],
        transcript: Transcript,
        response: Any,
    ) -> bool:
        """Ask the chain's next backends, in turn, for the rest of the answer; True once one
        finished it."""
        import aiohttp

        try:
            body = json.loads(raw)
        except ValueError:
            return False
        if not isinstance(body, dict):
            return False
        tried = {served}
        for choice in next_choice(policy, *served):
            backend = choice.backend
            if (backend.provider.name, backend.model) in tried:
                continue
            tried.add((backend.provider.name, backend.model))
            text = "".join(transcript.text)
            prefill = backend.provider.api in PREFILL_APIS
            then = dict(decision, target=choice.target, **{BODY_MODEL_KEY: backend.upstream_model})
            for key in _FIRST_ONLY:
                then.pop(key, None)
            token = seal(self.processor.signer, then, policy.open_seconds, time.time())
            continued = continuation_body(body, transcript.api, text, prefill)
            if continued is None:
                return False
            payload = json.dumps(continued).encode()
            sent = {**headers, RELAY_HEADER: token, "content-type": "application/json"}
            try:
                async with self.session().post(url, data=payload, headers=sent) as upstream:
                    if not is_stream(upstream.headers, upstream.status):
                        log.info("continuation on %s refused: %s", backend.id, upstream.status)
                        continue
                    trimmed = prefill and text != text.rstrip()
                    splicer = Splicer(transcript.api, transcript.answer_id, trimmed, frozenset(transcript.opened))
                    broken = await self._pipe(upstream, response, transcript, splicer)
            except (OSError, aiohttp.ClientError) as exc:
                log.info("continuation on %s failed: %r", backend.id, exc)
                continue
            if broken is None:
                return True
            served = (backend.provider.name, backend.model)
            if not transcript.continuable:
                return False
        return False
