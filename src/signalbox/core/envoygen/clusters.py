"""Clusters: one per backend, one aggregate per distinct target (a failover chain), and the upstream
filters every attempt runs: the picked backend's key and its path, authority and body model,
all by Envoy (no Python on an attempt whose backend speaks the client's API; the others are
translated by the upstream-phase ext_proc)."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources as package_files
from typing import Any
from urllib.parse import quote

import orjson

from signalbox.api.v1alpha1 import config_pb2 as pb

from .. import errors
from ..schema import genai_provider_name, idle_timeout_ms, provider_api
from . import kept
from .auth import jwks_clusters
from .contract import (
    ANTHROPIC_VERSION,
    ATTEMPT_HEADER,
    ATTEMPT_NS,
    BODY_MODEL_KEY,
    CLIENT_PATH_KEY,
    FIRST_TOKEN_HEADER,
    GATEWAY_HEADERS,
    GENAI_PROVIDER_KEY,
    KEY_HEADERS,
    LARGER_AFTER_HEADER,
    METADATA_NS,
    MODEL_HEADER,
    NO_USAGE_ROUTE,
    OUTLIER_BASE_EJECTION_S,
    OUTLIER_INTERVAL_S,
    OUTLIER_MAX_EJECTION_S,
    PROVIDER_HEADER,
    RELAY_BACK_HEADER,
    RELAY_BACKEND,
    RELAY_CLUSTER,
    RELAY_HEADER,
    RETRY_HEADER,
    TRANSLATE_HEADER,
    TRANSLATE_KEY,
    compiled_split,
)
from .endpoints import (
    DEFAULT_CONNECT_TIMEOUT_MS,
    ORIGIN,
    PLAIN,
    RESTING_MATCH,
    BackendEndpoint,
    resource_name,
    shared_origins,
)
from .options import (
    STREAM_LIMITS,
    SYSTEM_CA_FILE,
    GatewayOptions,
    _address,
    _any,
    _ms,
    extproc_grpc_service,
    upstream_tls,
)
from .origins import origin_clusters
from .tracing import otlp_cluster


def _compact(lua: str) -> str:
    """The script without its comment lines and indentation: it is repeated once per aggregate
    cluster in the generated config, which the commented source would make much larger."""
    lines = (line.strip() for line in lua.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("--")) + "\n"


_ATTEMPT_LUA = _compact(package_files.files("signalbox.core").joinpath("attempt.lua").read_text())


def _http1_options(idle_timeout_ms: int | None = None) -> dict[str, Any]:
    """A cluster's HTTP/1 protocol options; `idle_timeout_ms`: its connections closed after that
    long without a request (a backend's: its provider's, `schema.idle_timeout_ms`; about 0.6 KB
    of Envoy per cluster), else Envoy's default (an hour)."""
    # No upstream filters: the router's (`upstream_filters`) run for every cluster it routes to.
    opts: dict[str, Any] = {"explicit_http_config": {"http_protocol_options": {}}}
    if idle_timeout_ms is not None:
        opts["common_http_protocol_options"] = {"idle_timeout": _ms(idle_timeout_ms)}
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", **opts
        )
    }


def _backend_cluster(
    backend: pb.Backend,
    provider: pb.Provider,
    ads: bool = False,
    ca_file: str = SYSTEM_CA_FILE,
    via_origin: bool = False,
) -> dict[str, Any]:
    """One backend's cluster. `ads`: an EDS cluster naming its endpoint's resource, which the
    ext_proc writes into it on its way to Envoy over ADS (`extproc.xds`: resolved there, and
    unhealthy while the backend rests, so that it leaves every chain and compiled route at
    once); else inline, Envoy resolving the host name. `via_origin`: it reaches its endpoint's
    origin, plain (`origins`: one TLS context for the many backends of one endpoint), and names
    its origin's resource; else a TLS
    provider's backend speaks TLS itself. Its idle connections close after its provider's idle
    timeout (an origin's connection closes with the backend's that it carries)."""
    endpoint = BackendEndpoint.of(backend, provider)
    cluster: dict[str, Any] = {
        "name": backend.cluster,
        "connect_timeout": _ms(provider.connect_timeout_ms or DEFAULT_CONNECT_TIMEOUT_MS),
        "circuit_breakers": {"thresholds": [STREAM_LIMITS]},
        "typed_extension_protocol_options": _http1_options(idle_timeout_ms(provider)),
        "outlier_detection": {
            "consecutive_5xx": 5,
            "interval": f"{OUTLIER_INTERVAL_S}s",
            "base_ejection_time": f"{OUTLIER_BASE_EJECTION_S}s",
            "max_ejection_time": f"{OUTLIER_MAX_EJECTION_S}s",
            "max_ejection_percent": 100,
        },
    }
    reach = ORIGIN if via_origin else endpoint.reach
    if ads:
        cluster["type"] = "EDS"
        cluster["eds_cluster_config"] = {"eds_config": {"ads": {}, "resource_api_version": "V3"}}
        if reach != PLAIN:
            # A resource of its own per way of reaching the backend (endpoints.resource_name):
            # a cluster is never given an address meant for another transport, not even while
            # the worker writing it in has loaded another config than this one (extproc.xds).
            cluster["eds_cluster_config"]["service_name"] = resource_name(backend.cluster, reach)
    elif via_origin:
        cluster["type"] = "STATIC"  # the origin's cluster resolves the name
        cluster["load_assignment"] = endpoint.load_assignment(reach=ORIGIN)
    else:
        cluster["type"] = "STRICT_DNS"
        cluster["dns_lookup_family"] = "V4_PREFERRED"
        cluster["load_assignment"] = endpoint.load_assignment()
    if provider.tls and not via_origin:
        cluster["transport_socket"] = upstream_tls(provider.host, ca_file)
        if ads:
            # Its resting listener's host (endpoints, `refusing`) is Envoy's own: plain text.
            cluster["transport_socket_matches"] = [
                {
                    "name": "resting",
                    "match": RESTING_MATCH,
                    "transport_socket": {
                        "name": "envoy.transport_sockets.raw_buffer",
                        "typed_config": _any("envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"),
                    },
                }
            ]
    return cluster


