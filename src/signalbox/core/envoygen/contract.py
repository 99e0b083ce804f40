"""The one home of the Envoy <-> ext_proc contract: the names both sides spell.

Header names, the metadata namespace and its keys, the attributes the router phase gets, the
API paths, the answers both give (models listing, empty-body and size messages). The generator
(this package) and the ext_proc (`signalbox.extproc`) import them from here and nowhere else.
"""

from __future__ import annotations

import json

# Gateway-owned request headers. Clients cannot set them (a header_mutation filter removes them
# before the router phase sees the request) and providers never see them (the upstream filter
# chain removes them after the upstream phase).
# The model the body already names: the upstream phase rewrites the body only when it differs.
BODY_MODEL_HEADER = "x-signalbox-body-model"
# The backend the target route prepared the first attempt for (path, authority; Envoy adds keys).
PREPARED_HEADER = "x-signalbox-prepared"
# The client's path, for the upstream phase of a failover attempt (`:path` is already rewritten):
# Envoy keeps it in x-envoy-original-path when a route rewrites the path.
PATH_HEADER = "x-envoy-original-path"
GATEWAY_HEADERS = (BODY_MODEL_HEADER, PREPARED_HEADER, PATH_HEADER)
# What the router phase reads of a request besides its body, sent with the body as attributes
# (CEL expressions): these, and `request.headers['<name>']` for each header a policy matches
# on or hashes by (`router_attributes`). Envoy cannot send the whole header map.
ROUTER_ATTRIBUTES = ("request.path", "request.method", "request.id", "source.address")
HEADER_ATTRIBUTE = "request.headers['{}']"
# Why a bodyless request is refused, by kind of path (Envoy's routes answer the requests that
# never reach the ext_proc; the ext_proc gives the same answer to a headers-first stream).
EMPTY_BODY = {
    "route": "request body is empty; a JSON body with 'model' is required",
    "feedback": 'feedback needs a JSON body: {"decision": ..., "score": 0..1}',
}
METADATA_NS = "signalbox"
EXTPROC_CLUSTER = "signalbox_extproc"
# HTTP 510 (Not Extended): the status Envoy's ext_proc filter answers when the processor
# cannot be reached or fails; mapped to 503 routing_unavailable before any client sees it.
EXTPROC_FAILED_STATUS = 510
ADMIN_CLUSTER = "signalbox_envoy_admin"
EXTPROC_ADMIN_CLUSTER = "signalbox_extproc_admin"
LISTENER_NAME = "signalbox_gateway"
HEALTH_LISTENER_NAME = "signalbox_health"
EMBEDDINGS_PATH = "/v1/embeddings"
# Paths whose POST bodies are routed by a policy, and the gateway's own endpoints.
ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions", EMBEDDINGS_PATH)
MODELS_PATH = "/v1/models"
FEEDBACK_PATH = "/v1/feedback"
API_PATHS = (*ROUTED_PATHS, MODELS_PATH)


def models_listing(aliases: list[str]) -> bytes:
    """What `GET /v1/models` on the gateway answers: the aliases clients may send."""
    data = [{"id": a, "object": "model", "created": 0, "owned_by": "signalbox"} for a in aliases]
    return json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()


def too_large_message(limit: int) -> str:
    return f"request body exceeds the gateway's limit of {limit} bytes"
