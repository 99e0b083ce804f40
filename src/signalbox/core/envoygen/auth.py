"""Consumers in Envoy: JWTs are verified by Envoy's own jwt_authn before the router phase.

One jwt_authn provider per trusted issuer (`cfg.jwt_providers`). A request may carry no token,
or a gateway API key where a token would be (`Authorization: Bearer sbx-...`), so the rule is
"any of these providers, or missing or failed": jwt_authn never refuses, and a verified
token's payload lands in metadata (JWT_NAMESPACE / JWT_PAYLOAD_KEY), which the router phase
reads to name the consumer. A token that fails verification leaves no payload, so its caller
is anonymous and gets the 401 of a policy that does not serve anonymous callers.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from signalbox.api.v1alpha1 import config_pb2 as pb

from .contract import JWT_PAYLOAD_KEY
from .options import SYSTEM_CA_FILE, _address, _any, upstream_tls

# How long Envoy keeps a fetched JWKS before fetching it again.
JWKS_CACHE_SECONDS = 600


def jwks_cluster_name(provider: pb.JwtProvider) -> str:
    return f"jwks.{provider.name}"


def _provider(p: pb.JwtProvider) -> dict[str, Any]:
    out: dict[str, Any] = {
        "issuer": p.issuer,
        "audiences": list(p.audiences),
        "from_headers": [{"name": "Authorization", "value_prefix": "Bearer "}],
        "payload_in_metadata": JWT_PAYLOAD_KEY,
        # The token reaches no provider: every attempt removes key headers anyway.
        "forward": False,
    }
    if p.jwks:
        out["local_jwks"] = {"inline_string": p.jwks}
    else:
        out["remote_jwks"] = {
            "http_uri": {"uri": p.jwks_uri, "cluster": jwks_cluster_name(p), "timeout": "5s"},
            "cache_duration": f"{JWKS_CACHE_SECONDS}s",
            "async_fetch": {"fast_listener": False},
        }
    return out


def jwt_filter(cfg: pb.RoutingConfig) -> dict[str, Any] | None:
    if not cfg.jwt_providers:
        return None
    names = [p.name for p in cfg.jwt_providers]
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": _any(
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            providers={p.name: _provider(p) for p in cfg.jwt_providers},
            rules=[
                {
                    "match": {"prefix": "/"},
                    "requires": {
                        "requires_any": {
                            "requirements": [{"provider_name": n} for n in names] + [{"allow_missing_or_failed": {}}]
                        }
                    },
                }
            ],
        ),
    }


def jwks_clusters(cfg: pb.RoutingConfig, ca_file: str = SYSTEM_CA_FILE) -> list[dict[str, Any]]:
    """A cluster per remotely fetched JWKS (its URL's host)."""
    out = []
    for p in cfg.jwt_providers:
        if not p.jwks_uri:
            continue
        url = urlsplit(p.jwks_uri)
        tls = url.scheme == "https"
        host = url.hostname or ""
        cluster: dict[str, Any] = {
            "name": jwks_cluster_name(p),
            "type": "STRICT_DNS",
            "dns_lookup_family": "V4_PREFERRED",
            "connect_timeout": "5s",
            "load_assignment": {
                "cluster_name": jwks_cluster_name(p),
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": _address(host, url.port or (443 if tls else 80))}}]}
                ],
            },
        }
        if tls:
            cluster["transport_socket"] = upstream_tls(host, ca_file)
        out.append(_any("envoy.config.cluster.v3.Cluster", **cluster))
    return out