def _skipped(name: str, filter_config: dict[str, Any], predicate: dict[str, Any]) -> dict[str, Any]:
    """An upstream filter wrapped so that it is skipped when the matcher `predicate` holds."""
    skip = {
        "predicate": predicate,
        "on_match": {
            "action": {
                "name": "skip",
                "typed_config": _any("envoy.extensions.filters.common.matcher.action.v3.SkipFilter"),
            }
        },
    }
    return {
        "name": name,
        "typed_config": _any(
            "envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            extension_config=filter_config,
            xds_matcher={"matcher_list": {"matchers": [skip]}},
        ),
    }


def credential_name(provider_id: str) -> str:
    """The file name of a provider's key header value."""
    return "key." + re.sub(r"[^A-Za-z0-9_.-]", "_", provider_id)


def credential_file(credentials_dir: str, provider_id: str) -> str:
    """Where a provider's whole key header value (prefix and key) is, for attempt.lua."""
    return f"{credentials_dir}/{credential_name(provider_id)}"


def lua_literal(value: str | bool | int | dict[str, Any]) -> str:
    """A Lua string (printable ASCII as is, `"`, `\\` and every other byte as a decimal
    escape), boolean, integer or table literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua_literal(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    if _LUA_PLAIN.fullmatch(value):
        return f'"{value}"'  # nothing to escape: most names and paths
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\{b:03d}" for b in value.encode()) + '"'


_LUA_PLAIN = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII but for `"` and `\`


def lua_error(err: errors.RequestError) -> dict[str, Any]:
    """An error as the Lua scripts answer it: its status, code, and body in each client API."""
    return {
        "status": str(err.status),
        "code": err.code,
        "body": err.body().decode(),
        "anthropic": err.body_for(errors.ANTHROPIC_API).decode(),
    }


# What an attempt can be refused with, in the client's API shape (one error tree: core.errors).
ATTEMPT_ERRORS = {
    "not_object": lua_error(errors.MalformedRequest("request body is not a JSON object")),
    "escaped_name": lua_error(errors.MalformedRequest("member names with escape sequences are not supported")),
    "no_model": lua_error(errors.MalformedRequest("request body has no 'model'")),
    "no_backend": lua_error(errors.RoutingUnavailable(errors.CONFIG_CHANGING)),
    "only_own_api": lua_error(
        errors.UnsupportedFeature("token counting exists in Anthropic's API only, and this backend speaks another")
    ),
    "other_api": lua_error(
        errors.UnsupportedFeature("this endpoint exists in OpenAI's API only, and this backend speaks Anthropic's")
    ),
    "not_api": lua_error(
        errors.UpstreamNotApi(
            "a backend answered with a web page (text/html), not its API: its base URL is wrong, or a proxy or"
            " login page stands in front of it"
        )
    ),
    "redirect": lua_error(
        errors.UpstreamNotApi(
            "a backend answered with a redirect (3xx), not its API: its base URL is wrong (http:// for an"
            " https:// API, or a moved path) or a login stands in front of it; the gateway never passes a"
            " redirect on"
        )
    ),
    "key_unavailable": lua_error(
        errors.ProviderKeyUnavailable("a backend cannot be tried: its provider's API key cannot be read by the gateway")
    ),
}


def attempt_settings(backend: pb.Backend, provider: pb.Provider, credentials_dir: str = "") -> dict[str, Any]:
    """What attempt.lua needs to know of one backend (its entry, `backend_of`)."""
    # An AWS credentials file is no header: Envoy's signer uses it (`_signers`).
    keyed = provider.HasField("auth") and provider.auth.format != pb.AWS_CREDENTIALS
    default_port = 443 if provider.tls else 80
    path, query = provider.base_path, ""
    if provider.type == pb.AZURE_OPENAI:
        # Azure's paths name the deployment and need an api-version.
        path = f"{provider.base_path}/openai/deployments/{backend.upstream_model}"
        query = f"api-version={provider.azure_api_version}"
    out = {
        "id": backend.id,
        "model": backend.upstream_model,
        "model_json": json.dumps(backend.upstream_model),
        "path": path,
        "query": query,
        "authority": provider.host if provider.port == default_port else f"{provider.host}:{provider.port}",
        "key_header": (provider.auth.header or "authorization").lower() if keyed else "",
        # "" for a keyed provider when keys are not added (unit tests of the generator only):
        # its attempts are refused as without a key.
        "key_file": credential_file(credentials_dir, provider.id) if keyed and credentials_dir else "",
        "sanitize": provider.sanitize_streams,
        "api": provider_api(provider.type),
        # Who answered, for the answer's headers and spans (envoy_on_response): the provider's
        # name and kind (and, below, the backend's model as the config names it).
        "provider": provider.name,
        "genai": genai_provider_name(provider.type),
        # Serves the Responses API itself: a Responses client's attempt is passed through.
        "responses": provider.responses_api and provider_api(provider.type) == errors.OPENAI_API,
    }
    api_path = _model_path(provider.type, backend.upstream_model)
    if api_path:
        out["api_path"] = api_path
    if provider.no_stream_usage:
        out["no_usage"] = True  # refuses stream_options: none is sent (attempt.lua's rewrite_body)
    out["name"] = backend.model
    if backend.id == f"{provider.id}/{backend.model}":
        # Where the backend's model name starts in its id (compiler: "<provider>/<model>"), a
        # byte position as Lua counts: a backend whose other settings follow from it is one
        # number in attempt.lua's table.
        out["model_at"] = len(provider.id.encode()) + 2
    return out


def _model_path(provider_type: int, model: str) -> str:
    """The path below the base URL of APIs that name the model in the path ("" for the others,
    whose path is the API's own): Gemini's method, Bedrock's Converse operation (its model IDs
    hold `:` and, for ARNs, `/`: percent-encoded, as the AWS SDKs send them)."""
    if provider_type == pb.GEMINI:
        return f"/models/{model}:generateContent"
    if provider_type == pb.BEDROCK:
        return f"/model/{quote(model, safe='')}/converse"
    return ""


@functools.cache
def _attempt_prelude(names: tuple[tuple[str, str], ...]) -> str:
    return "".join(f"{name} = {lua_literal(value)}\n" for name, value in names)


# The error bodies and the shared code: the same in every chain's script, built once.
_ATTEMPT_CODE = (
    "ERRORS = {" + ", ".join(f"{k} = {lua_literal(v)}" for k, v in ATTEMPT_ERRORS.items()) + "}\n" + _ATTEMPT_LUA
)


def attempt_source(settings: dict[str, dict[str, Any]], traced: bool = False) -> str:
    """attempt.lua for the config: each backend's settings (backend id -> attempt_settings),
    the error bodies, then the code. `traced`: spans are exported, and each answer notes its
    provider's kind for them (a metadata write per answer, made only when something reads it)."""
    # The contract's names, spelled once (envoygen.contract).
    names = {
        "ATTEMPT_HEADER": ATTEMPT_HEADER,
        "LARGER_AFTER_HEADER": LARGER_AFTER_HEADER,
        "NS": METADATA_NS,
        "CLIENT_PATH_KEY": CLIENT_PATH_KEY,
        "BODY_MODEL_KEY": BODY_MODEL_KEY,
        "RETRY_HEADER": RETRY_HEADER,
        "ATTEMPT_NS": ATTEMPT_NS,
        "TRANSLATE_HEADER": TRANSLATE_HEADER,
        "TRANSLATE_KEY": TRANSLATE_KEY,
        "NO_USAGE_ROUTE": NO_USAGE_ROUTE,
        "ANTHROPIC_VERSION": ANTHROPIC_VERSION,
        "RELAY_BACKEND": RELAY_BACKEND,
        "RELAY_HEADER": RELAY_HEADER,
        "RELAY_BACK_HEADER": RELAY_BACK_HEADER,
        "PROVIDER_HEADER": PROVIDER_HEADER,
        "MODEL_HEADER": MODEL_HEADER,
        "GENAI_PROVIDER_KEY": GENAI_PROVIDER_KEY,
    }
    mixed = len({member["api"] for member in settings.values()}) > 1
    return (
        f"{_attempt_prelude(tuple(names.items()))}{_backends_table(settings)}"
        f"MIXED = {lua_literal(mixed)}\nTRACED = {lua_literal(traced)}\n{_ATTEMPT_CODE}"
    )


