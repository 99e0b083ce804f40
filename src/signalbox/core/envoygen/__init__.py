"""Pure generation of Envoy resources from a RoutingConfig: a small package.

- `contract`: the names Envoy and the ext_proc share (headers, metadata, attributes, paths);
  the ext_proc imports them from there, and only there.
- `options`: how a gateway process is wired (`GatewayOptions`).
- `bootstrap`: the static bootstrap and the resource files Envoy watches.
- `clusters`: one cluster per backend (its endpoint carries `filter_metadata.signalbox`:
  backend, provider id, provider, model), one aggregate cluster per *target* (a policy's
  first choice and its failover chain), and the upstream filters every attempt runs: all key
  headers removed, the picked provider's key added by Envoy, the upstream-phase ext_proc only
  on attempts the target route did not prepare.
- `listener`: the router-phase ext_proc (one message: the body, with the headers policies
  read as attributes), one route per target matched on the target in dynamic metadata, the
  answers Envoy gives alone (models listing, refusals of bodyless requests), OpenAI-style
  local replies, accounting and the request log.

The same functions feed `signalbox up` (files Envoy watches) and the Helm chart, so a cluster
and a laptop run the same Envoy shape.
"""

from __future__ import annotations

from .bootstrap import bootstrap, resources
from .clusters import clusters, credential_file, credential_name, picked_host_not_of, prepared_for_picked_host
from .contract import (
    ADMIN_CLUSTER,
    API_PATHS,
    BODY_MODEL_HEADER,
    EMBEDDINGS_PATH,
    EMPTY_BODY,
    EXTPROC_ADMIN_CLUSTER,
    EXTPROC_CLUSTER,
    EXTPROC_FAILED_STATUS,
    FEEDBACK_PATH,
    GATEWAY_HEADERS,
    HEADER_ATTRIBUTE,
    HEALTH_LISTENER_NAME,
    LISTENER_NAME,
    METADATA_NS,
    MODELS_PATH,
    PATH_HEADER,
    PREPARED_HEADER,
    ROUTED_PATHS,
    ROUTER_ATTRIBUTES,
    models_listing,
    too_large_message,
)
from .listener import (
    REQUEST_LOG_FORMAT,
    accounting_log,
    health_listener,
    listener,
    request_log,
    router_attributes,
    usage_filter,
)
from .options import STREAM_LIMITS, GatewayOptions

__all__ = [
    "ADMIN_CLUSTER",
    "API_PATHS",
    "BODY_MODEL_HEADER",
    "EMBEDDINGS_PATH",
    "EMPTY_BODY",
    "EXTPROC_ADMIN_CLUSTER",
    "EXTPROC_CLUSTER",
    "EXTPROC_FAILED_STATUS",
    "FEEDBACK_PATH",
    "GATEWAY_HEADERS",
    "HEADER_ATTRIBUTE",
    "HEALTH_LISTENER_NAME",
    "LISTENER_NAME",
    "METADATA_NS",
    "MODELS_PATH",
    "PATH_HEADER",
    "PREPARED_HEADER",
    "REQUEST_LOG_FORMAT",
    "ROUTED_PATHS",
    "ROUTER_ATTRIBUTES",
    "STREAM_LIMITS",
    "GatewayOptions",
    "accounting_log",
    "bootstrap",
    "clusters",
    "credential_file",
    "credential_name",
    "health_listener",
    "listener",
    "models_listing",
    "picked_host_not_of",
    "prepared_for_picked_host",
    "request_log",
    "resources",
    "router_attributes",
    "too_large_message",
    "usage_filter",
]
