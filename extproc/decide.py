"""The two ext_proc phases as pure functions of bytes and headers (no gRPC here).

Router phase (downstream filter, once per request): parse the body once, find the policy by the
`model` alias (+ header/path matches), classify, select the first backend, and say which Envoy
target to route to. Upstream phase (upstream filter of the aggregate cluster, once per attempt,
including failover attempts): given the backend Envoy picked, produce that backend's path,
authority, auth header and body `model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from signalbox.core.envoygen import too_large_message
from signalbox.core.errors import MalformedRequest, PayloadTooLarge, UnknownModel, UnsupportedPath

from .classify import Classification, features
from .runtime import BackendRuntime, PolicyRuntime, RuntimeTable
from .strategies import RequestContext, Selection, SelectionState, select
from .tiers import classify_request

TARGET = "x-signalbox-target"
# Tells the upstream phase which model the body already names, so the first attempt (the
# common case) needs no second parse of the body.
BODY_MODEL = "x-signalbox-body-model"
# Gateway-owned request headers: overwritten in the router phase, so clients cannot spoof them,
# and removed in the upstream phase, so providers never see them.
GATEWAY_HEADERS = (TARGET, BODY_MODEL)

ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MODELS_PATH = "/v1/models"


def check_path(method: str, path: str) -> str:
    """Return the kind of request ("route" or "models"), or raise for paths we do not serve."""
    bare = path.split("?", 1)[0].rstrip("/")
    if bare in ROUTED_PATHS and method == "POST":
        return "route"
    if bare == MODELS_PATH and method == "GET":
        return "models"
    if bare in ROUTED_PATHS or bare == MODELS_PATH:
        raise UnsupportedPath(f"{method} is not supported on {bare}")
    raise UnsupportedPath(f"unknown path {bare!r}; supported: {', '.join((*ROUTED_PATHS, MODELS_PATH))}")


def check_length(headers: dict[str, str], limit: int) -> None:
    length = headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(too_large_message(limit))


def models_listing(table: RuntimeTable) -> bytes:
    """What `GET /v1/models` on the gateway answers: the aliases clients may send."""
    data = [{"id": a, "object": "model", "created": 0, "owned_by": "signalbox"} for a in table.aliases]
    return json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class RouterOutcome:
    policy: PolicyRuntime
    selection: Selection
    classification: Classification
    set_headers: tuple[tuple[str, str], ...]
    body: bytes


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MalformedRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise MalformedRequest("request body needs a string field 'model'", param="model")
    return body


def find_policy(table: RuntimeTable, alias: str, path: str, headers: dict[str, str]) -> PolicyRuntime:
    candidates = table.by_alias.get(alias)
    if not candidates:
        known = ", ".join(table.aliases) or "(none configured)"
        raise UnknownModel(f"model {alias!r} is not served by this gateway; available: {known}", param="model")
    for policy in candidates:
        if policy.matches(path, headers):
            return policy
    raise UnknownModel(f"model {alias!r} has no policy matching this request's headers or path", param="model")


def decide(
    table: RuntimeTable,
    state: SelectionState,
    path: str,
    headers: dict[str, str],
    raw_body: bytes,
    client_address: str = "",
    explain: bool = False,
    max_body_bytes: int = 0,
) -> RouterOutcome:
    if max_body_bytes and len(raw_body) > max_body_bytes:
        raise PayloadTooLarge(too_large_message(max_body_bytes))
    body = parse_body(raw_body)
    policy = find_policy(table, body["model"], path, headers)
    feats = features(body)
    cls = classify_request(policy, feats)
    hash_key = (headers.get(policy.hash_header, "") if policy.hash_header else "") or client_address
    ctx = RequestContext(feats, cls, hash_key)
    selection = select(policy, ctx, state, explain)
    backend = selection.choice.backend
    body["model"] = backend.upstream_model
    new_body = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return RouterOutcome(
        policy=policy,
        selection=selection,
        classification=cls,
        set_headers=((TARGET, selection.choice.target), (BODY_MODEL, backend.upstream_model)),
        body=new_body,
    )


# --------------------------------------------------------------------------- upstream phase


@dataclass(frozen=True, slots=True)
class UpstreamOutcome:
    backend: BackendRuntime
    set_headers: tuple[tuple[str, str], ...]
    remove_headers: tuple[str, ...]
    # The body still names another backend's model (a failover attempt): rewrite it.
    rewrite_body: bool


def upstream_path(backend: BackendRuntime, path: str) -> str:
    bare, _, query = path.partition("?")
    suffix = bare[3:] if bare.startswith("/v1/") else bare
    provider = backend.provider
    if provider.azure:
        new = f"{provider.base_path}/openai/deployments/{backend.upstream_model}{suffix}"
        query = "&".join(q for q in (query, f"api-version={provider.azure_api_version}") if q)
    else:
        new = provider.base_path + suffix
    return f"{new}?{query}" if query else new


def upstream(table: RuntimeTable, backend_id: str, path: str, headers: dict[str, str]) -> UpstreamOutcome:
    backend = table.backends.get(backend_id)
    if backend is None:
        # Envoy runs an older cluster set than this table (reload in flight): fail this attempt
        # loudly rather than sending a request with the wrong credentials.
        raise LookupError(f"backend {backend_id!r} is not in routing config generation {table.generation}")
    provider = backend.provider
    set_headers = [(":path", upstream_path(backend, path)), (":authority", provider.authority)]
    remove = {*GATEWAY_HEADERS, "authorization", "api-key"}
    if provider.auth_value is not None:
        set_headers.append((provider.auth_header, provider.auth_value.reveal()))
        remove.discard(provider.auth_header)
    return UpstreamOutcome(
        backend=backend,
        set_headers=tuple(set_headers),
        remove_headers=tuple(sorted(remove)),
        rewrite_body=headers.get(BODY_MODEL) != backend.upstream_model,
    )


def rewrite_model(raw_body: bytes, model: str) -> bytes:
    body = parse_body(raw_body)
    body["model"] = model
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