# The settings each backend has of its own in attempt.lua's table; every other one (path,
# authority, key, API...) its provider's backends share.
_OWN_SETTINGS = ("id", "model", "model_json", "api_path", "name")


def _follows_from_id(backend_id: str, setting: dict[str, Any]) -> bool:
    """Whether attempt.lua can make the backend's own settings from its id and its provider's
    (`backend_of`): its name is the id's end, the provider calls the model by that name, the
    name needs no escaping in JSON and no API path names it."""
    at, raw = setting.get("model_at"), backend_id.encode()
    if not isinstance(at, int) or at < 2 or raw[at - 2 : at - 1] != b"/":
        return False
    name = raw[at - 1 :].decode(errors="replace")
    return (
        setting.get("name") == name
        and setting.get("model") == name
        and setting.get("model_json") == f'"{name}"' == json.dumps(name)
        and "api_path" not in setting
    )


def _backends_table(settings: dict[str, dict[str, Any]]) -> str:
    """attempt.lua's backends as Lua: SETTINGS, the settings the backends of one provider share,
    and OWN, each backend's id -> the index of its provider's settings (a backend whose own
    settings follow from its id: `_follows_from_id`) or a table of its own settings and that
    index. attempt.lua's `backend_of` makes a backend's whole entry (its own settings, the
    rest read from its provider's through the metatable) on its first attempt in a thread.

    Every Envoy thread's Lua state holds the table (three at two workers). A table of every
    backend's entry, made when the script loaded, was 8.9 MB of each state at the
    2,000-provider fleet's 10,000 backends (4.7 MB live once collected; 25 MB of Envoy,
    measured by doubling it); numbers, 3.9 MB (2.2 MB live), and Envoy 350 -> 332 MB
    (issue 12, bench/README.md)."""
    shared: dict[str, int] = {}  # the shared part's Lua literal -> its index in SETTINGS
    # The shared part's literal by its JSON: a provider's backends share it, and writing it
    # again for each of the fleet's 10,000 was 0.2 s of the start's generation, on its
    # critical path (issue 12). Equal JSON (orjson keeps key order) is an equal literal.
    literal_of: dict[bytes, str] = {}
    rows = []
    for backend_id, setting in settings.items():
        rest_settings = {k: v for k, v in setting.items() if k not in _OWN_SETTINGS}
        said = orjson.dumps(rest_settings)
        rest = literal_of.get(said)
        if rest is None:
            rest = literal_of[said] = lua_literal(rest_settings)
        index = shared.setdefault(rest, len(shared) + 1)
        if _follows_from_id(backend_id, setting):
            rows.append(f"[{lua_literal(backend_id)}] = {index}")
            continue
        own = [str(index), *(lua_literal(setting[k]) if k in setting else "nil" for k in _OWN_SETTINGS[1:])]
        rows.append(f"[{lua_literal(backend_id)}] = {{{', '.join(own)}}}")
    return f"SETTINGS = {{{', '.join(shared)}}}\nOWN = {{{', '.join(rows)}}}\n"


