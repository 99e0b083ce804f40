"""The one home of the Envoy <-> ext_proc contract: the names both sides spell.

Header names, the metadata namespace and its keys, the attributes the router phase gets, the
API paths, the answers both give (models listing, empty-body and size messages). The generator
(this package) and the ext_proc (`signalbox.extproc`) import them from here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import struct_pb2

from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core.errors import ANTHROPIC_API, OPENAI_API, RESPONSES_API

# Request headers clients cannot set (a header_mutation filter removes them before the router
# phase) and providers never see (the upstream filters remove them last): Envoy's own record of
# a rewritten path, which would tell a provider the gateway's paths, and the attempt's backend.
PATH_HEADER = "x-envoy-original-path"
# Which backend an upstream attempt goes to, set per attempt from the picked host's name (the
# backend's id: `%UPSTREAM_HOST_NAME%` in one header_mutation filter) for attempt.lua, which
# cannot see the picked host; on the attempt's answer too (the last upstream filter before the
# codec), where attempt.lua turns it into the provider and model headers and removes it.
ATTEMPT_HEADER = "x-signalbox-attempt"
# The answer's provider and model (names, not ids), set by attempt.lua per attempt from the
# backend that answered; what the client, the request log and spans read.
PROVIDER_HEADER = "x-signalbox-provider"
MODEL_HEADER = "x-signalbox-model"
# attempt.lua's note of the answering backend's provider kind (the GenAI conventions' name),
# in ATTEMPT_NS, for spans' gen_ai.provider.name.
GENAI_PROVIDER_KEY = "genai_provider"
# An attempt whose backend speaks another API family than the client: "<client api>><backend
# api>", set by attempt.lua; the upstream-phase ext_proc runs only on attempts that carry it.
TRANSLATE_HEADER = "x-signalbox-translate"
# Which members of the request's chain a later member's larger context window follows (comma
# separated backend ids), set by the route to the chain for attempt.lua.
LARGER_AFTER_HEADER = "x-signalbox-larger-after"
# Set by the routes of a policy with a first-token deadline to the request's `stream` (read by
# Envoy's JSON reader into STREAM_KEY): the upstream filter that holds an answer's headers until
# its first body bytes runs only on such attempts of streamed requests ("true").
FIRST_TOKEN_HEADER = "x-signalbox-first-token"
STREAM_KEY = "stream"
# The stream relay (extproc.relay), for policies whose broken streams end with an error event or
# are continued elsewhere (`failover.onBrokenStream`). The router phase puts a signed copy of
# its decision in metadata (RELAY_KEY); a route matched on it sends the request to the relay
# (RELAY_CLUSTER, the ext_proc's admin port, paths under RELAY_PATH_PREFIX) with that copy in
# RELAY_HEADER and the listener's own address in RELAY_BACK_HEADER. The relay sends the request
# back to the listener with RELAY_HEADER, and the router phase, finding its own signature,
# puts the decision in force unchanged. attempt.lua removes both headers from every attempt to
# a provider; the relay's host is marked RELAY_BACKEND, which attempt.lua leaves alone.
RELAY_KEY = "relay"
RELAY_HEADER = "x-signalbox-relay"
RELAY_BACK_HEADER = "x-signalbox-relay-back"
RELAY_CLUSTER = "signalbox_relay"
RELAY_PATH_PREFIX = "/relay"
RELAY_BACKEND = "signalbox:relay"
GATEWAY_HEADERS = (PATH_HEADER, ATTEMPT_HEADER, TRANSLATE_HEADER, LARGER_AFTER_HEADER, FIRST_TOKEN_HEADER)
# The Messages API version the gateway speaks to Anthropic backends, unless the client set one.
ANTHROPIC_VERSION = "2023-06-01"
# Response header attempt.lua sets on an answer worth trying again on the next backend (a prompt
# too long for this backend's context window, when a later one has a larger window); the routes
# retry on it and never pass it to a client. ATTEMPT_NS: attempt.lua's notes between the request
# and the response of one attempt (dynamic metadata).
RETRY_HEADER = "x-signalbox-retry"
ATTEMPT_NS = "signalbox.attempt"
# What the router phase reads of a request besides its body, sent with the body as attributes
# (CEL expressions): these, and `request.headers['<name>']` for each header a policy matches
# on or hashes by (`router_attributes`). Envoy cannot send the whole header map.
# `xds.virtual_host_name` says which config's routes the request arrived under
# (`virtual_host_name`).
VIRTUAL_HOST_ATTRIBUTE = "xds.virtual_host_name"
ROUTER_ATTRIBUTES = ("request.path", "request.method", "request.id", "source.address", VIRTUAL_HOST_ATTRIBUTE)
VIRTUAL_HOST = "signalbox"


def routes_key(cfg: pb.RoutingConfig) -> str:
    """What the decided requests' routes depend on: each policy's id, whether Envoy routes it
    alone, and its backends' targets (a decided policy's chains that a larger context window
    follows have routes of their own; every other decision goes by the route of its policy's
    action, its cluster in metadata). Equal for two configs whose decisions all have the same
    routes (and, being made from every target, for some whose routes are the same anyway: the
    ext_proc then keeps the table before a change a little longer than it needs to)."""
    digest = hashlib.blake2b(digest_size=16)
    for policy in sorted(cfg.policies, key=lambda p: p.id):
        said = [policy.id, policy.compiled, [b.target for b in policy.backends]]
        digest.update(json.dumps(said).encode() + b"\n")
    return digest.hexdigest()


def virtual_host_name(key: str) -> str:
    """The main route table's virtual host, named after the `routes_key` of the config its
    routes were made from. Envoy keeps the routes a request arrived under for the whole request,
    and a change reaches the ext_proc before Envoy's routes: the router phase decides a request
    by a config with that key (`routes_key_of`), so that its decision has a route. A change
    that leaves the key leaves the routes file as it was (Envoy does not read it again)."""
    return f"{VIRTUAL_HOST}:{key}" if key else VIRTUAL_HOST


def routes_key_of(virtual_host: str) -> str:
    """The routes key `virtual_host_name` put in a virtual host's name ("" if none)."""
    return virtual_host.partition(":")[2]


