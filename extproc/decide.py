"""The two ext_proc phases as pure functions of bytes and headers (no gRPC here).

Router phase (downstream filter, one message per request): parse the body once, find the policy
by the `model` alias (+ header/path matches), classify, select the first backend, name the
Envoy target to route to and rewrite the body's `model`. Every attempt (first, failover,
hedged) is then prepared by Envoy alone: path, authority and, when it differs, the body's
model and the key (core/attempt.lua, the key from the provider's file).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from signalbox.core.budget import BudgetStatus, refuse_if_exhausted
from signalbox.core.envoygen import contract
from signalbox.core.envoygen.contract import (
    CHAT_PATH,
    EMBEDDINGS_PATH,
    FEEDBACK_PATH,
    MESSAGES_PATH,
    MODELS_PATH,
    RESPONSES_PATH,
    ROUTED_PATHS,
    api_of_path,
    too_large_message,
)
from signalbox.core.errors import (
    OPENAI_API,
    MalformedRequest,
    PayloadTooLarge,
    RequestError,
    UnknownModel,
    UnsupportedFeature,
    UnsupportedPath,
)

from . import body as body_codec
from .classify import Classification, Features, embeddings_class, features
from .decisions import DecisionSigner
from .runtime import BackendRuntime, PolicyRuntime, RuntimeTable
from .semantic import prompt_vector
from .strategies import RequestContext, Selection, SelectionState, select
from .tiers import classify_request
from .translate import Translation


def check_path(method: str, path: str) -> str:
    """Return the kind of request with a body ("route" or "feedback"), or raise for paths we do
    not serve (the models API has none: envoygen.modelsapi)."""
    bare = path.split("?", 1)[0].rstrip("/")
    if bare in ROUTED_PATHS and method == "POST":
        return "route"
    if bare == FEEDBACK_PATH and method == "POST":
        return "feedback"
    if bare in ROUTED_PATHS or bare in (MODELS_PATH, FEEDBACK_PATH):
        raise UnsupportedPath(f"{method} is not supported on {bare}")
    raise UnsupportedPath(f"unknown path {bare!r}; supported: {contract.SUPPORTED_PATHS}")


def class_header(c: Classification) -> str:
    """x-signalbox-class: what the request was judged to be, and by which tier, how surely."""
    return (
        f"class={c.class_key}; task={c.task_type}; complexity={c.complexity}; "
        f"tier={c.tier}; confidence={c.confidence:.2f}"
    )


def apply_feedback(
    table: RuntimeTable,
    state: SelectionState,
    raw_body: bytes,
    signer: DecisionSigner,
    authorize: Callable[[PolicyRuntime], None] | None = None,
) -> dict[str, Any]:
    """`POST /v1/feedback {"decision": <x-signalbox-decision>, "score": 0..1}` -> learning.

    `authorize`: raises when the caller may not teach the decision's policy (consumers)."""
    try:
        body = json.loads(raw_body)
        score = float(body["score"])
        token = body["decision"]
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        raise MalformedRequest(
            'feedback needs {"decision": <x-signalbox-decision header>, "score": <0..1>}', param="decision"
        ) from None
    try:
        policy, class_key, backend_id = signer.read(token)
    except ValueError:
        raise MalformedRequest(
            "'decision' is not a token this gateway issued (copy the x-signalbox-decision response header)",
            param="decision",
        ) from None
    if not 0 <= score <= 1:
        raise MalformedRequest("score must be between 0 and 1", param="score")
    decided_by = next((p for p in table.policies if p.name == policy), None)
    if backend_id not in table.backends or decided_by is None:
        raise UnknownModel(f"decision names a policy or backend not in force ({policy}, {backend_id})")
    if authorize is not None:
        authorize(decided_by)
    state.observe_quality(policy, class_key, backend_id, score, state.recall(token))
    return {"recorded": True, "policy": policy, "class": class_key, "backend": backend_id}