@functools.cache
def attempt_marker() -> dict[str, Any]:
    """Names the picked backend in ATTEMPT_HEADER, from the picked host's name (the backend's
    id, `%UPSTREAM_HOST_NAME%`), for attempt.lua. One filter for any chain: it replaced a filter
    per chain member, each skipped by a CEL matcher unless the attempt went to it (a CEL
    evaluation per member per attempt). Any copy a client sent is removed first, so a host
    without a name leaves it its address (no backend's id), never the client's."""
    return {
        "name": "signalbox.attempt_marker",
        "typed_config": _any(
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            mutations={
                "request_mutations": [
                    {"remove": ATTEMPT_HEADER},
                    {
                        "append": {
                            "header": {"key": ATTEMPT_HEADER, "value": "%UPSTREAM_HOST_NAME%"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        }
                    },
                ]
            },
        ),
    }


def _attempt_script(
    cfg: pb.RoutingConfig, providers: dict[str, pb.Provider], credentials_dir: str, traced: bool
) -> str:
    settings = {b.id: attempt_settings(b, providers[b.provider_id], credentials_dir) for b in cfg.backends}
    return attempt_source(settings, traced)


def _attempt_filter(
    cfg: pb.RoutingConfig, providers: dict[str, pb.Provider], credentials_dir: str, traced: bool
) -> dict[str, Any]:
    """attempt.lua with every backend's settings, kept while the backends, their providers and
    these options are the same (`kept`): a policy change leaves them as they were, and writing
    10,000 settings as Lua was 0.2 s of every change at the 2,000-provider fleet (issue 12)."""
    make = functools.partial(_attempt_script, cfg, providers, credentials_dir, traced)
    source = kept.kept(cfg, "attempt_source", make, credentials_dir, "traced" if traced else "")
    return {
        "name": "signalbox.attempt",
        "typed_config": _any("envoy.extensions.filters.http.lua.v3.Lua", default_source_code={"inline_string": source}),
    }


@dataclass(frozen=True, slots=True)
class Chain:
    """What Envoy's resources need of a target (failover chain): its members' clusters in order,
    and which members a later member's larger context window follows (`larger_after`; "" when
    none)."""

    clusters: tuple[str, ...]
    larger: str


def _chain(members: Sequence[pb.Backend]) -> Chain:
    # Each read of a message's string field is a new str: interned, a backend's cluster name is
    # one object in every chain that holds it (the 2,000 fleet's chains: 5.7 -> 3.0 MB, kept in
    # the process that generates, in a cluster the ext_proc sidecar's).
    largest_after = 0
    marked: list[str] = []
    for b in reversed(members):
        if largest_after > b.context_window:
            marked.append(b.id)
        largest_after = max(largest_after, b.context_window)
    return Chain(tuple(sys.intern(b.cluster) for b in members), ",".join(reversed(marked)))


def chains_of(cfg: pb.RoutingConfig) -> dict[str, Chain]:
    """Each target a policy names, worked out once per generation and shared by the clusters
    and the routes. A target's name is a digest of its member clusters in order
    (compiler.target_name), so with the same providers and backends a target the last
    generation had is the same chain (`kept.last`): a policy's change works out only its own
    new chains (at the 2,000-provider fleet, all 7,712 chains' members and context windows took
    0.1-0.15 s of every change)."""
    from ..compiler import chains

    known: dict[str, Chain] = kept.last(cfg, "chains") or {}
    out: dict[str, Chain] = {}
    for policy in cfg.policies:
        new = []
        for i, b in enumerate(policy.backends):
            if not b.target or b.target in out:
                continue
            chain = known.get(b.target)
            if chain is not None:
                out[b.target] = chain
            else:
                new.append(i)
        if new:
            for i, members in zip(new, chains(cfg, policy, new), strict=True):
                out.setdefault(policy.backends[i].target, _chain(members))
    kept.remember(cfg, "chains", out)
    return out


def chain_members(cfg: pb.RoutingConfig) -> dict[str, list[pb.Backend]]:
    """Each target a policy names, with its members' backends in order."""
    by_cluster = {b.cluster: b for b in cfg.backends}
    return {target: [by_cluster[c] for c in chain.clusters] for target, chain in chains_of(cfg).items()}


def larger_after(cfg: pb.RoutingConfig, chains: Mapping[str, Chain] | None = None) -> dict[str, str]:
    """Per target (chain): the members a later member's larger context window follows, comma
    separated, for chains that have any (a too-long prompt's refusal from one of them is
    retried on the next). The routes to a target send it in LARGER_AFTER_HEADER: attempt.lua is
    one script for every chain and learns the chain from the request. `chains`: `chains_of`."""
    return {t: chain.larger for t, chain in (chains_of(cfg) if chains is None else chains).items() if chain.larger}


# Where clients of either API put a key: never passed on, whatever the providers use.
CLIENT_KEY_HEADERS = (*KEY_HEADERS, "x-goog-api-key")


def _attempt_headers(cfg: pb.RoutingConfig) -> dict[str, Any]:
    """Every key header removed (the client's included), and the answer asked for unencoded.

    Why the encoding: the official SDKs send `Accept-Encoding: gzip, deflate` (httpx, aiohttp),
    and OpenAI's and Anthropic's APIs answer such requests gzipped. Envoy passes the bytes as
    they come, so every filter that reads an answer (usage and cost accounting, the request
    log, translation between APIs, attempt.lua's checks) would read compressed bytes: no
    tokens counted, budgets never charged, translated answers unreadable. LLM answers are
    small next to their latency, so the gateway asks for identity rather than decompressing.
    """
    key_headers = sorted({*CLIENT_KEY_HEADERS, *(p.auth.header.lower() for p in cfg.providers if p.auth.header)})
    identity = {
        "header": {"key": "accept-encoding", "value": "identity"},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }
    return {
        "name": "signalbox.attempt_headers",
        "typed_config": _any(
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            mutations={"request_mutations": [*({"remove": h} for h in key_headers), {"append": identity}]},
        ),
    }


def upstream_filters(cfg: pb.RoutingConfig, opts: GatewayOptions) -> list[dict[str, Any]]:
    """The upstream filters of every attempt, on the router (`upstream_http_filters`) and so
    shared by every aggregate cluster: every key header removed (the client's included), the
    picked backend named from the host's name, then its provider's key, path, authority
    and body model (attempt.lua: one script, one Lua state per Envoy thread, for the whole
    config; it reads each key from the provider's file in `credentials_dir`).

    Per aggregate, these filters cost Envoy a LuaJIT state per chain per thread: 585 of 801 MB
    at the 200-provider fleet (bench/README.md).

    Made from the providers, the backends, the longest time-to-first-token deadline and the
    options it reads: kept while those are the same (`kept`)."""
    longest = max((p.first_token_timeout_ms for p in cfg.policies), default=0)
    inputs = orjson.dumps(
        [opts.credentials_dir, bool(opts.otlp_endpoint), opts.translation, opts.extproc_message_timeout_ms, longest]
    )
    return list(kept.kept(cfg, "upstream_filters", functools.partial(_upstream_filters, cfg, opts), inputs))


def _upstream_filters(cfg: pb.RoutingConfig, opts: GatewayOptions) -> list[dict[str, Any]]:
    providers = {p.id: p for p in cfg.providers}
    return [
        _attempt_headers(cfg),
        attempt_marker(),
        _attempt_filter(cfg, providers, opts.credentials_dir, bool(opts.otlp_endpoint)),
        *([_translator(opts.extproc_message_timeout_ms)] if opts.translation else []),
        # After the translation: the signature covers the body and path that are sent.
        *_signers(cfg, opts.credentials_dir),
        # Nearest the codec: it holds the provider's own headers until its own first bytes.
        *_first_token_holder(cfg),
        _last_upstream_filter(),
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": _any("envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"),
        },
    ]