HEADER_ATTRIBUTE = "request.headers['{}']"
# Consumers (schema 2): the headers a gateway API key may come in (OpenAI SDKs send
# Authorization: Bearer, Anthropic SDKs x-api-key, Azure clients api-key), sent to the router
# phase as attributes once a consumer exists, and where Envoy's jwt_authn leaves a verified
# token's payload (forwarded to the router phase as metadata).
KEY_HEADERS = ("authorization", "x-api-key", "api-key")
JWT_NAMESPACE = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD_KEY = "jwt_payload"
# Where the upstream-phase ext_proc reads which translation an attempt needs ("<client
# api>><backend api>"): dynamic metadata ATTEMPT_NS/TRANSLATE_KEY, forwarded with its messages
# (CEL attributes in an upstream filter read the client's headers, not the attempt's).
TRANSLATE_KEY = "translate"
# What follows "<client api>><backend api>" there when the backend refuses `stream_options`
# (its provider's streamUsage: false): the translation asks it for no usage.
NO_USAGE_ROUTE = ";no_usage"
# Why a bodyless request is refused, by kind of path (Envoy's routes answer the requests that
# never reach the ext_proc; the ext_proc gives the same answer to a headers-first stream).
EMPTY_BODY = {
    "route": "request body is empty; a JSON body with 'model' is required",
    "feedback": 'feedback needs a JSON body: {"decision": ..., "score": 0..1}',
}
METADATA_NS = "signalbox"
# A decided request's target as Envoy's priority group cluster specifier reads it: the router
# phase writes `target_groups(target)` under this namespace, and the decided routes (one per
# distinct route action, listener._decided_routes) send the request to that cluster. A route
# per policy and target instead was 22 MB of Envoy at the 2,000-policy fleet (issue 12).
TARGET_NS = "signalbox.target"
DECIDED_GROUP = "decided"


