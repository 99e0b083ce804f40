"""Pure generation of Envoy resources from a RoutingConfig: a small package.

- `contract`: the names Envoy and the ext_proc share (headers, metadata, attributes, paths);
  the ext_proc imports them from there, and only there.
- `options`: how a gateway process is wired (`GatewayOptions`).
- `bootstrap`: the static bootstrap and the resource files Envoy watches.
- `endpoints`: a backend's endpoint (its address, and its host named by the backend's id),
  inline in its cluster or sent by the ext_proc over ADS.
- `clusters`: one cluster per backend, one aggregate cluster per *target* (a policy's
  first choice and its failover chain), and the upstream filters every attempt runs: all key
  headers removed, the picked provider's key added by Envoy, the picked backend named by one
  marker (its host's name), then its path, authority and body model (`core/attempt.lua`, one
  for the config): no Python on any attempt.
- `listener`: the compiled path (the alias read from the body by Envoy, routes per alias of a
  policy that needs no prompt, weighted_clusters, the ext_proc off), the decided path's
  router-phase ext_proc (one message: the body, with the headers policies read as
  attributes), one route per target matched on the target in dynamic metadata, the
  answers Envoy gives alone (models listing, refusals of bodyless requests), OpenAI-style
  local replies, accounting and the request log.

The same functions feed `signalbox up` (files Envoy watches) and the Helm chart, so a cluster
and a laptop run the same Envoy shape.
"""

from __future__ import annotations

from .bootstrap import (
    BINARY_FILES,
    RESOURCE_FILES,
    ResourceParts,
    bootstrap,
    resource_file,
    resource_parts,
    resources,
)
from .clusters import (
    ATTEMPT_ERRORS,
    Chain,
    ClusterSpec,
    attempt_marker,
    attempt_settings,
    attempt_source,
    backend_cluster_specs,
    backend_clusters,
    chain_members,
    chains_of,
    cluster_specs,
    clusters,
    credential_file,
    credential_name,
    larger_after,
    lua_literal,
    upstream_filters,
)
from .contract import (
    ADMIN_CLUSTER,
    ALIAS_KEY,
    ANTHROPIC_VERSION,
    API_PATHS,
    ATTEMPT_HEADER,
    BODY_MODEL_KEY,
    CLIENT_PATH_KEY,
    COMPILED_POLICY_TAG,
    EMBEDDINGS_PATH,
    EMPTY_BODY,
    EXTPROC_ADMIN_CLUSTER,
    EXTPROC_CLUSTER,
    EXTPROC_FAILED_STATUS,
    FEEDBACK_PATH,
    GATEWAY_HEADERS,
    HEADER_ATTRIBUTE,
    HEALTH_LISTENER_NAME,
    LARGER_AFTER_HEADER,
    LISTENER_NAME,
    METADATA_NS,
    MODELS_PATH,
    PATH_HEADER,
    ROUTED_PATHS,
    ROUTER_ATTRIBUTES,
    TRANSLATE_HEADER,
    models_listing,
    too_large_message,
)
from .listener import (
    COMPILED_REASONS,
    REQUEST_LOG_FORMAT,
    RouteParts,
    accounting_log,
    client_path_filter,
    health_listener,
    json_filter,
    listener,
    request_log,
    retry_policy_of,
    router_attributes,
    sse_usage_filter,
)
from .options import STREAM_LIMITS, SYSTEM_CA_FILE, GatewayOptions
from .origins import INTERNAL_LISTENER_EXTENSION, tls_origins

__all__ = [
    "ADMIN_CLUSTER",
    "ALIAS_KEY",
    "ANTHROPIC_VERSION",
    "API_PATHS",
    "ATTEMPT_ERRORS",
    "ATTEMPT_HEADER",
    "BINARY_FILES",
    "BODY_MODEL_KEY",
    "CLIENT_PATH_KEY",
    "COMPILED_POLICY_TAG",
    "COMPILED_REASONS",
    "EMBEDDINGS_PATH",
    "EMPTY_BODY",
    "EXTPROC_ADMIN_CLUSTER",
    "EXTPROC_CLUSTER",
    "EXTPROC_FAILED_STATUS",
    "FEEDBACK_PATH",
    "GATEWAY_HEADERS",
    "HEADER_ATTRIBUTE",
    "HEALTH_LISTENER_NAME",
    "INTERNAL_LISTENER_EXTENSION",
    "LARGER_AFTER_HEADER",
    "LISTENER_NAME",
    "METADATA_NS",
    "MODELS_PATH",
    "PATH_HEADER",
    "REQUEST_LOG_FORMAT",
    "RESOURCE_FILES",
    "ROUTED_PATHS",
    "ROUTER_ATTRIBUTES",
    "STREAM_LIMITS",
    "SYSTEM_CA_FILE",
    "TRANSLATE_HEADER",
    "Chain",
    "ClusterSpec",
    "GatewayOptions",
    "ResourceParts",
    "RouteParts",
    "accounting_log",
    "attempt_marker",
    "attempt_settings",
    "attempt_source",
    "backend_cluster_specs",
    "backend_clusters",
    "bootstrap",
    "chain_members",
    "chains_of",
    "client_path_filter",
    "cluster_specs",
    "clusters",
    "compiled_routes",
    "credential_file",
    "credential_name",
    "health_listener",
    "json_filter",
    "larger_after",
    "listener",
    "lua_literal",
    "models_listing",
    "request_log",
    "resource_file",
    "resource_parts",
    "resources",
    "retry_policy_of",
    "router_attributes",
    "sse_usage_filter",
    "tls_origins",
    "too_large_message",
    "upstream_filters",
]