def _only_when_translating(name: str, filter_config: dict[str, Any]) -> dict[str, Any]:
    """Wrap an upstream filter so it is skipped on attempts without TRANSLATE_HEADER."""
    return _skipped(name, filter_config, {"not_matcher": _header_matches(TRANSLATE_HEADER, ".+")})


def _header_matches(header: str, regex: str) -> dict[str, Any]:
    """A matcher predicate: the request header's value matches `regex` (RE2)."""
    return {
        "single_predicate": {
            "input": {
                "name": "request-header",
                "typed_config": _any("envoy.type.matcher.v3.HttpRequestHeaderMatchInput", header_name=header),
            },
            "value_match": {"safe_regex": {"google_re2": {}, "regex": regex}},
        }
    }


@functools.lru_cache(maxsize=16)
def _translator(timeout_ms: int) -> dict[str, Any]:
    """The upstream-phase ext_proc: runs only on attempts attempt.lua marked with
    TRANSLATE_HEADER (the backend speaks another API than the client) and is skipped on all
    others, so an attempt whose APIs match costs one header lookup and no Python. Shared (never
    mutated) by every chain."""
    processor = _any(
        "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        grpc_service=extproc_grpc_service(timeout_ms),
        # A failed translation is this attempt's error: never a request sent untranslated.
        failure_mode_allow=False,
        message_timeout=_ms(timeout_ms),
        # The request's headers (only held: in an upstream filter a body replaced without them
        # is not the body sent, measured), its body, then the answer chunk by chunk without its
        # headers (a stream translated as it comes, anything else held and translated whole at
        # its end; attempt.lua fixes the answer's headers).
        processing_mode={
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED",
            "response_header_mode": "SKIP",
            "response_body_mode": "STREAMED",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        metadata_options={"forwarding_namespaces": {"untyped": [ATTEMPT_NS]}},
        # attempt.lua added the key before this filter: of the attempt's headers the ext_proc
        # gets only the path (Gemini's changes for a stream), so no provider key reaches Python.
        forward_rules={"allowed_headers": {"patterns": [{"exact": ":path"}]}},
        mutation_rules={"allow_all_routing": True},
    )
    return _only_when_translating(
        "signalbox.translate", {"name": "envoy.filters.http.ext_proc", "typed_config": processor}
    )


# What a Bedrock request's signature covers besides what SigV4 always signs (host, x-amz-date,
# x-amz-content-sha256, x-amz-security-token): not the gateway's own headers, which are removed
# after signing, nor Envoy's, which a retry changes.
_SIGNED_HEADERS = [{"exact": "content-type"}, {"prefix": "x-amz-"}]


def _signers(cfg: pb.RoutingConfig, credentials_dir: str) -> list[dict[str, Any]]:
    """Envoy's AWS SigV4 signer, one per Bedrock provider (its region and credentials), each
    skipped unless the attempt's backend (ATTEMPT_HEADER, from the host's name: never the
    client's) is one of that provider's. Credentials: the provider's AWS credentials file,
    written by the publisher like a key; without `auth`, Envoy's default AWS chain (environment,
    web identity for IRSA, container and instance roles). No key reaches Python or the config."""
    out: list[dict[str, Any]] = []
    backends: dict[str, list[str]] = {}
    for backend in cfg.backends:
        backends.setdefault(backend.provider_id, []).append(backend.id)
    for provider in cfg.providers:
        if provider.type != pb.BEDROCK or provider.id not in backends:
            continue
        signing: dict[str, Any] = {
            "service_name": "bedrock",
            "region": provider.aws_region,
            "use_unsigned_payload": False,
            "match_included_headers": _SIGNED_HEADERS,
        }
        if provider.HasField("auth") and credentials_dir:
            signing["credential_provider"] = {
                "custom_credential_provider_chain": True,
                "credentials_file_provider": {
                    "credentials_data_source": {"filename": credential_file(credentials_dir, provider.id)},
                    "profile": "default",
                },
            }
        ids = "|".join(re.escape(i) for i in backends[provider.id])
        ours = _header_matches(ATTEMPT_HEADER, f"^(?:{ids})$")
        config = {
            "name": "envoy.filters.http.aws_request_signing",
            "typed_config": _any("envoy.extensions.filters.http.aws_request_signing.v3.AwsRequestSigning", **signing),
        }
        out.append(_skipped(f"signalbox.sign.{provider.id}", config, {"not_matcher": ours}))
    return out


def _first_token_holder(cfg: pb.RoutingConfig) -> list[dict[str, Any]]:
    """The time-to-first-token deadline, for policies that set one (FIRST_TOKEN_HEADER on their
    routes; skipped on every other attempt). Envoy's per-attempt timer (`per_try_timeout`) stops
    when the router sees the answer's headers, and a provider that sends its headers at once and
    its first token late would be past any failover by then. So this ext_proc holds the answer's
    headers until the first body bytes have come (Envoy sends body chunks without waiting for the
    headers' answer), answers both and closes its stream: the rest of the answer flows in Envoy
    alone. The router's timer then runs until the first token, and a late backend is abandoned
    for the next one before the client has seen anything. Two gRPC messages per attempt.

    Fails open: without the ext_proc the headers pass at once (no deadline, no failed request).
    Its message timeout is past every such deadline, which ends the attempt first."""
    longest = max((p.first_token_timeout_ms for p in cfg.policies), default=0)
    if not longest:
        return []
    processor = _any(
        "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        grpc_service=extproc_grpc_service(longest + 5000),
        failure_mode_allow=True,
        message_timeout=_ms(longest + 5000),
        send_body_without_waiting_for_header_response=True,
        processing_mode={
            "request_header_mode": "SKIP",
            "request_body_mode": "NONE",
            "response_header_mode": "SEND",
            "response_body_mode": "STREAMED",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        # Nothing of the answer is read: only when its first bytes come.
        forward_rules={"allowed_headers": {"patterns": [{"exact": ":status"}]}},
    )
    config = {"name": "envoy.filters.http.ext_proc", "typed_config": processor}
    return [_skipped("signalbox.first_token", config, {"not_matcher": _header_matches(FIRST_TOKEN_HEADER, "^true$")})]


def _last_upstream_filter() -> dict[str, Any]:
    """Nearest the codec: the gateway's headers leave the request, and the answer comes back
    naming the backend that gave it (ATTEMPT_HEADER, the host's name) for attempt.lua's
    response hook, which sets the provider and model headers from it and removes it; a
    provider's own copy is replaced first."""
    return _remove_gateway_headers("signalbox.strip_gateway_headers_upstream", response=True)


def _remove_gateway_headers(name: str, response: bool = False) -> dict[str, Any]:
    """The gateway's own request headers removed (a client's copies, or the attempt's before it
    leaves); `response`: the attempt's answer named by its backend (`_last_upstream_filter`)."""
    mutations: dict[str, Any] = {"request_mutations": [{"remove": h} for h in GATEWAY_HEADERS]}
    if response:
        mutations["response_mutations"] = [
            {
                "append": {
                    "header": {"key": ATTEMPT_HEADER, "value": "%UPSTREAM_HOST_NAME%"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            }
        ]
    return {
        "name": name,
        "typed_config": _any("envoy.extensions.filters.http.header_mutation.v3.HeaderMutation", mutations=mutations),
    }


def compiled_destination(policy: pb.Policy) -> dict[str, Any]:
    """Where Envoy sends a compiled policy's requests: the first chain by priority (failover,
    fastest: the chain skips what is unhealthy), else a weighted split over the chains that
    start with each backend (round-robin: equal weights; weighted: its weights, none at 0)."""
    split = compiled_split(policy)
    if policy.strategy in (pb.FAILOVER, pb.FASTEST):
        ((target, _),) = split
        return {"cluster": target}
    return {"weighted_clusters": {"clusters": [{"name": t, "weight": w} for t, w in split]}}


def routed_targets(policy: pb.Policy) -> list[str]:
    """The chains Envoy can send this policy's requests to, each an aggregate cluster: a
    compiled policy's destination (a failover policy's other chains, those that start with a
    later backend, are never used), every chain of a decided one (the router phase may pick any
    backend first)."""
    if policy.compiled:
        destination = compiled_destination(policy)
        if "cluster" in destination:
            return [destination["cluster"]]
        return [c["name"] for c in destination["weighted_clusters"]["clusters"]]
    return list(dict.fromkeys(b.target for b in policy.backends if b.target))


def relays(cfg: pb.RoutingConfig, opts: GatewayOptions) -> bool:
    """Whether some policy's streams go through the stream relay (extproc.relay), which the
    ext_proc serves on its admin port: without one (a bare `signalbox extproc`), broken streams
    are cut as under `close`."""
    return bool(opts.extproc_admin_port) and any(p.broken_stream != pb.BROKEN_STREAM_CLOSE for p in cfg.policies)


def _relay_cluster(port: int) -> dict[str, Any]:
    """The stream relay: the ext_proc's admin port, its host marked RELAY_BACKEND so that the
    attempt filters pass its requests as they are (attempt.lua). No outlier detection or health
    check: the relay is this pod's own process, and its answers are the providers'."""
    return {
        "name": RELAY_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _http1_options(),
        "circuit_breakers": {"thresholds": [STREAM_LIMITS]},
        "load_assignment": {
            "cluster_name": RELAY_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {"address": _address("127.0.0.1", port), "hostname": RELAY_BACKEND},
                        }
                    ]
                }
            ],
        },
    }