# A compiled policy's decision goes where Envoy would send the policy's requests: its split
# (`compiled_split`) travels under this key of METADATA_NS as `split_text` writes it, and the
# router phase writes its groups from it (through the stream relay too: the decision is sealed
# with it).
SPLIT_KEY = "split"


def compiled_split(policy: pb.Policy) -> list[tuple[str, int]]:
    """Where Envoy sends a compiled policy's requests, as (target, weight): the first chain by
    priority (failover, fastest: the chain skips what is unhealthy), else the chains that start
    with each backend (round-robin: equal weights; weighted: its weights, none at 0)."""
    live = [b for b in policy.backends if b.target]
    if policy.strategy in (pb.FAILOVER, pb.FASTEST):
        first = min(range(len(live)), key=lambda i: (live[i].priority, i))
        return [(live[first].target, 1)]
    weights = [(b.target, b.weight if policy.strategy == pb.WEIGHTED else 1) for b in live]
    return [(target, weight) for target, weight in weights if weight > 0]


def split_text(split: list[tuple[str, int]]) -> str:
    """A split as one metadata string ("target=weight,..."; targets are cluster names)."""
    return ",".join(f"{target}={weight}" for target, weight in split)


def target_groups(target: str, split: str = "") -> dict[str, Any]:
    """The priority groups of a request decided for `target`: that cluster for every attempt
    (its failover is the target's own, an aggregate cluster's when it is a chain); with a
    compiled policy's `split` (`split_text`), one of its targets by weight instead."""
    clusters = split_pairs(split) if split else [(target, 1)]
    return {
        "priority_groups": [
            {"name": DECIDED_GROUP, "clusters": [{"cluster_name": t, "weight": w} for t, w in clusters]}
        ]
    }


# Where an attempt goes while its backend rests or is ejected: every backend cluster the
# ext_proc sends Envoy has, besides its provider's hosts, one DEGRADED host at priority 1
# (`endpoints.BackendEndpoint.load_assignment`), this internal listener, which Envoy picks only
# when no healthy host is left and which refuses at once with RESTING_STATUS and RETRY_HEADER:
# a compiled chain walked by its route's priority groups (`chain_groups`) then moves to its next
# group, and the provider sees nothing. Not a 5xx (outlier detection would eject the host) and
# never taken for the provider's answer (the access log knows the listener: no rest, no metric
# of the provider's). Under an aggregate (a decided chain) a healthy later member is preferred
# to it, as to any degraded host.
RESTING_LISTENER = "signalbox_resting"
RESTING_STATUS = 429


def chain_groups(split: list[tuple[str, int]], members_of: Mapping[str, Sequence[str]]) -> list[dict[str, Any]] | None:
    """The priority groups that walk a compiled policy's `split` (`compiled_split`) attempt by
    attempt, without an aggregate cluster per chain: group i holds the i-th member (a backend
    cluster, `members_of`: chain -> its members' clusters in order) of every chain, weighted as
    its chain. The specifier draws once per request, so a request stays on the chain it drew.
    None when the chains differ in length or one is unknown: those keep their aggregate.

    Why: an aggregate cluster is about 24 KB of Envoy, and the 2,000-provider fleet's compiled
    routes held 3,432 of them (bench/README.md, `bench.chain_groups`; issue 12)."""
    chains = [members_of.get(target) or () for target, _ in split]
    lengths = {len(chain) for chain in chains}
    if len(lengths) != 1 or 0 in lengths:
        return None
    (length,) = lengths
    return [
        {
            "name": f"attempt{i + 1}",
            "clusters": [
                {"cluster_name": chain[i], "weight": weight} for chain, (_, weight) in zip(chains, split, strict=True)
            ],
        }
        for i in range(length)
    ]


