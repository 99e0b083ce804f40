"""An OpenAI-compatible fake provider for the quickstart, tests and benchmarks.

It answers chat/completions/embeddings/models on any base path (so OpenAI, vLLM and Azure
deployment paths all work), names itself in every answer (`x-fake-provider` header and
`system_fingerprint`), and records what arrived (path, headers, model) so a test can prove
where a request went and with which credentials.

Steering: per server with `POST /_fake/behaviour` {"status": 500, "delay_ms": 0,
"api_key": "..."}; per request with headers `x-fake-status` / `x-fake-delay-ms`, optionally
limited to one server by `x-fake-only: <id>`. `stream: true` answers with server-sent events,
`x-fake-chunks` of them, `x-fake-chunk-delay-ms` apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web


@dataclass
class Behaviour:
    status: int = 200
    delay_ms: int = 0
    # When set, requests must carry it as `Authorization: Bearer <key>` or `api-key: <key>`.
    api_key: str = ""
    # When set, the assistant's answer (e.g. JSON for a classifier); else it names server and model.
    content: str = ""


class FakeProvider:
    def __init__(self, ident: str, record: int = 2000):
        self.ident = ident
        self.url = ""
        self.behaviour = Behaviour()
        self.requests: deque[dict[str, Any]] = deque(maxlen=record)
        self.count = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/_fake/behaviour", self.set_behaviour)
        app.router.add_get("/_fake/requests", self.list_requests)
        app.router.add_post("/_fake/reset", self.reset)
        app.router.add_get("/{tail:.*}", self.handle_get)
        app.router.add_post("/{tail:.*}", self.handle_post)
        return app

    async def set_behaviour(self, request: web.Request) -> web.Response:
        self.behaviour = Behaviour(**{**asdict(Behaviour()), **await request.json()})
        return web.json_response(asdict(self.behaviour))

    async def list_requests(self, request: web.Request) -> web.Response:
        return web.json_response({"id": self.ident, "count": self.count, "requests": list(self.requests)})

    async def reset(self, request: web.Request) -> web.Response:
        self.requests.clear()
        self.count = 0
        self.behaviour = Behaviour()
        return web.json_response({"ok": True})

    def _steer(self, request: web.Request) -> tuple[int, int]:
        status, delay = self.behaviour.status, self.behaviour.delay_ms
        only = request.headers.get("x-fake-only")
        if only is None or only == self.ident:
            status = int(request.headers.get("x-fake-status", status))
            delay = int(request.headers.get("x-fake-delay-ms", delay))
        return status, delay

    def _authorized(self, request: web.Request) -> bool:
        key = self.behaviour.api_key
        if not key:
            return True
        return request.headers.get("authorization") == f"Bearer {key}" or request.headers.get("api-key") == key

    def _error(self, status: int, message: str) -> web.Response:
        body = {
            "error": {"message": f"[{self.ident}] {message}", "type": "fake_error", "param": None, "code": str(status)}
        }
        return web.json_response(body, status=status, headers={"x-fake-provider": self.ident})

    async def _refusal(self, request: web.Request) -> web.Response | None:
        """Steered delay, then the error this request should get (wrong key, steered status), if any."""
        status, delay = self._steer(request)
        if delay:
            await asyncio.sleep(delay / 1000)
        if not self._authorized(request):
            return self._error(401, "missing or wrong API key")
        if status != 200:
            return self._error(status, f"steered to fail with {status}")
        return None

    async def handle_get(self, request: web.Request) -> web.Response:
        refusal = await self._refusal(request)
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
        return self._error(404, f"no route {request.path}")

    async def handle_post(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            return self._error(400, "body is not JSON")
        self.count += 1
        self.requests.append(
            {
                "path": request.path_qs,
                "headers": dict(request.headers),
                "model": body.get("model"),
                "stream": bool(body.get("stream")),
                "stream_options": body.get("stream_options"),
            }
        )
        refusal = await self._refusal(request)
        if refusal is not None:
            return refusal
        model = body.get("model", "")
        if request.path.endswith("/embeddings"):
            return web.json_response(
                {
                    "object": "list",
                    "model": model,
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                    "usage": {"prompt_tokens": 3, "total_tokens": 3},
                },
                headers={"x-fake-provider": self.ident},
            )
        if body.get("stream"):
            return await self._stream(request, body, model)
        content = self.behaviour.content or f"[{self.ident}] answer from {model}"
        answer = {
            "id": f"chatcmpl-{self.ident}-{self.count}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": self.ident,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17},
        }
        return web.json_response(answer, headers={"x-fake-provider": self.ident})

    async def _stream(self, request: web.Request, body: dict[str, Any], model: str) -> web.StreamResponse:
        chunks = int(request.headers.get("x-fake-chunks", 5))
        gap = int(request.headers.get("x-fake-chunk-delay-ms", 0)) / 1000
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "x-fake-provider": self.ident})
        await response.prepare(request)

        def event(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> bytes:
            chunk: dict[str, Any] = {
                "id": f"chatcmpl-{self.ident}-{self.count}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": self.ident,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage is not None:
                chunk["choices"], chunk["usage"] = [], usage
            return f"data: {json.dumps(chunk)}\n\n".encode()

        for i in range(chunks):
            await response.write(event({"content": f"chunk{i} "} if i else {"role": "assistant", "content": "chunk0 "}))
            if gap:
                await asyncio.sleep(gap)
        await response.write(event({}, finish="stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(
                event({}, usage={"prompt_tokens": 10, "completion_tokens": chunks, "total_tokens": 10 + chunks})
            )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


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


async def run(ident: str, host: str, port: int, ready: asyncio.Event | None = None) -> None:
    runner = web.AppRunner(FakeProvider(ident).app(), access_log=None)
    await runner.setup()
    # A deep accept queue: the scale bench opens thousands of streams within seconds, and a
    # provider that drops SYNs would be measured instead of the gateway.
    site = web.TCPSite(runner, host, port, backlog=BACKLOG, reuse_address=True)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    # The line tests and `signalbox up` wait for: the real port when 0 was asked for.
    print(f"fake-provider {ident} listening on http://{host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="signalbox fake-provider", description=__doc__.splitlines()[0])
    parser.add_argument("--id", required=True, help="name reported in every answer")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args.id, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