def backend_clusters(cfg: pb.RoutingConfig, opts: GatewayOptions) -> list[dict[str, Any]]:
    """One cluster per backend and the TLS origins they reach (what an Envoy about to start
    gets first: gatewayfiles)."""
    return [make() for _, make in backend_cluster_specs(cfg, opts)]


def backend_cluster_specs(
    cfg: pb.RoutingConfig, opts: GatewayOptions, compiled_only: bool = False
) -> list[ClusterSpec]:
    """`backend_clusters`, each as its key and its maker (the keys `cluster_specs` gives them:
    the start's whole files then reuse what its backends-first files converted). With
    `compiled_only`, only the backends compiled policies route to: over ADS the others reach
    Envoy with a chain a request asks for (extproc.xds), so a start need not make them first."""
    backends = _backend_specs(cfg, opts)
    if compiled_only:
        routed = {b.backend for p in cfg.policies if p.compiled for b in p.backends}
        backends = [spec for i, spec in enumerate(backends) if i in routed]
    return backends + _keyed(origin_clusters(cfg, opts.upstream_ca_file))


def _backend_specs(cfg: pb.RoutingConfig, opts: GatewayOptions) -> list[ClusterSpec]:
    providers = {p.id: p for p in cfg.providers}
    ads, ca, shared = opts.endpoints_over_ads, opts.upstream_ca_file, shared_origins(cfg)
    via_origin = {p.id: p.id in shared for p in cfg.providers}
    make_keys = functools.partial(_backend_keys, cfg, ads, ca, via_origin)
    keys = kept.kept(cfg, "backend_cluster_keys", make_keys, orjson.dumps([ads, ca, shared]))
    return [
        (key, functools.partial(_backend_resource, b, providers[b.provider_id], ads, ca, via_origin[b.provider_id]))
        for key, b in zip(keys, cfg.backends, strict=True)
    ]