def check_length(headers: dict[str, str], limit: int) -> None:
    length = headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(too_large_message(limit))


@dataclass(frozen=True, slots=True)
class RouterOutcome:
    policy: PolicyRuntime
    selection: Selection
    classification: Classification
    # The body for the first choice (its model; usage asked for in streams). Everything else
    # about that attempt (path, authority, key) is the target route's, in Envoy.
    body: bytes
    # The prompt's vector when the policy learns per prompt: feedback on this decision teaches
    # the prompts around it (the servicer keeps it by decision token).
    vector: np.ndarray | None = None

    @property
    def target(self) -> str:
        """The Envoy route (and aggregate cluster) of the first choice: dynamic metadata."""
        return self.selection.choice.target


def parse_body(raw: bytes) -> dict[str, Any]:
    return body_codec.parse(raw)


def find_policy(table: RuntimeTable, alias: str, path: str, headers: dict[str, str]) -> PolicyRuntime:
    candidates = table.by_alias.get(alias)
    if not candidates:
        known = ", ".join(table.aliases) or "(none configured)"
        raise UnknownModel(f"model {alias!r} is not served by this gateway; available: {known}", param="model")
    for policy in candidates:
        if policy.matches(path, headers):
            return policy
    raise UnknownModel(f"model {alias!r} has no policy matching this request's headers or path", param="model")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A parsed, matched and classified request (tiers 1-2): what tier 3 and selection start from."""

    body: dict[str, Any]
    policy: PolicyRuntime
    features: Features
    classification: Classification
    hash_key: str
    path: str = "/v1/chat/completions"
    headers: dict[str, str] | None = None
    # API family -> why this request cannot go to a backend of it (refused_apis()).
    refused_apis: dict[str, RequestError] | None = None


def client_address(headers: dict[str, str]) -> str:
    """The caller's address as Envoy reports it (the hash and sticky key of last resort)."""
    forwarded = headers.get("x-forwarded-for", "")
    return forwarded.split(",")[-1].strip() if forwarded else headers.get("x-envoy-external-address", "")


def prepare(
    table: RuntimeTable,
    path: str,
    headers: dict[str, str],
    raw_body: bytes,
    client_address: str = "",
    max_body_bytes: int = 0,
) -> Prepared:
    if max_body_bytes and len(raw_body) > max_body_bytes:
        raise PayloadTooLarge(too_large_message(max_body_bytes))
    body = parse_body(raw_body)
    policy = find_policy(table, body["model"], path, headers)
    embeddings = path.split("?", 1)[0].rstrip("/") == EMBEDDINGS_PATH
    feats = features(body, embeddings=embeddings)
    hash_key = (headers.get(policy.hash_header, "") if policy.hash_header else "") or client_address
    classification = embeddings_class(feats) if embeddings else classify_request(policy, feats)
    refused = refused_apis(policy, path, raw_body)
    return Prepared(body, policy, feats, classification, hash_key, path, headers, refused)


def prepare_candidate(
    prepared: Prepared, candidate: PolicyRuntime, raw_body: bytes, client_address: str = ""
) -> Prepared:
    """The same request, as a rollout's candidate policy would see it (its own rules, hash
    header and eligible API families)."""
    feats = prepared.features
    headers = prepared.headers or {}
    hash_key = (headers.get(candidate.hash_header, "") if candidate.hash_header else "") or client_address
    if feats.embeddings:
        classification = embeddings_class(feats)
    elif candidate.classifier_key == prepared.policy.classifier_key:
        classification = prepared.classification  # the same tiers: the same answer, already paid for
    else:
        classification = classify_request(candidate, feats)
    return dataclasses.replace(
        prepared,
        policy=candidate,
        classification=classification,
        hash_key=hash_key,
        refused_apis=refused_apis(candidate, prepared.path, raw_body),
    )


# The paths a backend of another API family can serve, translated.
_TRANSLATABLE_PATHS = (CHAT_PATH, MESSAGES_PATH, RESPONSES_PATH)