def put_target_groups(into: struct_pb2.Struct, target: str, split: str = "") -> None:
    """`target_groups(target, split)` written into a Struct field by field: on every decided
    request, where `Struct.update` with the dict took 11 us and this takes about 4."""
    group = into.fields["priority_groups"].list_value.values.add().struct_value
    group.fields["name"].string_value = DECIDED_GROUP
    clusters = group.fields["clusters"].list_value.values
    for name, weight in split_pairs(split) if split else [(target, 1)]:
        cluster = clusters.add().struct_value
        cluster.fields["cluster_name"].string_value = name
        cluster.fields["weight"].number_value = weight


def split_pairs(split: str) -> list[tuple[str, int]]:
    """`split_text`'s pairs again."""
    pairs = (part.rpartition("=") for part in split.split(","))
    return [(target, int(weight)) for target, _, weight in pairs]


# Keys in METADATA_NS besides the decision's (target, policy, reason, decision, class, hold):
# the client's path (set by Envoy for every request), and the model the router phase wrote
# into the body, so an attempt to that backend leaves the body alone.
CLIENT_PATH_KEY = "path"
BODY_MODEL_KEY = "body_model"
# The body's `model`, read by Envoy (json_to_metadata) for the compiled routes to match on.
ALIAS_KEY = "alias"
# Access log custom tag: the policy of a compiled route (from route metadata).
COMPILED_POLICY_TAG = "compiled_policy"
EXTPROC_CLUSTER = "signalbox_extproc"
# The same workers, for Envoy's ADS stream (clusters and backend endpoints): one worker first.
XDS_CLUSTER = "signalbox_xds"
# The OpenTelemetry collector Envoy exports spans to (envoygen.tracing), when one is configured.
OTLP_CLUSTER = "signalbox_otlp"
# Envoy's outlier detection of backend clusters: the first ejection lasts this long, each
# further one of the same host this much longer, up to the maximum (Envoy's default). The
# ext_proc reads Envoy's outlier event log to report ejections (extproc/outliers.py).
OUTLIER_BASE_EJECTION_S = 15
OUTLIER_MAX_EJECTION_S = 300
# How often Envoy's outlier detection looks at a backend's host: each such interval the host
# spends back in service takes one off its count of ejections (what sets the next one's length).
OUTLIER_INTERVAL_S = 5
# Envoy's outlier event log in the gateway's work directory (written by Envoy).
OUTLIER_EVENTS_FILE = "outlier-events.log"
# HTTP 510 (Not Extended): the status Envoy's ext_proc filter answers when the processor
# cannot be reached or fails; mapped to 503 routing_unavailable before any client sees it.
EXTPROC_FAILED_STATUS = 510
ADMIN_CLUSTER = "signalbox_envoy_admin"
EXTPROC_ADMIN_CLUSTER = "signalbox_extproc_admin"
LISTENER_NAME = "signalbox_gateway"
HEALTH_LISTENER_NAME = "signalbox_health"
EMBEDDINGS_PATH = "/v1/embeddings"
CHAT_PATH = "/v1/chat/completions"
# Anthropic's Messages API and OpenAI's Responses API: their clients get answers, errors and
# streams in their own shapes.
MESSAGES_PATH = "/v1/messages"
RESPONSES_PATH = "/v1/responses"
# Anthropic's token counting: answered by Anthropic backends only (nothing to translate it to).
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
# Paths whose POST bodies are routed by a policy, and the gateway's own endpoints.
ROUTED_PATHS = (CHAT_PATH, "/v1/completions", EMBEDDINGS_PATH, MESSAGES_PATH, COUNT_TOKENS_PATH, RESPONSES_PATH)
MODELS_PATH = "/v1/models"
FEEDBACK_PATH = "/v1/feedback"
API_PATHS = (*ROUTED_PATHS, MODELS_PATH)