def _backend_keys(cfg: pb.RoutingConfig, ads: bool, ca: str, via_origin: dict[str, bool]) -> list[bytes]:
    """Each backend cluster's key. A backend's cluster is made from the backend, its provider,
    whether it reaches an origin and these options alone (a provider's key is of fixed length:
    the concatenation is unambiguous)."""
    provider_keys = {
        p.id: part_key(orjson.dumps([ads, ca, via_origin[p.id]]) + p.SerializeToString(deterministic=True))
        for p in cfg.providers
    }
    return [
        b"B" + part_key(provider_keys[b.provider_id] + b.SerializeToString(deterministic=True)) for b in cfg.backends
    ]


def _keyed(made: list[dict[str, Any]]) -> list[ClusterSpec]:
    """Clusters already made, keyed by what they are."""
    return [(b"X" + orjson.dumps(c), functools.partial(dict, c)) for c in made]


def _backend_resource(
    backend: pb.Backend, provider: pb.Provider, ads: bool, ca_file: str, via_origin: bool
) -> dict[str, Any]:
    return _any("envoy.config.cluster.v3.Cluster", **_backend_cluster(backend, provider, ads, ca_file, via_origin))


def _aggregate(target: str, member_clusters: list[str]) -> dict[str, Any]:
    return _any(
        "envoy.config.cluster.v3.Cluster",
        name=target,
        connect_timeout="1s",
        lb_policy="CLUSTER_PROVIDED",
        cluster_type={
            "name": "envoy.clusters.aggregate",
            "typed_config": _any("envoy.extensions.clusters.aggregate.v3.ClusterConfig", clusters=member_clusters),
        },
        circuit_breakers={"thresholds": [STREAM_LIMITS]},
    )