def refused_apis(policy: PolicyRuntime, path: str, raw_body: bytes) -> dict[str, RequestError]:
    """For each API family of the policy's backends other than the client's, why this request
    cannot be translated for it (absent: it can). Only policies that mix families pay for this."""
    src = api_of_path(path)
    foreign = {b.provider.api for b in policy.all_backends if not b.provider.speaks(src)}
    out: dict[str, RequestError] = {}
    bare = path.split("?", 1)[0].rstrip("/")
    for dst in sorted(foreign):
        if bare not in _TRANSLATABLE_PATHS:
            out[dst] = UnsupportedFeature(f"{bare} is not available on {dst} backends")
            continue
        try:
            Translation(src, dst).request(raw_body)
        except RequestError as err:
            # What cannot be said in that API (or read for it) rules out its backends only: a
            # backend of the client's own API may still take the request as it is.
            out[dst] = err
    return out


def needs_llm(prepared: Prepared) -> bool:
    llm = prepared.policy.llm
    return (
        llm is not None and not prepared.features.embeddings and prepared.classification.confidence < llm.min_confidence
    )


def choose(
    prepared: Prepared,
    state: SelectionState,
    classification: Classification | None = None,
    explain: bool = False,
    budget: BudgetStatus | None = None,
) -> tuple[Selection, np.ndarray | None]:
    """The selection alone (and the prompt's vector when per-prompt learning needs it): what a
    shadow decision records, without the body rewrite only a served request needs."""
    vector = None
    if prepared.policy.learning_per_prompt and not prepared.features.embeddings and prepared.features.text:
        vector = prompt_vector(prepared.features.text)
    context = RequestContext(
        prepared.features,
        classification or prepared.classification,
        prepared.hash_key,
        prepared.refused_apis or {},
        vector,
        api_of_path(prepared.path),
    )
    return select(prepared.policy, context, state, explain, budget), vector


def finish(
    prepared: Prepared,
    state: SelectionState,
    classification: Classification | None = None,
    explain: bool = False,
    budget: BudgetStatus | None = None,
    now: float = 0.0,
) -> RouterOutcome:
    """Select the backend for a prepared request (optionally reclassified by tier 3) and rewrite it.

    `budget` is the policy's spend status when it has a budget: past the downgrade fraction it
    overrides the strategy, and an exhausted `reject` budget refuses here (429).
    """
    cls = classification or prepared.classification
    if budget is not None:
        refuse_if_exhausted(prepared.policy.name, budget, now)
    selection, vector = choose(prepared, state, cls, explain, budget)
    backend = selection.choice.backend
    body = {**prepared.body, "model": backend.upstream_model}
    if body.get("stream") is True and api_of_path(prepared.path) == OPENAI_API:
        if not backend.provider.stream_usage:
            body.pop("stream_options", None)  # the provider refuses the field (streamUsage: false)
        else:
            # Usage is how spend is counted: ask for it in streams too (clients ignore the extra chunk).
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return RouterOutcome(
        policy=prepared.policy, selection=selection, classification=cls, body=body_codec.dump(body), vector=vector
    )


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
    """The router phase without tier 3 (offline tools; the servicer adds the awaited LLM tier)."""
    return finish(prepare(table, path, headers, raw_body, client_address, max_body_bytes), state, explain=explain)


# --------------------------------------------------------------------------- provider paths


def upstream_path(backend: BackendRuntime, path: str) -> str:
    """The provider's path for a client path (what attempt.lua does in Envoy; the LLM tier
    calls providers itself)."""
    bare, _, query = path.partition("?")
    suffix = bare[3:] if bare.startswith("/v1/") else bare
    provider = backend.provider
    if provider.azure:
        new = f"{provider.base_path}/openai/deployments/{backend.upstream_model}{suffix}"
        query = "&".join(q for q in (query, f"api-version={provider.azure_api_version}") if q)
    else:
        new = provider.base_path + suffix
    return f"{new}?{query}" if query else new
