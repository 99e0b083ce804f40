"""The listener: the router-phase ext_proc, routes per target and what Envoy answers alone,
local replies in OpenAI shape, accounting and the request log."""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from signalbox.api.v1alpha1 import config_pb2 as pb

from .. import errors
from . import clientpaths, luaroutes, modelsapi
from .auth import jwt_filter
from .clusters import (
    Chain,
    _remove_gateway_headers,
    chains_of,
    compiled_destination,
    larger_after,
    part_key,
    relays,
    routed_targets,
    upstream_filters,
)
from .contract import (
    ADMIN_CLUSTER,
    ALIAS_KEY,
    API_PATHS,
    ATTEMPT_LOG_NAME,
    CLIENT_PATH_KEY,
    COMPILED_POLICY_TAG,
    EMPTY_BODY,
    EXTPROC_ADMIN_CLUSTER,
    EXTPROC_FAILED_STATUS,
    FEEDBACK_PATH,
    FIRST_TOKEN_HEADER,
    HEADER_ATTRIBUTE,
    HEALTH_LISTENER_NAME,
    JWT_NAMESPACE,
    KEY_HEADERS,
    LARGER_AFTER_HEADER,
    LISTENER_NAME,
    LOW_REMAINING_REQUESTS,
    LOW_REMAINING_TOKENS,
    MESSAGES_PATH,
    METADATA_NS,
    MODEL_PATH_PREFIX,
    MODELS_PATH,
    RELAY_BACK_HEADER,
    RELAY_CLUSTER,
    RELAY_HEADER,
    RELAY_KEY,
    RELAY_PATH_PREFIX,
    REMAINING_HEADERS,
    RESTING_LISTENER,
    RESTING_STATUS,
    RETRY_AFTER_HEADERS,
    RETRY_HEADER,
    ROUTED_PATHS,
    ROUTER_ATTRIBUTES,
    STREAM_KEY,
    SUPPORTED_PATHS,
    TARGET_NS,
    api_of_path,
    chain_groups,
    compiled_split,
    models_listing,
    routes_key,
    target_groups,
    too_large_message,
    virtual_host_name,
)
from .options import (
    _RETRIABLE_STATUSES,
    _RETRY_ON,
    EXTPROC_FILTER,
    GatewayOptions,
    _address,
    _any,
    _ms,
    extproc_grpc_service,
)
from .tracing import http_tracing


def _extproc_filter(
    opts: GatewayOptions, request_headers: bool = True, fail_open: bool | None = None, **extra: Any
) -> dict[str, Any]:
    """The router-phase ext_proc: the body, with the headers it reads as attributes (a
    headers-first stream is what tests and older configs send)."""
    return _any(
        "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        grpc_service=extproc_grpc_service(opts.extproc_message_timeout_ms),
        failure_mode_allow=opts.failure_mode == "open" if fail_open is None else fail_open,
        # An unreachable, failed or timed-out ext_proc answers this status, which nothing else
        # produces, so the local reply mapper turns exactly these into 503 routing_unavailable
        # while the ext_proc's own 500 internal_error (with its request id) passes unchanged.
        status_on_error={"code": EXTPROC_FAILED_STATUS},
        message_timeout=_ms(opts.extproc_message_timeout_ms),
        processing_mode={
            "request_header_mode": "SEND" if request_headers else "SKIP",
            "response_header_mode": "SKIP",
            "request_body_mode": "BUFFERED",
            "response_body_mode": "NONE",
        },
        allow_mode_override=True,
        mutation_rules={"allow_all_routing": True},
        **extra,
    )


# RetryPolicy's field (14 in Envoy 1.40) that makes a retry ask the route's cluster specifier
# again: xds-protos 1.85.0 has no such field, so the binary encoder adds it (`xdsbinary`).
REFRESH_CLUSTER_ON_RETRY = "refresh_cluster_on_retry"


def _retry_policy(policy: pb.Policy, by_groups: bool = False) -> dict[str, Any]:
    """`by_groups`: for a route walking its chain by priority groups (`contract.chain_groups`),
    where each retry asks the specifier for the next group's cluster; else for a route to an
    aggregate cluster, where each retry moves to the aggregate's next priority."""
    # retriable-headers: an answer attempt.lua marked worth the next backend (a prompt too long
    # for this one's context window, when a later one has a larger window), or a resting
    # backend's refusal (contract.RESTING_LISTENER).
    retry_on = sorted({_RETRY_ON[r] for r in policy.retry_on} | {"retriable-headers"})
    retry: dict[str, Any] = {
        "retry_on": ",".join(retry_on),
        "retriable_headers": [{"name": RETRY_HEADER, "present_match": True}],
        "num_retries": max(policy.max_attempts - 1, 0),
    }
    if by_groups:
        # Not previous_priorities: it would send a retry to the next cluster's priority 1, the
        # resting listener.
        retry[REFRESH_CLUSTER_ON_RETRY] = True
    else:
        # Each retry moves to the next priority of the aggregate cluster, i.e. the next backend.
        retry["retry_priority"] = {
            "name": "envoy.retry_priorities.previous_priorities",
            "typed_config": _any(
                "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                update_frequency=1,
            ),
        }
    retry |= {
        # A backend that failed or timed out is not tried again within the request, even when
        # the next priority is the same endpoint (its host was just seen failing).
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": _any("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"),
            }
        ],
        "host_selection_retry_max_attempts": 3,
        # Failover is to another backend: no reason to wait (a 429's Retry-After concerns the
        # backend that sent it, not the next one).
        "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.05s"},
    }
    statuses = sorted({s for r in policy.retry_on for s in _RETRIABLE_STATUSES.get(r, ())})
    if statuses:
        retry["retriable_status_codes"] = statuses
    per_try = (
        policy.hedge_delay_ms
        if policy.strategy == pb.FASTEST
        else policy.first_token_timeout_ms or policy.per_try_timeout_ms
    )
    if per_try:
        retry["per_try_timeout"] = _ms(per_try)
    if policy.idle_timeout_ms:
        retry["per_try_idle_timeout"] = _ms(policy.idle_timeout_ms)
    return retry


def _route_action(policy: pb.Policy, by_groups: bool = False) -> dict[str, Any]:
    """What every route of a policy does besides choosing its cluster: its budget, its retries
    (the failover; `by_groups`: `_retry_policy`) and, for `fastest`, hedging."""
    action: dict[str, Any] = {"timeout": _ms(policy.timeout_ms), "retry_policy": _retry_policy(policy, by_groups)}
    if policy.strategy == pb.FASTEST:
        action["hedge_policy"] = {"hedge_on_per_try_timeout": True}
    return action


def _response_headers(decision: str = f"%DYNAMIC_METADATA({METADATA_NS}:{{}})%") -> list[dict[str, Any]]:
    """Why this answer: `decision` formats a key of the decision (dynamic metadata from the
    ext_proc, or the compiled route's own). Who answered (PROVIDER_HEADER, MODEL_HEADER) is set
    per attempt by attempt.lua, after any failover."""

    def header(name: str, value: str) -> dict[str, Any]:
        return {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}

    return [
        header("x-signalbox-policy", decision.format("policy")),
        header("x-signalbox-reason", decision.format("reason")),
        header("x-signalbox-class", decision.format("class")),
        # Echoed back in POST /v1/feedback to teach adaptive routing (see README).
        header("x-signalbox-decision", decision.format("decision")),
        # A policy trying a candidate: which side served, and what a shadow decided (rollout.py).
        header("x-signalbox-rollout", decision.format("rollout")),
    ]