# A cluster as a publisher encodes it: a key that differs whenever the cluster would (a
# digest of what it is made from), and how to make it. The publisher converts a cluster once
# per key (xdsbinary.KeyedEncoder): a change makes and converts only the clusters it added or
# altered, where it made all 17,712 of the 2,000-provider fleet's as dicts and digested their
# JSON (0.2 s of the path from a policy's change to Envoy, bench/README.md).
ClusterSpec = tuple[bytes, Callable[[], dict[str, Any]]]


def part_key(data: bytes) -> bytes:
    """A part's key from what it is made from: 16 bytes, whatever its length."""
    return hashlib.blake2b(data, digest_size=16).digest()


def cluster_specs(
    cfg: pb.RoutingConfig, opts: GatewayOptions, chains: Mapping[str, Chain] | None = None
) -> list[ClusterSpec]:
    """`clusters`, each as its key and its maker, in the same order."""
    chains = chains_of(cfg) if chains is None else chains
    out = _backend_specs(cfg, opts)
    # An aggregate is made from its name and its members' cluster names, and its name is a
    # digest of those (compiler.target_name).
    for target in dict.fromkeys(target for policy in cfg.policies for target in routed_targets(policy)):
        out.append((b"T" + target.encode(), functools.partial(_aggregate, target, list(chains[target].clusters))))
    # The few others are made now, keyed by what they are.
    others = (
        [_any("envoy.config.cluster.v3.Cluster", **_relay_cluster(opts.extproc_admin_port))]
        if opts.extproc_admin_port and relays(cfg, opts)
        else []
    )
    if opts.otlp_endpoint:
        others.append(otlp_cluster(opts))
    others += jwks_clusters(cfg, opts.upstream_ca_file)
    others += origin_clusters(cfg, opts.upstream_ca_file)
    return out + _keyed(others)


def clusters(
    cfg: pb.RoutingConfig, opts: GatewayOptions, chains: Mapping[str, Chain] | None = None
) -> list[dict[str, Any]]:
    """Every cluster: the backends', one aggregate per distinct chain a route uses (whichever
    policies share it), the relay's, the tracer's and the JWKS fetchers'. `chains`:
    `chains_of`."""
    return [make() for _, make in cluster_specs(cfg, opts, chains)]
