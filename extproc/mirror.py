"""Mirroring: copies of a sampled share of a policy's requests to a backend being qualified
(issue 17, `spec.mirror`).

The router phase hands a copy of each sampled request here after its live decision; the copy
is sent from a task of its own, so the live request has its answer before the copy leaves.
A copy asks for the whole answer at once (no stream), in the backend's own API (translated
through chat when the client spoke another one), with the backend's model and key. Its answer
is read for status, latency and tokens and then dropped; its cost is counted in the mirror's
own metrics, never in budgets, limits or the policy's spend. Nothing a copy does can fail or
delay the live request: errors and timeouts are counted, and beyond `max_in_flight` copies
open in a worker, new ones are dropped and counted rather than queued.

Why here and not Envoy's request mirroring: Envoy discards a shadow's answer without logging
it, so its tokens (the cost to count) could never be known; a sampled share in Python can.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from signalbox.core.envoygen.contract import ANTHROPIC_VERSION, CHAT_PATH, MESSAGES_PATH, api_of_path
from signalbox.core.errors import ANTHROPIC_API, GEMINI_API, OPENAI_API, RequestError

from . import accounting
from .decide import upstream_path
from .metrics import Metrics
from .runtime import BackendRuntime, MirrorRuntime, PolicyRuntime
from .translate import Translation

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("signalbox.extproc")

# A copy that has not answered by then is abandoned (counted as an error): the policy's own
# timeout, capped so a copy never outlives this.
MAX_COPY_SECONDS = 300.0


def copy_request(backend: BackendRuntime, path: str, raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """(URL, headers, body) of a copy of a client request for `backend`: its model and path,
    never streamed (the key is added when the copy is sent: a minted token may need a wait).
    RequestError when the body cannot be read or said in its API."""
    src = api_of_path(path)
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("request body is not a JSON object")
    body.pop("stream_options", None)
    body["stream"] = False
    body["model"] = backend.upstream_model
    plain = json.dumps(body, separators=(",", ":")).encode()
    dst = backend.provider.api
    if src == dst:
        out, target = plain, upstream_path(backend, path)
    else:
        out = Translation(src, dst).request(plain)
        if dst == GEMINI_API:
            target = f"{backend.provider.base_path}/models/{backend.upstream_model}:generateContent"
        else:
            target = upstream_path(backend, MESSAGES_PATH if dst == ANTHROPIC_API else CHAT_PATH)
    provider = backend.provider
    headers = {"content-type": "application/json"}
    if dst == ANTHROPIC_API:
        headers["anthropic-version"] = ANTHROPIC_VERSION
    return f"{provider.scheme}://{provider.authority}{target}", headers, out


def usage_of(backend: BackendRuntime, raw: bytes) -> accounting.Usage | None:
    """The tokens of a backend's whole answer (any API, read through chat); None without usage."""
    try:
        chat = json.loads(Translation(OPENAI_API, backend.provider.api).answer(raw))
        usage = chat.get("usage") if isinstance(chat, dict) else None
        if not isinstance(usage, dict):
            return None
        return accounting.Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
    except (ValueError, TypeError, AttributeError, RequestError):
        return None


class Mirrors:
    def __init__(self, metrics: Metrics, rng: random.Random | None = None):
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.session: aiohttp.ClientSession | None = None
        self.in_flight: dict[str, int] = {}  # policy id -> copies open in this worker
        self.tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.session is not None:
            await self.session.close()

    def maybe_copy(self, policy: PolicyRuntime, request_id: str, path: str, raw: bytes) -> bool:
        """Send a copy of this request if the mirror samples it; returns whether one left.
        Never raises and never waits."""
        mirror = policy.mirror
        if mirror is None or self.rng.random() * 100 >= mirror.percent:
            return False
        labels = (policy.name, mirror.backend.id)
        if mirror.backend.provider.key_missing:
            self.metrics.mirror_requests.labels(*labels, "no_key").inc()
            return False
        if self.in_flight.get(policy.id, 0) >= mirror.max_in_flight:
            self.metrics.mirror_requests.labels(*labels, "dropped").inc()
            return False
        try:
            url, headers, body = copy_request(mirror.backend, path, raw)
        except Exception as exc:  # unreadable or inexpressible in its API: no copy, never a failure
            self.metrics.mirror_requests.labels(*labels, "untranslatable").inc()
            log.info("request %s not mirrored to %s: %s", request_id, mirror.backend.id, exc)
            return False
        self.in_flight[policy.id] = self.in_flight.get(policy.id, 0) + 1
        self.metrics.mirror_in_flight.inc()
        timeout = min(policy.open_seconds, MAX_COPY_SECONDS)
        task = asyncio.get_running_loop().create_task(
            self._send(policy, mirror, request_id, url, headers, body, timeout)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _send(
        self,
        policy: PolicyRuntime,
        mirror: MirrorRuntime,
        request_id: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
        timeout: float,
    ) -> None:
        backend = mirror.backend
        labels = (policy.name, backend.id)
        started = time.perf_counter()
        outcome, usage = "error", None
        try:
            import aiohttp  # 12.7 MB: only in workers that send copies

            if self.session is None:
                self.session = aiohttp.ClientSession()
            headers = {**headers, **await backend.provider.auth_headers()}
            # Never follow a redirect: it would carry the key to wherever the provider points.
            async with self.session.post(
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                answer = await response.read()
                outcome = f"{response.status // 100}xx"
                if response.status < 300:
                    usage = usage_of(backend, answer)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as exc:  # a copy fails alone: counted, never raised
            log.info("mirror copy of %s to %s failed: %s", request_id, backend.id, type(exc).__name__)
        finally:
            seconds = time.perf_counter() - started
            self.in_flight[policy.id] -= 1
            self.metrics.mirror_in_flight.dec()
            self.metrics.mirror_requests.labels(*labels, outcome).inc()
            self.metrics.mirror_duration.labels(*labels).observe(seconds)
            record = self._record(policy, backend, usage, outcome, seconds, request_id)
            log.info("mirror %s", json.dumps(record, separators=(",", ":")))

    def _record(
        self,
        policy: PolicyRuntime,
        backend: BackendRuntime,
        usage: accounting.Usage | None,
        outcome: str,
        seconds: float,
        request_id: str,
    ) -> dict[str, Any]:
        """Tokens and cost into the mirror's own metrics; returns the log record of the copy."""
        labels = (policy.name, backend.id)
        record: dict[str, Any] = {
            "request_id": request_id,
            "policy": policy.name,
            "backend": backend.id,
            "outcome": outcome,
            "duration_ms": round(seconds * 1000, 1),
        }
        if usage is not None:
            cost = accounting.cost_usd(usage, backend.input_price, backend.output_price)
            self.metrics.mirror_tokens.labels(*labels, "input").inc(usage.prompt_tokens)
            self.metrics.mirror_tokens.labels(*labels, "output").inc(usage.completion_tokens)
            self.metrics.mirror_cost.labels(*labels).inc(cost)
            record.update(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens, cost_usd=cost)
        return record