def _set(name: str, value: str) -> dict[str, Any]:
    return {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _policy_headers(policy: pb.Policy) -> list[dict[str, Any]]:
    """Request headers a policy's routes add for its attempts' upstream filters."""
    # The request's `stream` (true or false; absent, no header): only streams are held.
    return (
        [_set(FIRST_TOKEN_HEADER, f"%DYNAMIC_METADATA({METADATA_NS}:{STREAM_KEY})%")]
        if policy.first_token_timeout_ms
        else []
    )


# Each policy's routes as the last generation made them, by what they are made from (the
# policy's message and its chains' LARGER_AFTER_HEADER values), as JSON: a change makes the
# routes of the policies it changed, not the 2,000 fleet's 7,700 (0.1 s). Kept as bytes, so each
# generation gets dicts of its own, whatever its callers do with them.
@dataclass(frozen=True, slots=True)
class _Made:
    routes: bytes  # JSON: [compiled routes, decided routes]
    # Each route's retry policy (`_key`; None: it has none), for the virtual host's count.
    retries: tuple[tuple[bytes | None, ...], tuple[bytes | None, ...]]
    # For the decided routes (`_decided_routes`): the policy's action as a key, and a target
    # for the route's default; None if all its decisions have routes of their own.
    decided: tuple[bytes, str] | None = None


_kept_routes: dict[bytes, _Made] = {}


def _retry_key(route: dict[str, Any]) -> bytes | None:
    retry = route.get("route", {}).get("retry_policy")
    return None if retry is None else _key(retry)


def _policy_routes(
    policy: pb.Policy, larger: dict[str, str], chains: Mapping[str, Chain], used: dict[bytes, _Made]
) -> tuple[bytes, _Made]:
    """A policy's compiled routes (matched first) and its decided ones, and what they were made
    from, from `_kept_routes` when the same inputs made them; what this generation used goes
    into `used`. (A chain's name is a digest of its members: equal names, equal members.)"""
    targets = routed_targets(policy)
    key = policy.SerializeToString(deterministic=True) + orjson.dumps([larger.get(t, "") for t in targets])
    made = used.get(key) or _kept_routes.get(key)
    if made is None:
        compiled, decided = _make_policy_routes(policy, targets, larger, chains)
        retries = (tuple(_retry_key(r) for r in compiled), tuple(_retry_key(r) for r in decided))
        made = _Made(orjson.dumps([compiled, decided]), retries, _decided_by(policy, targets, larger))
    used[key] = made
    return key, made


def _decided_route(
    name: str, keys: tuple[tuple[str, str], ...], action: dict[str, Any], headers: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "match": {
            "prefix": "/",
            "dynamic_metadata": [
                {"filter": METADATA_NS, "path": [{"key": key}], "value": {"string_match": {"exact": value}}}
                for key, value in keys
            ],
        },
        "route": action,
        # (Who answered and why: the virtual host's headers, `_virtual_host`.)
        **headers,
    }


def _make_policy_routes(
    policy: pb.Policy, targets: list[str], larger: dict[str, str], chains: Mapping[str, Chain]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    action = _route_action(policy)
    if policy.compiled:
        # Envoy routes its aliases alone; a request the router phase decided for it anyway (it
        # read an alias Envoy's JSON reader did not, or a canary's candidate) goes where Envoy
        # would send it, by the decided routes (`_decided_routes`: the router phase writes the
        # policy's split, contract.SPLIT_KEY): no aggregate for chains only it could pick.
        return compiled_routes(policy, chains), []
    out = []
    for target in targets:
        if target not in larger:
            continue  # by the decided route of the policy's action (`_decided_routes`)
        # attempt.lua is one script for every chain: a chain that some member with a larger
        # context window follows has a route of its own, which tells it which members those
        # are (clients cannot send it).
        added = [_set(LARGER_AFTER_HEADER, larger[target]), *_policy_headers(policy)]
        keys = (("target", target), ("policy_id", policy.id))
        out.append(
            _decided_route(
                f"{policy.id}:{target}", keys, {"cluster": target, **action}, {"request_headers_to_add": added}
            )
        )
    return [], out


def _decided_by(policy: pb.Policy, targets: list[str], larger: dict[str, str]) -> tuple[bytes, str] | None:
    """What `_decided_routes` needs of a policy: its action's key and a target of its that has
    no route of its own (its split's first for a compiled policy), or None."""
    first = compiled_split(policy)[0][0] if policy.compiled else next((t for t in targets if t not in larger), None)
    if first is None:
        return None
    return _key({"action": _route_action(policy), "headers": _policy_headers(policy)}), first


def _decided_routes(cfg: pb.RoutingConfig, made: list[_Made]) -> list[dict[str, Any]]:
    """The routes of decided requests whose target has no route of its own: one per policy
    whose action (budget, retries, hedging, the headers it adds) is not the commonest, matched
    on the policy, then one for every other, matched on a target alone. Either way the cluster
    is the one the router phase wrote (`_decided_target`): the target it decided, or for a
    compiled policy one of its split's by weight, where Envoy would send the request.

    Why: a route per decided policy and target, and one per compiled policy, were 22 MB of Envoy
    at the 2,000-policy fleet (about 4 KB a route; issue 12), and its 2,000 policies have two
    actions: 5,424 routes, now 2. After every policy's own routes: the chains with routes of
    their own match first."""
    by_action: dict[bytes, list[tuple[pb.Policy, str]]] = {}
    for policy, of_policy in zip(cfg.policies, made, strict=True):
        if of_policy.decided is not None:
            key, first = of_policy.decided
            by_action.setdefault(key, []).append((policy, first))
    if not by_action:
        return []
    common = max(by_action, key=lambda k: len(by_action[k]))  # the first of equally common ones
    routes = []
    for key, policies in by_action.items():
        if key == common:
            continue
        for policy, first in policies:
            routes.append(_decided_by_policy(policy, first, (("policy_id", policy.id),), f"{policy.id}:decided"))
    policy, first = by_action[common][0]
    shared = _decided_by_policy(policy, first, (), "decided")
    shared["match"]["dynamic_metadata"] = [_present("target")]
    return [*routes, shared]


def _decided_by_policy(policy: pb.Policy, default: str, keys: tuple[tuple[str, str], ...], name: str) -> dict[str, Any]:
    added = _policy_headers(policy)
    headers = {"request_headers_to_add": added} if added else {}
    return _decided_route(name, keys, {**_decided_target(default), **_route_action(policy)}, headers)


def _by_groups(groups: list[dict[str, Any]], override: str = "") -> dict[str, Any]:
    """A route action's cluster by Envoy's priority group cluster specifier: `groups`, one per
    attempt (the last for any attempt after), each a weighted pick of clusters; with `override`,
    the groups a request carries in that dynamic metadata namespace instead."""
    extra = {"override_metadata_namespace": override} if override else {}
    return {
        "inline_cluster_specifier_plugin": {
            "extension": {
                "name": "envoy.router.cluster_specifier_plugin.priority_group",
                "typed_config": _any(
                    "envoy.extensions.router.cluster_specifiers.priority_group.v3.PriorityGroupClusterSpecifier",
                    priority_groups=groups,
                    **extra,
                ),
            }
        }
    }


def _decided_target(default: str) -> dict[str, Any]:
    """A route action whose cluster is the target the router phase decided
    (contract.TARGET_NS), for every attempt (the target's own failover, an aggregate's, moves
    between backends). `default`, for a request without one, is never used: the router phase
    sets it with every target.

    Why: one route per decided policy and target was 22 MB of Envoy at the 2,000-policy fleet
    (about 4 KB a route, 5,428 routes; issue 12). The target cannot travel in a header
    (`cluster_header`): the router phase answers the body alone, and Envoy applies no header
    mutation from that answer. Envoy 1.40's matcher cluster specifier over dynamic metadata
    crashed it (design notes); this one reads the metadata itself."""
    return _by_groups(target_groups(default)["priority_groups"], override=TARGET_NS)


# The route table's routes in groups, each with a key that differs whenever its routes would
# (a digest of what they are made from) and how to make them: a publisher converts a group
# once per key (xdsbinary.KeyedEncoder), so a change converts the routes of the policies it
# changed, where it made the 2,000 fleet's 6,600 routes as dicts and digested their JSON.
RouteGroup = tuple[bytes, Callable[[], list[dict[str, Any]]]]


@dataclass(frozen=True)
class RouteParts:
    """The main listener's route table: its own fields, its one virtual host's, and its routes."""

    table: dict[str, Any]
    host: dict[str, Any]
    groups: list[RouteGroup]

    def config(self) -> dict[str, Any]:
        routes = [r for _, make in self.groups for r in make()]
        fields = {k: v for k, v in self.table.items() if k != "name"}
        return {"name": self.table["name"], "virtual_hosts": [{**self.host, "routes": routes}], **fields}


def _policy_section(made: bytes, section: int, common: bytes | None) -> list[dict[str, Any]]:
    routes = orjson.loads(made)[section]
    return routes if common is None else [_own(common, r) for r in routes]


def _tail_routes(cfg: pb.RoutingConfig, opts: GatewayOptions, larger: dict[str, str]) -> list[dict[str, Any]]:
    """What Envoy answers without Python, after the routed requests' routes."""
    # The models API is answered by Envoy from the compiled aliases: no body, no Python (unless
    # consumers are declared: then the ext_proc answers what the caller may see).
    aliases = _aliases(cfg)
    listing = {
        "name": "models",
        "direct_response": {"status": 200, "body": {"inline_bytes": _b64(models_listing(aliases))}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
    }
    # The models API first: Azure's v1 models paths are its own, not clientpaths' rewrites.
    routes: list[dict[str, Any]] = [
        *modelsapi.routes(aliases, listing, by_caller=bool(cfg.consumers)),
        *clientpaths.routes(),
    ]
    first_target = next((t for policy in cfg.policies for t in routed_targets(policy)), "")
    # Below: requests the router phase set no target for. The ext_proc sees every request with
    # a body and either sets a target, refuses it or fails (510, or forwarded when it fails
    # open); so in the default closed mode only bodyless requests get here.
    if opts.failure_mode == "open" and first_target:
        routes.append(
            {
                "name": "fail-open",
                "match": {"prefix": "/"},
                "route": {"cluster": first_target},
                **(
                    {"request_headers_to_add": [_set(LARGER_AFTER_HEADER, larger[first_target])]}
                    if first_target in larger
                    else {}
                ),
            }
        )
    else:
        for path in (*ROUTED_PATHS, FEEDBACK_PATH):
            empty = errors.MalformedRequest(EMPTY_BODY["feedback" if path == FEEDBACK_PATH else "route"])
            match = {"path": path, "headers": [_method("POST")]}
            routes.append(_refusal(f"empty:{path}", match, empty, api_of_path(path)))
        for path in (*API_PATHS, FEEDBACK_PATH):
            method = errors.UnsupportedPath(f"only {'GET' if path == MODELS_PATH else 'POST'} is supported on {path}")
            routes.append(_refusal(f"method:{path}", {"path": path}, method, api_of_path(path)))
        one_model = errors.UnsupportedPath(f"only GET is supported on {MODEL_PATH_PREFIX}<id>")
        routes.append(_refusal(f"method:{MODEL_PATH_PREFIX}", {"prefix": MODEL_PATH_PREFIX}, one_model))
        unknown = errors.UnsupportedPath(f"unknown path; supported: {SUPPORTED_PATHS}")
        # An Anthropic SDK (it always sends its version header) calling an endpoint the gateway
        # lacks (message batches, files) is told so in its own API's shape.
        anthropic = {"prefix": "/", "headers": [{"name": modelsapi.ANTHROPIC_HEADER, "present_match": True}]}
        routes.append(_refusal("unknown-path:anthropic", anthropic, unknown, errors.ANTHROPIC_API))
        routes.append(_refusal("unknown-path", {"prefix": "/"}, unknown))
    return routes


def _changing_routes(opts: GatewayOptions) -> list[dict[str, Any]]:
    """After every policy's routes: the router phase set a target no route names, because the
    ext_proc has a config Envoy's routes do not have yet (a change reaches them apart). Not the
    client's fault: a 503 its SDK retries, where the request fell through to "request body is
    empty" (a 400). Failing open, the fail-open route takes it, as any request without a route.
    Reached only when no decided route matches any target (`_decided_routes`: a config whose
    policies are all compiled); otherwise a target Envoy cannot get is a missing cluster, which
    the local reply mappers answer with the same 503."""
    if opts.failure_mode == "open":
        return []
    changing = errors.RoutingUnavailable(errors.CONFIG_CHANGING)
    targeted = [_present("target")]
    return [
        _refusal(f"changing:{path}", {"path": path, "dynamic_metadata": targeted}, changing, api_of_path(path))
        for path in ROUTED_PATHS
    ]


def _route_groups(
    cfg: pb.RoutingConfig, opts: GatewayOptions, chains: Mapping[str, Chain] | None = None
) -> tuple[dict[str, Any], list[RouteGroup]]:
    """The virtual host's own fields and its routes. One route per policy and target (a
    policy's backend as first choice), matched on the target and policy the router phase put
    in dynamic metadata; then what Envoy answers without Python. Each attempt is prepared for
    its backend by the aggregate cluster's upstream filters (attempt.lua).

    Compiled routes first: Envoy matches routes in order, and a compiled alias's request
    (Envoy alone, the fast path) would otherwise pass every decided route's matcher, one per
    policy and target (10,000 at the 2,000-policy fleet: 211 against 2,600 rps,
    bench/README.md). No decided request matches one: a compiled policy's aliases are its own.
    (Compiled policies' backends have equal context windows, compiler.compilable: their chains
    never need LARGER_AFTER_HEADER.)

    The answers without Python come first too, for requests with neither an alias nor a target
    yet. Envoy matches a request's route before its body is read (the first filter asks for
    it) and again once json_to_metadata or the ext_proc has set one; that first match walked
    every compiled and decided route to reach them (none of which can match without the
    metadata), 10,000 of them at the 2,000-policy fleet: the compiled alias served 657 rps with
    them, 1,636 without."""
    chains = chains_of(cfg) if chains is None else chains
    larger = larger_after(cfg, chains)
    global _kept_routes
    used: dict[bytes, _Made] = {}
    per_policy = [_policy_routes(policy, larger, chains, used) for policy in cfg.policies]
    _kept_routes = used
    decided = _decided_routes(cfg, [made for _, made in per_policy])
    tail = _tail_routes(cfg, opts, larger)
    head = [_without_alias_or_target(r) for r in tail] + ([relay_route()] if relays(cfg, opts) else [])
    # What every routed answer shares is said once, on the virtual host, not on each route: the
    # headers that say who answered and why, and the retry policy most routes have (counted in
    # the routes' order: the first of equally common ones wins).
    counts: Counter[bytes] = Counter(k for r in head if (k := _retry_key(r)) is not None)
    for section in (0, 1):
        for _, made in per_policy:
            counts.update(k for k in made.retries[section] if k is not None)
    counts.update(k for r in (*decided, *tail) if (k := _retry_key(r)) is not None)
    host: dict[str, Any] = {
        "name": virtual_host_name(routes_key(cfg)),
        "domains": ["*"],
        "response_headers_to_add": _response_headers(),
    }
    common = counts.most_common(1)[0][0] if counts else None
    if common is not None:
        host["retry_policy"] = orjson.loads(common)

    def eager(route: dict[str, Any]) -> RouteGroup:
        final = route if common is None else _own(common, route)
        return b"R" + orjson.dumps(final), functools.partial(list, [final])

    groups = [eager(r) for r in head]
    for section in (0, 1):
        for key, made in per_policy:
            if made.retries[section]:
                group_key = (b"C", b"D")[section] + part_key(key) + (common or b"")
                groups.append((group_key, functools.partial(_policy_section, made.routes, section, common)))
    groups += [eager(r) for r in (*decided, *_changing_routes(opts), *tail)]
    return host, groups


def relay_route() -> dict[str, Any]:
    """A stream the router phase sends to the stream relay (it put the signed decision under
    RELAY_KEY: streams of policies whose broken streams are not simply cut). The relay sends it
    back to this listener, where the same decision routes it as usual; the route's timeout is
    that request's, so none here."""
    return {
        "name": "relay",
        "match": {
            "prefix": "/",
            "dynamic_metadata": [
                {"filter": METADATA_NS, "path": [{"key": RELAY_KEY}], "value": {"present_match": True}}
            ],
        },
        "route": {"cluster": RELAY_CLUSTER, "timeout": "0s", "prefix_rewrite": f"{RELAY_PATH_PREFIX}/"},
        "request_headers_to_add": [
            _set(RELAY_HEADER, f"%DYNAMIC_METADATA({METADATA_NS}:{RELAY_KEY})%"),
            _set(RELAY_BACK_HEADER, "%DOWNSTREAM_LOCAL_ADDRESS%"),
        ],
    }


def _own(common: bytes, route: dict[str, Any]) -> dict[str, Any]:
    """`route` under a virtual host whose retry policy is `common`: a route's own retry policy
    replaces the virtual host's whole (Envoy merges nothing), so a route keeps its own only
    when it differs, and one that has none says so. (At the 2,000-policy fleet each of its
    10,000 decided routes repeated 1.7 KB of what the virtual host now says once.)"""
    if "route" not in route:
        return route  # a direct response: nothing to retry
    action = dict(route["route"])
    retry = action.pop("retry_policy", None)
    if retry is None:
        action["retry_policy"] = {"num_retries": 0}  # not the virtual host's
    elif _key(retry) != common:
        action["retry_policy"] = retry
    return {**route, "route": action}


def retry_policy_of(virtual_host: dict[str, Any], route: dict[str, Any]) -> dict[str, Any] | None:
    """The retry policy Envoy applies to `route`: its own, else the virtual host's."""
    return route["route"].get("retry_policy", virtual_host.get("retry_policy"))


def _key(value: dict[str, Any]) -> bytes:
    """Equal for equal retry policies (13,000 of them at the 2,000 fleet: orjson, 5 times the
    standard library's speed)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _present(key: str) -> dict[str, Any]:
    """A dynamic metadata matcher: the router phase (or the listener) set `key`."""
    return {"filter": METADATA_NS, "path": [{"key": key}], "value": {"present_match": True}}


def _without_alias_or_target(route: dict[str, Any]) -> dict[str, Any]:
    """`route`, matched only while the request has no alias and no target in metadata."""
    absent = [{**_present(key), "invert": True} for key in (ALIAS_KEY, "target")]
    match = {**route["match"], "dynamic_metadata": [*route["match"].get("dynamic_metadata", []), *absent]}
    return {**route, "name": f"unrouted:{route['name']}", "match": match}


# What the reason header says for a policy Envoy routes alone: the ext_proc's reasons for the
# same strategies (strategies.SELECTORS), so dashboards need not know which path served.
COMPILED_REASONS = {
    pb.WEIGHTED: "weighted",
    pb.ROUND_ROBIN: "round-robin",
    pb.FAILOVER: "failover:priority",
    pb.FASTEST: "failover:priority",
}


def compiled_routes(policy: pb.Policy, chains: Mapping[str, Chain]) -> list[dict[str, Any]]:
    """The compiled path: one route per alias of a policy Envoy routes alone. It matches the
    alias json_to_metadata read from the body, walks the policy's chains by priority groups
    (`contract.chain_groups`; `chains`: each chain's members, `clusters.chains_of`) or,
    where those cannot, splits with weighted_clusters over the chains' aggregate clusters, and
    turns the ext_proc off. Policy and reason ride on route metadata. Either way attempts go to
    the same backend clusters with the same upstream filters (keys, attempt.lua)."""
    split = compiled_split(policy)
    groups = chain_groups(split, {t: list(chains[t].clusters) if t in chains else [] for t, _ in split})
    if groups is None:
        route = {**compiled_destination(policy), **_route_action(policy)}
    else:
        route = {**_by_groups(groups), **_route_action(policy, by_groups=True)}
    paths = "|".join(re.escape(p) for p in ROUTED_PATHS)
    return [
        {
            "name": f"compiled:{policy.id}:{alias}",
            "match": {
                "safe_regex": {"regex": f"^({paths})/?$"},
                "headers": [_method("POST")],
                "dynamic_metadata": [
                    {
                        "filter": METADATA_NS,
                        "path": [{"key": ALIAS_KEY}],
                        "value": {"string_match": {"exact": alias}},
                    }
                ],
            },
            "route": route,
            "metadata": {
                "filter_metadata": {
                    METADATA_NS: {
                        "policy": policy.name,
                        "policy_id": policy.id,
                        "reason": COMPILED_REASONS[policy.strategy],
                    }
                }
            },
            "typed_per_filter_config": {
                EXTPROC_FILTER: _any("envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", disabled=True)
            },
            "response_headers_to_add": _response_headers(f"%METADATA(ROUTE:{METADATA_NS}:{{}})%"),
            **({"request_headers_to_add": _policy_headers(policy)} if policy.first_token_timeout_ms else {}),
        }
        for alias in policy.aliases
    ]


def _method(name: str) -> dict[str, Any]:
    return {"name": ":method", "string_match": {"exact": name}}


def _refusal(name: str, match: dict[str, Any], err: errors.RequestError, api: str = "") -> dict[str, Any]:
    """A route that answers a request Envoy can judge alone with the error the ext_proc would
    give, in the API of the path it matches (`api`)."""
    return {
        "name": name,
        "match": match,
        "direct_response": {"status": err.status, "body": {"inline_bytes": _b64(err.body_for(api))}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": "application/json"}},
            {"header": {"key": "x-signalbox-reason", "value": err.code}},
        ],
    }


def _aliases(cfg: pb.RoutingConfig) -> list[str]:
    return sorted({alias for policy in cfg.policies for alias in policy.aliases})


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _local_reply_config(opts: GatewayOptions) -> dict[str, Any]:
    """Envoy's own errors (body too large, ext_proc unreachable, upstream failed) as OpenAI JSON.

    The ext_proc's refusals are local replies too and pass through these mappers, so each
    mapper is narrow: 503/504 only with an upstream response flag (the ext_proc's 503s carry
    none), 510 only arises from the ext_proc being unreachable or failing (`status_on_error`),
    and the 413 text states the same limit the ext_proc enforces.
    """

    def mapper(
        status: int, err: errors.RequestError, flags: list[str] | str | None = None, api: str = errors.OPENAI_API
    ) -> dict[str, Any]:
        """`flags`: Envoy's response flags the reply must carry, or a CEL condition on it."""
        filters: list[dict[str, Any]] = [
            {
                "status_code_filter": {
                    "comparison": {
                        "op": "EQ",
                        "value": {"default_value": status, "runtime_key": f"signalbox.local_reply.{status}"},
                    }
                }
            }
        ]
        if isinstance(flags, str):
            filters.append(
                {
                    "extension_filter": {
                        "name": "envoy.access_loggers.extension_filters.cel",
                        "typed_config": _any(
                            "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter", expression=flags
                        ),
                    }
                }
            )
        elif flags:
            filters.append({"response_flag_filter": {"flags": flags}})
        if api == errors.ANTHROPIC_API:
            # The client called the Messages API (its path, kept in metadata by the listener).
            filters.append(
                {
                    "metadata_filter": {
                        "matcher": {
                            "filter": METADATA_NS,
                            "path": [{"key": CLIENT_PATH_KEY}],
                            "value": {"string_match": {"prefix": MESSAGES_PATH}},
                        }
                    }
                }
            )
        match = filters[0] if len(filters) == 1 else {"and_filter": {"filters": filters}}
        return {
            "filter": match,
            "status_code": err.status,
            "body": {"inline_string": err.body_for(api).decode()},
            "body_format_override": {
                "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                "content_type": "application/json",
            },
            "headers_to_add": [
                {
                    "header": {"key": "x-signalbox-reason", "value": err.code},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        }

    upstream_flags = ["UH", "UF", "UO", "URX", "UC", "UT", "LR", "NR"]
    replies: list[tuple[int, errors.RequestError, list[str] | str | None]] = [
        (413, errors.PayloadTooLarge(too_large_message(opts.max_body_bytes)), None),
        # An answer larger than a filter may hold to read it whole (Envoy's plain-text 500).
        (
            500,
            errors.AnswerTooLarge(
                f"the provider's answer exceeds the gateway's limit of {opts.max_answer_bytes} bytes for answers"
                " it reads whole (max_answer_bytes)"
            ),
            "response.code_details == 'response_payload_too_large'",
        ),
        (EXTPROC_FAILED_STATUS, errors.RoutingUnavailable("the routing service is unavailable"), None),
        # A route names a cluster Envoy has not got yet: its routes (read from their file) came
        # before the clusters (over ADS) of the same change. Envoy's own 503 had no body.
        (503, errors.RoutingUnavailable(errors.CONFIG_CHANGING), ["NC"]),
        (503, errors.NoHealthyBackend("no backend could serve the request (all attempts failed)"), upstream_flags),
        (
            504,
            errors.UpstreamTimeout("no backend answered within the policy's deadlines (all attempts timed out)"),
            upstream_flags,
        ),
    ]
    # The first mapper that matches answers: Anthropic clients' first, in their error shape.
    return {
        "mappers": [
            mapper(status, err, flags, api)
            for api in (errors.ANTHROPIC_API, errors.OPENAI_API)
            for status, err, flags in replies
        ]
    }


# Where each API puts its usage numbers, and the accounting key each feeds: OpenAI's `usage`
# (answers and the last stream chunk), Anthropic's `usage` (answers, and `message_delta` events
# of a stream; Responses answers share its names) and `message.usage` (its `message_start`
# event, which has the input count).
_USAGE_SELECTORS = (
    (("usage", "prompt_tokens"), "prompt_tokens"),
    (("usage", "completion_tokens"), "completion_tokens"),
    (("usage", "input_tokens"), "prompt_tokens"),
    (("usage", "output_tokens"), "completion_tokens"),
    (("message", "usage", "input_tokens"), "prompt_tokens"),
    # OpenAI's Responses API: `usage` of an answer (above), `response.usage` of a stream's
    # `response.completed` event.
    (("response", "usage", "input_tokens"), "prompt_tokens"),
    (("response", "usage", "output_tokens"), "completion_tokens"),
    # Cached input, for token limits that leave it out (or, Anthropic's, count it in):
    # OpenAI's is part of prompt_tokens (chat) or input_tokens (Responses), Anthropic's is not.
    (("usage", "prompt_tokens_details", "cached_tokens"), "cached_tokens"),
    (("usage", "input_tokens_details", "cached_tokens"), "cached_tokens"),
    (("response", "usage", "input_tokens_details", "cached_tokens"), "cached_tokens"),
    (("usage", "cache_read_input_tokens"), "cache_read_tokens"),
    (("message", "usage", "cache_read_input_tokens"), "cache_read_tokens"),
)


def _usage_rules() -> list[dict[str, Any]]:
    """json_to_metadata rules: the response's usage numbers into `signalbox` metadata."""
    return [
        {
            "selectors": [{"key": k} for k in path],
            "on_present": {"metadata_namespace": METADATA_NS, "key": key, "type": "NUMBER"},
        }
        for path, key in _USAGE_SELECTORS
    ]


def json_filter(cfg: pb.RoutingConfig, opts: GatewayOptions) -> dict[str, Any] | None:
    """Envoy's JSON reader (C++, no Lua, no Python), on both paths of one request:

    - request: the alias (`model`) into dynamic metadata for the compiled routes to match on. A
      body it cannot read leaves no alias: the request goes to the ext_proc, which gives the
      client its 400. Present only when some policy is compiled, or spans name it
      (`gen_ai.request.model`, envoygen.tracing).
    - response (accounting, part 1): the usage numbers of a JSON answer. Streams are read by
      `sse_usage_filter`.
    """
    config: dict[str, Any] = {}
    request_rules: list[dict[str, Any]] = []
    if any(p.compiled for p in cfg.policies) or opts.otlp_endpoint:
        request_rules.append(
            {
                "selectors": [{"key": "model"}],
                "on_present": {"metadata_namespace": METADATA_NS, "key": ALIAS_KEY, "type": "STRING"},
            }
        )
    if any(p.first_token_timeout_ms for p in cfg.policies):
        # Whether the request streams: the first-token filter holds only streams' headers.
        request_rules.append(
            {"selectors": [{"key": "stream"}], "on_present": {"metadata_namespace": METADATA_NS, "key": STREAM_KEY}}
        )
    if request_rules:
        config["request_rules"] = {"rules": request_rules, "allow_empty_content_type": True}
    if opts.accounting:
        # Matched on the whole header value: providers send the charset too.
        json_types = ["application/json", "application/json; charset=utf-8", "application/json;charset=utf-8"]
        config["response_rules"] = {"rules": _usage_rules(), "allow_content_types": json_types}
    if not config:
        return None
    return {
        "name": "signalbox.json",
        "typed_config": _any("envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata", **config),
    }


def sse_usage_filter() -> dict[str, Any]:
    """Accounting, part 1 for streams: Envoy's SSE reader parses each event's JSON as it passes
    (never buffering the stream) and keeps the last usage numbers it sees, so text that only
    looks like usage inside generated content never counts."""
    parser = {
        "name": "envoy.content_parsers.json",
        "typed_config": _any(
            "envoy.extensions.content_parsers.json.v3.JsonContentParser",
            rules=[{"rule": rule} for rule in _usage_rules()],
        ),
    }
    return {
        "name": "signalbox.sse_usage",
        "typed_config": _any(
            "envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
            response_rules={"content_parser": parser, "max_event_size": 1 << 20},
        ),
    }


def accounting_log(opts: GatewayOptions) -> dict[str, Any]:
    """Accounting, part 2: the gRPC access log carries each finished request (decision and
    usage metadata, the endpoint that answered, timings) to the ext_proc, batched: a stream of
    any length costs the ext_proc part of one message instead of one message per chunk."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": _any(
            "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            common_config={
                "log_name": "signalbox",
                "transport_api_version": "V3",
                "grpc_service": extproc_grpc_service(),
                # Budgets read the ledger: spend lands within this, batched under load.
                "buffer_flush_interval": _ms(opts.accounting_flush_ms),
                "custom_tags": [
                    {"tag": "backend", "value": "%UPSTREAM_HOST_NAME%"},
                    # The policy of a compiled route (no decision metadata on that path).
                    {
                        "tag": COMPILED_POLICY_TAG,
                        "metadata": {
                            "kind": {"route": {}},
                            "metadata_key": {"key": METADATA_NS, "path": [{"key": "policy_id"}]},
                        },
                    },
                ],
            },
            additional_response_headers_to_log=["content-type"],
        ),
        # Only requests with a decision or an alias (compiled routes): the rest (models
        # listing, refusals of bodyless requests) is not worth a log entry.
        "filter": {
            "or_filter": {
                "filters": [
                    {
                        "metadata_filter": {
                            "matcher": {
                                "filter": METADATA_NS,
                                "path": [{"key": key}],
                                "value": {"present_match": True},
                            }
                        }
                    }
                    for key in ("decision", ALIAS_KEY)
                ]
            }
        },
    }


ATTEMPT_LOG_FLUSH_MS = 20


def cooldown_worthy() -> str:
    """CEL over one attempt: a 429 or 401/403, a 503 that names a Retry-After, or a 2xx whose
    rate-limit headers say the backend is about to run out. Only these reach the ext_proc's
    cooldowns: ordinary answers cost it nothing. (An unreadable header value is a CEL error,
    which matches nothing.)"""
    has = " || ".join(f"'{h}' in response.headers" for h in RETRY_AFTER_HEADERS)
    low = " || ".join(
        f"('{h}' in response.headers && double(response.headers['{h}']) <= "
        f"{float(LOW_REMAINING_REQUESTS if 'requests' in h else LOW_REMAINING_TOKENS)})"
        for h in REMAINING_HEADERS
    )
    return (
        "response.code == 429 || response.code == 401 || response.code == 403"
        f" || (response.code == 503 && ({has})) || (response.code >= 200 && response.code < 300 && ({low}))"
    )


def attempt_log(opts: GatewayOptions) -> dict[str, Any]:
    """Attempts that say something about their backend's limits, to the ext_proc (the router's
    upstream log, so every attempt of a failover is seen, not only the last)."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": _any(
            "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            common_config={
                "log_name": ATTEMPT_LOG_NAME,
                "transport_api_version": "V3",
                "grpc_service": extproc_grpc_service(),
                # Rare entries, and each one keeps requests off a backend that says "not now".
                "buffer_flush_interval": _ms(ATTEMPT_LOG_FLUSH_MS),
                "custom_tags": [{"tag": "backend", "value": "%UPSTREAM_HOST_NAME%"}],
            },
            additional_response_headers_to_log=[*RETRY_AFTER_HEADERS, *REMAINING_HEADERS, *REMAINING_HEADERS.values()],
        ),
        "filter": {
            "extension_filter": {
                "name": "envoy.access_loggers.extension_filters.cel",
                "typed_config": _any(
                    "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter", expression=cooldown_worthy()
                ),
            }
        },
    }


# One JSON line per request: what an operator asks of a gateway (who answered, why, how long,
# how many tokens). The x-signalbox-* fields are the response headers the client got (for a
# refused request: provider "none" and the error code as reason). Of the request's own headers
# only the method, path (as sent upstream) and request id are logged: never keys or prompts.
REQUEST_LOG_FORMAT: dict[str, str] = {
    "event": "request",
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    # The path the client called: `:path` holds the last attempt's (a provider's, or the relay's).
    "path": f"%DYNAMIC_METADATA({METADATA_NS}:{CLIENT_PATH_KEY})%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "policy": "%RESP(X-SIGNALBOX-POLICY)%",
    "provider": "%RESP(X-SIGNALBOX-PROVIDER)%",
    "model": "%RESP(X-SIGNALBOX-MODEL)%",
    "reason": "%RESP(X-SIGNALBOX-REASON)%",
    "class": "%RESP(X-SIGNALBOX-CLASS)%",
    # The consumer's id ("namespace/name") or "anonymous"; empty while no consumer is declared.
    "consumer": f"%DYNAMIC_METADATA({METADATA_NS}:consumer)%",
    # A policy's rollout: "live", "canary:<candidate>", or "shadow:<candidate>:<backend>:same|differs".
    "rollout": f"%DYNAMIC_METADATA({METADATA_NS}:rollout)%",
    "prompt_tokens": f"%DYNAMIC_METADATA({METADATA_NS}:prompt_tokens)%",
    "completion_tokens": f"%DYNAMIC_METADATA({METADATA_NS}:completion_tokens)%",
    # A request the stream relay sent (extproc.relay): the client's request id. Its own line
    # says how the provider's answer ended (a broken one's flags) and what it used.
    "relay_of": f"%DYNAMIC_METADATA({METADATA_NS}:relay_of)%",
}


# One JSON line per attempt (the router's upstream log), in order before its request's line in
# the same file: which backend each attempt went to and how it ended (`status` 0 when it got no
# response; `flags` UF connect failure, UR/UPE reset or broken stream, UT/SI first-response or
# silence deadline). "event" tells attempt and request lines apart.
ATTEMPT_LOG_FORMAT: dict[str, str] = {
    "event": "attempt",
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "backend": "%UPSTREAM_HOST_NAME%",
    # The answer's (attempt.lua's header): empty for an attempt that got none.
    "provider": "%RESP(X-SIGNALBOX-PROVIDER)%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "retry_after": "%RESP(RETRY-AFTER)%",
    # The provider's own id of its answer (OpenAI's and Azure's x-request-id, Anthropic's
    # request-id), which its support asks for: the client's response carries the gateway's.
    "provider_request_id": "%RESP(X-REQUEST-ID?REQUEST-ID)%",
    # Why the gateway itself moved the request on from this attempt: "resting" (the backend
    # rests; refused inside Envoy, the provider was not called: contract.RESTING_LISTENER) or
    # "context_length" (a prompt too long for its window, a later backend's larger: attempt.lua).
    "moved_on": f"%RESP({RETRY_HEADER})%",
}


def request_log(path: str, log_format: dict[str, str] = REQUEST_LOG_FORMAT) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": _any(
            "envoy.extensions.access_loggers.file.v3.FileAccessLog",
            path=path,
            log_format={"json_format": log_format},
        ),
    }


def client_path_filter() -> dict[str, Any]:
    """The client's path, kept in dynamic metadata for every attempt's rewrite: the request
    headers are one map shared by all attempts, so `:path` holds the previous attempt's."""
    return {
        "name": "signalbox.client_path",
        "typed_config": _any(
            "envoy.extensions.filters.http.header_to_metadata.v3.Config",
            request_rules=[
                {
                    "header": ":path",
                    "on_header_present": {"metadata_namespace": METADATA_NS, "key": CLIENT_PATH_KEY, "type": "STRING"},
                    "remove": False,
                }
            ],
        ),
    }


def router_attributes(cfg: pb.RoutingConfig) -> list[str]:
    """The attributes the router phase needs: the request line, its id and peer, and every
    header some policy reads (validated header names: safe inside a CEL string)."""
    names = {h.name for p in cfg.policies for h in p.headers} | {p.hash_header for p in cfg.policies if p.hash_header}
    names |= {p.rollout.sticky_header for p in cfg.policies if p.rollout.sticky_header}
    if cfg.consumers:
        names |= set(KEY_HEADERS)  # a gateway API key, compared by its hash (extproc.identity)
    if any(p.broken_stream != pb.BROKEN_STREAM_CLOSE for p in cfg.policies):
        names.add(RELAY_HEADER)  # a relayed stream back from the relay (extproc.relay)
    safe = sorted(n for n in names if re.fullmatch(r"[A-Za-z0-9!#$%&*+.^_`|~-]+", n))
    return [*ROUTER_ATTRIBUTES, *(HEADER_ATTRIBUTE.format(n.lower()) for n in safe)]


ROUTE_CONFIG_NAME = "signalbox"
# How long a request waits for its chain to arrive (on_demand_chains): the stream answers in
# milliseconds, or at once that it has no such chain; this bounds a stream being replaced.
ON_DEMAND_TIMEOUT_S = 5


def route_parts(cfg: pb.RoutingConfig, opts: GatewayOptions, chains: Mapping[str, Chain] | None = None) -> RouteParts:
    """`route_config`, its routes in keyed groups (`RouteGroup`) for a publisher that converts
    each group once (xdsbinary.KeyedEncoder)."""
    host, groups = _route_groups(cfg, opts, chains)
    table = {
        "name": ROUTE_CONFIG_NAME,
        # A route's own response headers (a refusal's reason, a compiled route's decision)
        # win over the virtual host's.
        "most_specific_header_mutations_wins": True,
        "request_headers_to_remove": [],
        # attempt.lua's note to the retry policy, never for a client.
        "response_headers_to_remove": [RETRY_HEADER],
        # Envoy rejects the whole table when a direct response is larger than this (default
        # 4 KiB): the models listing outgrows that at about 60 aliases.
        "max_direct_response_body_size_bytes": max(4096, len(models_listing(_aliases(cfg))) + 1024),
    }
    return RouteParts(table, host, groups)


def route_config(
    cfg: pb.RoutingConfig, opts: GatewayOptions, chains: Mapping[str, Chain] | None = None
) -> dict[str, Any]:
    """The main listener's route table: inline, or its own resource (RDS, `resources`).
    `chains`: each chain's (`clusters.chains_of`), when the caller has them."""
    return route_parts(cfg, opts, chains).config()


def on_demand_chains() -> dict[str, Any]:
    """Asks the ADS stream for a route's failover chain the first time a request needs it
    (on-demand CDS; extproc.xds sends the chains only when asked). After the router phase and
    the buffer, so the route is the decided one and the body is held: Envoy then goes on with
    the request as it is, and the ext_proc is not asked again. Why (issue 12): the
    2,000-provider fleet's 7,712 chains held at once cost Envoy 182 MB and 1.6 s of its start
    (each aggregate registers a callback run for every cluster added after it), and a
    request uses the chains of its policy's decisions only. The first request to a chain waits
    for one round trip to the worker holding the stream; a chain the stream does not know is
    answered at once, and the request gets `routing_unavailable`."""
    return {
        "name": "envoy.filters.http.on_demand",
        "typed_config": _any(
            "envoy.extensions.filters.http.on_demand.v3.OnDemand",
            odcds={
                "source": {"ads": {}, "resource_api_version": "V3"},
                "timeout": f"{ON_DEMAND_TIMEOUT_S}s",
            },
        ),
    }


def listener(cfg: pb.RoutingConfig, opts: GatewayOptions, routes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The main listener. `routes`: the config source of its route table (RDS), else inline."""
    # The decision's policy and reason travel as dynamic metadata, not request headers, so they
    # reach the response headers without ever being sent to a provider.
    # Learning reads outcomes from the access log: no response message to the ext_proc.
    # One message per request: the body, with the request's headers as attributes. The buffer
    # filter after the ext_proc holds the headers (and the router) until the body's answer has
    # put the target in dynamic metadata; the target route prepares the request. Requests
    # without a body never reach Python (GET /v1/models and refusals are routes of their own).
    metadata_options: dict[str, Any] = {"receiving_namespaces": {"untyped": [METADATA_NS, TARGET_NS]}}
    if cfg.jwt_providers:
        # A verified token's payload names its consumer (auth.jwt_filter).
        metadata_options["forwarding_namespaces"] = {"untyped": [JWT_NAMESPACE]}
    router_extproc = _extproc_filter(
        opts,
        request_headers=False,
        # Once consumers exist the ext_proc is who checks callers and their limits: failing
        # open would let anyone in, so a gateway with consumers always fails closed.
        fail_open=False if cfg.consumers else None,
        request_attributes=router_attributes(cfg),
        metadata_options=metadata_options,
    )
    hcm = _any(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="signalbox",
        codec_type="AUTO",
        **(
            {"rds": {"route_config_name": ROUTE_CONFIG_NAME, "config_source": routes}}
            if routes is not None
            else {"route_config": route_config(cfg, opts)}
        ),
        http_filters=[
            _remove_gateway_headers("signalbox.strip_client_gateway_headers"),
            luaroutes.lua_filter(),
            client_path_filter(),
            # Requests over max_body_bytes are refused before any filter reads their body (after
            # the client's path is kept: the 413 is in its API's shape).
            _request_size_guard(opts),
            *([jwt] if (jwt := jwt_filter(cfg)) else []),
            *([json] if (json := json_filter(cfg, opts)) else []),
            {"name": EXTPROC_FILTER, "typed_config": router_extproc},
            # A buffer filter sets the stream's one buffer limit, the answer's as well. The
            # request is whole by now (the first filter held it to max_body_bytes), so this one
            # raises the limit to what an answer read whole for its usage may need.
            _buffer_filter("envoy.filters.http.buffer", max(opts.max_body_bytes, opts.max_answer_bytes)),
            *([on_demand_chains()] if opts.endpoints_over_ads else []),
            *([sse_usage_filter()] if opts.accounting else []),
            {
                "name": "envoy.filters.http.router",
                "typed_config": _any(
                    "envoy.extensions.filters.http.router.v3.Router",
                    upstream_log=([attempt_log(opts)] if opts.accounting else [])
                    + ([request_log(opts.request_log, ATTEMPT_LOG_FORMAT)] if opts.request_log else []),
                    # Every attempt's filters, shared by all aggregate clusters (clusters.py).
                    upstream_http_filters=upstream_filters(cfg, opts),
                ),
            },
        ],
        access_log=([accounting_log(opts)] if opts.accounting else [])
        + ([request_log(opts.request_log)] if opts.request_log else []),
        local_reply_config=_local_reply_config(opts),
        stream_idle_timeout="300s",
        use_remote_address=True,
        # Clients can quote it: it is the request log's request_id.
        always_set_request_id_in_response=True,
        **({"tracing": http_tracing(opts)} if opts.otlp_endpoint else {}),
    )
    return _any(
        "envoy.config.listener.v3.Listener",
        name=LISTENER_NAME,
        address=_address(opts.listen_address, opts.listen_port),
        # The read buffer of a connection and its streams' first buffer limit (each request's is
        # then set by the buffer filters: max_body_bytes while it arrives, max_answer_bytes after).
        per_connection_buffer_limit_bytes=max(opts.max_body_bytes, opts.max_answer_bytes) + 64 * 1024,
        filter_chains=[{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    )


def _request_size_guard(opts: GatewayOptions) -> dict[str, Any]:
    """The body limit, first in the chain: it holds the request until its body is whole, and a
    body over max_body_bytes gets its 413 (with or without a content-length) before any other
    filter reads it. Every filter after it meets a whole, bounded request, so the buffer filter
    after the ext_proc can raise the stream's limit for the answer (max_answer_bytes: Envoy
    has one buffer limit per stream, which answers read whole for their usage need far larger)."""
    return _buffer_filter("signalbox.request_size", opts.max_body_bytes)


def _buffer_filter(name: str, max_bytes: int) -> dict[str, Any]:
    """Envoy's buffer filter: holds the request until its body is whole, and sets the stream's
    buffer limit (both directions) to `max_bytes`."""
    return {
        "name": name,
        "typed_config": _any("envoy.extensions.filters.http.buffer.v3.Buffer", max_request_bytes=max_bytes),
    }


def health_listener(opts: GatewayOptions) -> dict[str, Any]:
    """Readiness and metrics for kubelet and Prometheus, without exposing the admin interface."""

    def route(path: str, cluster: str = ADMIN_CLUSTER) -> dict[str, Any]:
        return {"match": {"path": path}, "route": {"cluster": cluster}}

    extproc_metrics = [route("/metrics", EXTPROC_ADMIN_CLUSTER)] if opts.extproc_admin_port else []

    hcm = _any(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="signalbox_health",
        route_config={
            "name": "health",
            "virtual_hosts": [
                {
                    "name": "health",
                    "domains": ["*"],
                    "routes": [
                        route("/ready"),
                        route("/stats/prometheus"),
                        *extproc_metrics,
                        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
                    ],
                }
            ],
        },
        http_filters=[
            {
                "name": "envoy.filters.http.router",
                "typed_config": _any("envoy.extensions.filters.http.router.v3.Router"),
            }
        ],
    )
    return _any(
        "envoy.config.listener.v3.Listener",
        name=HEALTH_LISTENER_NAME,
        address=_address(opts.listen_address, opts.health_port or 0),
        filter_chains=[{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    )


# Why an attempt to a resting backend is refused, in the shape of the API the attempt speaks
# (a translated attempt's answer is translated for the client as a provider's would be).
_RESTING = errors.BackendsResting(
    "every backend this request could go to is resting (rate limited, key rejected or failing); retry later"
)


def resting_listener() -> dict[str, Any]:
    """The internal listener a backend cluster's DEGRADED priority-1 host names
    (contract.RESTING_LISTENER): Envoy sends an attempt there only while no healthy host of the
    backend is left, and it refuses at once, marked with RETRY_HEADER so that the route moves
    the request on (a route walking its chain by priority groups goes to its next group). The
    refusal is in the shape of the backend's API (its path), and its status is neither a 5xx,
    which outlier detection would count against the host, nor taken for the provider's own
    (the access log knows this listener)."""

    def refusal(api: str, match: dict[str, Any]) -> dict[str, Any]:
        return {
            "match": match,
            "direct_response": {"status": RESTING_STATUS, "body": {"inline_string": _RESTING.body_for(api).decode()}},
            "response_headers_to_add": [
                _set("content-type", "application/json"),
                _set(RETRY_HEADER, "resting"),
            ],
        }

    anthropic = {"prefix": "/", "headers": [{"name": ":path", "string_match": {"contains": "/messages"}}]}
    hcm = _any(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix=RESTING_LISTENER,
        route_config={
            "name": RESTING_LISTENER,
            "virtual_hosts": [
                {
                    "name": RESTING_LISTENER,
                    "domains": ["*"],
                    "routes": [refusal(errors.ANTHROPIC_API, anthropic), refusal(errors.OPENAI_API, {"prefix": "/"})],
                }
            ],
        },
        http_filters=[
            {
                "name": "envoy.filters.http.router",
                "typed_config": _any("envoy.extensions.filters.http.router.v3.Router"),
            }
        ],
    )
    return _any(
        "envoy.config.listener.v3.Listener",
        name=RESTING_LISTENER,
        internal_listener={},
        filter_chains=[{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    )
