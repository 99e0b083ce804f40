"""The ext_proc's admin HTTP API (aiohttp), on its own port beside the gRPC server.

GET  /healthz           liveness and the config generation in force
GET  /metrics           Prometheus metrics
GET  /v1/models         aliases, their policies and backends (price, quality, health)
POST /v1/classify       what the classification tiers make of an OpenAI request body
POST /v1/route          dry run: the decision for a request body and why (candidates kept or
                        dropped, tier, class) without changing any routing state
POST /v1/feedback       {"decision": <x-signalbox-decision>, "score": 0..1}: teaches learning
POST /relay/<path>      the stream relay (relay.py): requests Envoy sends with the router
                        phase's signed decision; anything else is refused (403)
GET  /v1/budget         per budgeted policy: state, and per window its limit, spend (this
                        replica and the others), what requests in flight hold, remaining
                        and reset time

It shares the servicer's table and learning state: what /v1/route explains is what the next
live request would get (strategies that keep rotating state are explained on a copy).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from signalbox.core.envoygen.contract import RELAY_PATH_PREFIX
from signalbox.core.errors import Forbidden, PayloadTooLarge, RequestError, UnsupportedPath

from . import decide, identity, limits, relay
from .classify import Classification
from .metrics import CONTENT_TYPE
from .runtime import PolicyRuntime
from .server import Processor


def _classification(c: Classification) -> dict[str, Any]:
    return {
        "class": c.class_key,
        "task_type": c.task_type,
        "complexity": c.complexity,
        "tier": c.tier,
        "confidence": round(c.confidence, 4),
        "reason": c.reason,
        "estimated_tokens": c.estimated_tokens,
    }


def _error(err: RequestError) -> web.Response:
    return web.Response(status=err.status, body=err.body(), content_type="application/json")


def build_app(processor: Processor, token: str = "", exposed: bool = False) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        tables = processor.tables
        body: dict[str, object] = {"status": "ok", "generation": tables.current.generation}
        if tables.last_error:
            # Still serving the last good config; what was published is not in force.
            body["config_error"] = tables.last_error
        return web.json_response(body)

    async def metrics(request: web.Request) -> web.Response:
        # Off the event loop: a scrape reads every worker's series (sharedmetrics), tens of
        # thousands at a large fleet, and the worker keeps answering meanwhile.
        body = await asyncio.to_thread(processor.metrics.exposition)
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE})

    async def models(request: web.Request) -> web.Response:
        table = processor.tables.current
        cooling = processor.state.cooling()
        data = []
        for alias in table.aliases:
            for policy in table.by_alias[alias]:
                healthy = {c.backend.id for c in policy.choices}
                data.append(
                    {
                        "id": alias,
                        "object": "model",
                        "owned_by": "signalbox",
                        "policy": policy.name,
                        "strategy": policy.strategy,
                        "backends": [
                            {
                                "backend": b.id,
                                "provider": b.provider.name,
                                "model": b.model,
                                "upstream_model": b.upstream_model,
                                "input_price_per_1m": b.input_price,
                                "output_price_per_1m": b.output_price,
                                "quality": b.quality,
                                "context_window": b.context_window,
                                "capabilities": sorted(b.capabilities),
                                "healthy": b.id in healthy,
                                **(
                                    {"cooling_down": {"reason": cooling[b.id][1], "until": cooling[b.id][0]}}
                                    if b.id in cooling
                                    else {}
                                ),
                            }
                            for b in policy.all_backends
                        ],
                    }
                )
        return web.json_response({"object": "list", "generation": table.generation, "data": data})

    async def prepared(request: web.Request) -> decide.Prepared:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        return decide.prepare(
            processor.tables.current, "/v1/chat/completions", headers, raw, max_body_bytes=processor.max_body_bytes
        )

    async def classify(request: web.Request) -> web.Response:
        try:
            p = await prepared(request)
        except RequestError as err:
            return _error(err)
        result = await processor.reclassify(p) or p.classification
        return web.json_response({"policy": p.policy.name, "classification": _classification(result)})

    async def route(request: web.Request) -> web.Response:
        table = processor.tables.current
        shadow_of: decide.Prepared | None = None
        note = ""
        try:
            p = await prepared(request)
            now = time.time()
            # Who the live request would be: its key (x-api-key, or a Bearer token that is not
            # the admin token) or `?consumer=<namespace/name>`; then its 401/403, as live.
            consumer = _consumer_of(request, table.identities, token, now)
            identity.authorize(table.identities, consumer, p.policy, str(p.body["model"]), p.headers or {})
            live = p.policy
            # A rollout, as live: a canary's side for this caller, or the shadow's own decision.
            p, shadow_of, note = processor.rollout(table, p, p.headers or {}, await request.read(), count=False)
            better = await processor.reclassify(p)
            # A copy: explaining must not advance round-robin positions or weights.
            outcome = decide.finish(
                p,
                processor.state.snapshot(),
                better,
                explain=True,
                budget=await _budget(processor, p, consumer, now),
                now=now,
            )
        except RequestError as err:
            return _error(err)
        choice = outcome.selection.choice
        return web.json_response(
            {
                "policy": outcome.policy.name,
                "strategy": outcome.policy.strategy,
                "classification": _classification(outcome.classification),
                "backend": choice.backend.id,
                "provider": choice.backend.provider.name,
                "model": choice.backend.model,
                "upstream_model": choice.backend.upstream_model,
                "target": choice.target,
                "reason": outcome.selection.reason,
                # Envoy routes a compiled policy alone: its split is random with these shares,
                # so `backend` is one likely answer, `shares` the whole prediction.
                "compiled": outcome.policy.compiled,
                "shares": _shares(outcome.policy) if outcome.policy.compiled else None,
                "candidates": [
                    {"backend": b, "kept": kept, "reason": why} for b, kept, why in outcome.selection.candidates
                ],
                "config_generation": processor.tables.current.generation,
                # The consumer's id, "anonymous", or null while no consumer is declared.
                "consumer": consumer.id if consumer else ("anonymous" if table.identities.enabled else None),
                "rollout": _rollout(live, _shadow(shadow_of, processor, note), processor),
                "mirror": {"backend": live.mirror.backend.id, "percent": live.mirror.percent} if live.mirror else None,
            }
        )

    def _shares(policy: PolicyRuntime) -> dict[str, float]:
        if policy.strategy not in ("weighted", "round-robin"):
            return {policy.choices[0].backend.id: 1.0}
        weights = {c.backend.id: (c.weight if policy.strategy == "weighted" else 1) for c in policy.choices}
        total = sum(weights.values()) or 1
        return {b: w / total for b, w in weights.items()}

    async def feedback(request: web.Request) -> web.Response:
        try:
            recorded = decide.apply_feedback(
                processor.tables.current, processor.state, await request.read(), processor.signer
            )
        except RequestError as err:
            return _error(err)
        processor.metrics.feedback.labels(recorded["policy"]).inc()
        return web.Response(text=json.dumps(recorded), content_type="application/json")

    async def budgets(request: web.Request) -> web.Response:
        policies = []
        for policy, status in processor.budget_windows():
            assert policy.budget is not None
            policies.append(
                {
                    "policy": policy.name,
                    "id": policy.id,
                    "state": status.state,
                    "downgrade_at": policy.budget.downgrade_at,
                    "on_exhausted": "reject" if policy.budget.reject_when_exhausted else "cheapest",
                    "windows": [
                        {
                            "window": w.window,
                            "limit_usd": w.limit_usd,
                            "spent_usd": round(w.spent_usd, 9),
                            "local_usd": round(w.local_usd, 9),
                            "remote_usd": round(w.remote_usd, 9),
                            "in_flight_usd": round(w.in_flight_usd, 9),
                            "remaining_usd": round(w.remaining_usd, 9),
                            "fraction": round(w.fraction, 6),
                            "resets_at": datetime.fromtimestamp(w.resets_at, UTC).isoformat(),
                        }
                        for w in status.windows
                    ],
                }
            )
        return web.json_response(
            {
                "generation": processor.tables.current.generation,
                # Off (--no-accounting), no spend is counted and budgets never move.
                "accounting": processor.accounting,
                "policies": policies,
            }
        )

    limit = processor.max_body_bytes + 1024
    app = web.Application(client_max_size=limit, middlewares=[_json_errors(limit), _guard(token, exposed)])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/classify", classify)
    app.router.add_post("/v1/route", route)
    app.router.add_post("/v1/feedback", feedback)
    app.router.add_get("/v1/budget", budgets)
    # Streams of policies whose broken streams end with an error event or are continued; only
    # requests carrying the router phase's signature are relayed (relay.py).
    streams = relay.Relay(processor)
    app.router.add_post(RELAY_PATH_PREFIX + "/{tail:.*}", streams.handle)
    app.on_cleanup.append(lambda _app: streams.close())
    return app


# What costs money (the LLM tier behind /v1/classify and /v1/route) or changes routing
# (/v1/feedback teaches learning): behind a token wherever the API is reachable off the host.
def _rollout(live: PolicyRuntime, side: dict[str, Any] | None, processor: Processor) -> dict[str, Any] | None:
    """The rollout's part of an explanation: what it does with this request, and its run's
    figures so far on this gateway (and the other replicas, as they last published)."""
    if side is None or live.rollout is None:
        return side
    return {**side, "epoch": live.rollout.epoch, "figures": processor.rollouts.figures(live.rollout.epoch)}


def _shadow(shadow_of: decide.Prepared | None, processor: Processor, note: str) -> dict[str, Any] | None:
    """What the rollout does with this request: the canary's side, or the shadow's decision."""
    if shadow_of is None:
        return {"side": note} if note else None
    try:
        theirs = decide.finish(shadow_of, processor.state.snapshot(), explain=True).selection
    except RequestError as err:
        return {"shadow": shadow_of.policy.name, "error": err.message}
    return {"shadow": shadow_of.policy.name, "backend": theirs.choice.backend.id, "reason": theirs.reason}


def _consumer_of(
    request: web.Request, identities: identity.Identities, admin_token: str, now: float
) -> identity.ConsumerRuntime | None:
    named = request.query.get("consumer", "")
    if named:
        if named not in identities.consumers:
            raise RequestError(f"no consumer {named!r} is declared", param="consumer")
        return identities.consumers[named]
    headers = {k.lower(): v for k, v in request.headers.items()}
    if admin_token and headers.get("authorization", "") == f"Bearer {admin_token}":
        headers.pop("authorization")
    return identities.identify(headers, None, now)


async def _budget(processor: Processor, p: decide.Prepared, consumer: identity.ConsumerRuntime | None, now: float):
    """The budget the decision would see: the policy's, or the consumer's when further spent."""
    limits_of = consumer.limits if consumer else None
    if limits_of is None or not limits_of.has_budget:
        return processor.budget_status(p.policy, now)
    try:
        spent = await processor.limits.spend(limits_of.subject, now)
    except limits.StoreUnavailable:
        return processor.budget_status(p.policy, now)
    admitted = limits.Admitted({limits_of.subject: (spent, 0.0)})
    return processor.combined_budget(p.policy, consumer, admitted, now)


PRIVILEGED = frozenset({"/v1/classify", "/v1/route", "/v1/feedback"})


def _json_errors(limit: int):
    """aiohttp's own refusals (an unknown path, a wrong method, a body over `limit` bytes) as
    the JSON errors every other answer of the gateway gives, not its plain-text pages."""

    @web.middleware
    async def json_errors(request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return _error(UnsupportedPath(f"unknown admin path {request.path!r}"))
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            return _error(UnsupportedPath(f"only {allowed} is supported on {request.path}"))
        except web.HTTPRequestEntityTooLarge:
            return _error(PayloadTooLarge(f"request body exceeds the admin API's limit of {limit} bytes"))

    return json_errors


def _guard(token: str, exposed: bool):
    """Loopback only (the default): no token needed, only this pod or machine can call. Exposed:
    the privileged endpoints want `Authorization: Bearer <token>`, and without a configured
    token they are off (403) rather than open."""

    @web.middleware
    async def guard(request: web.Request, handler):
        if request.path in PRIVILEGED and (exposed or token):
            if not token:
                return _error(Forbidden("this endpoint is disabled on an exposed admin API without a token"))
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                return _error(Forbidden("this endpoint needs the admin token (Authorization: Bearer ...)"))
        return await handler(request)

    return guard


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host or "127.0.0.1").is_loopback
    except ValueError:
        return host == "localhost"


async def start(processor: Processor, host: str, port: int, token: str = "") -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(build_app(processor, token, exposed=not is_loopback(host)), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