# What the gateway answers, as an unknown path's error lists it (Envoy's and the ext_proc's).
SUPPORTED_PATHS = ", ".join((*API_PATHS, MODELS_PATH + "/<id>", FEEDBACK_PATH))


_CLIENT_APIS = {MESSAGES_PATH: ANTHROPIC_API, COUNT_TOKENS_PATH: ANTHROPIC_API, RESPONSES_PATH: RESPONSES_API}


def api_of_path(path: str) -> str:
    """The API a client speaks, from the path it called ("anthropic", "responses" or "openai").
    Below `/v1/messages/` is Anthropic's own (its SDK's message batches): refused there, in its
    shape."""
    bare = path.split("?", 1)[0].rstrip("/")
    api = _CLIENT_APIS.get(bare)
    if api is None and bare.startswith(MESSAGES_PATH + "/"):
        return ANTHROPIC_API
    return api or OPENAI_API


# `GET /v1/models/<id>`: one alias, in the caller's API (envoygen.modelsapi).
MODEL_PATH_PREFIX = MODELS_PATH + "/"
# Where Azure OpenAI's paths start: `/openai/deployments/<name>/...`, and its v1 API, whose
# `/openai/v1/...` are OpenAI's `/v1/...` (envoygen.clientpaths).
AZURE_PREFIX = "/openai"


def openai_model(alias: str) -> dict[str, Any]:
    """An alias as OpenAI's model object (listing and retrieve)."""
    return {"id": alias, "object": "model", "created": 0, "owned_by": "signalbox"}


def anthropic_model(alias: str) -> dict[str, Any]:
    """An alias as Anthropic's model object (`ModelInfo`): its release date is unknown, which
    Anthropic's API reference says is given as the epoch."""
    return {
        "type": "model",
        "id": alias,
        "display_name": alias,
        "created_at": "1970-01-01T00:00:00Z",
        "lifecycle": "active",
    }


def models_listing(aliases: list[str]) -> bytes:
    """What `GET /v1/models` on the gateway answers an OpenAI client: the aliases it may send."""
    data = [openai_model(a) for a in aliases]
    return json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()


def too_large_message(limit: int) -> str:
    return f"request body exceeds the gateway's limit of {limit} bytes"


# Cluster names: backends ("b.<ns>.<provider>.<model>") and targets, the aggregate clusters of
# failover chains ("t.<first member>.<length>.<digest>", compiler.target_name; Envoy keeps no
# stats for these).
BACKEND_PREFIX, TARGET_PREFIX = "b", "t"

# ---------------------------------------------------------------- backends cooling down
# Attempts worth telling the ext_proc about (a second access log, the router's upstream log,
# under this name): a 429, 401/403, a 503 with Retry-After, or an answer whose rate-limit
# headers say the backend is about to run out. The ext_proc puts the backend in cooldown
# (extproc.cooldown), and its ADS server marks the backend's endpoint unhealthy (extproc.xds),
# so a cooling backend is out of every chain, compiled or decided.
ATTEMPT_LOG_NAME = "signalbox-attempts"
# Provider headers read from those attempts (Envoy logs only the headers it is told to).
RETRY_AFTER_HEADERS = ("retry-after", "retry-after-ms")
# remaining header -> its reset header, requests first, then tokens (OpenAI, then Anthropic).
REMAINING_HEADERS = {
    "x-ratelimit-remaining-requests": "x-ratelimit-reset-requests",
    "anthropic-ratelimit-requests-remaining": "anthropic-ratelimit-requests-reset",
    "x-ratelimit-remaining-tokens": "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-tokens-remaining": "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-remaining": "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-remaining": "anthropic-ratelimit-output-tokens-reset",
}
# "About to run out": at most this many requests, or tokens, left in the provider's window. New
# requests go elsewhere until the window resets rather than spend the last of it and meet a 429.
LOW_REMAINING_REQUESTS = 1
LOW_REMAINING_TOKENS = 1000
