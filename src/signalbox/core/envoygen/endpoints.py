"""A backend's endpoint as Envoy holds it: its address, and the host metadata attempt.lua, the
request log and spans read (which backend, provider and model an attempt went to).

One home for both ways a backend cluster gets its endpoint: inline in the cluster (STRICT_DNS,
Envoy resolves the provider's host name; a bare generator run) or from the ext_proc over ADS
(`extproc.xds`, which resolves the name itself and marks a resting backend's endpoint
unhealthy), so the two can never disagree on what an attempt reads.

A backend of a TLS provider is reached through its endpoint's *origin* (`envoygen.origins`):
an internal listener that hands each connection to one TLS cluster per host, port and connect
timeout. Its endpoint is then that listener, not an address."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from signalbox.api.v1alpha1 import config_pb2 as pb

from ..schema import genai_provider_name
from .contract import METADATA_NS

# The type of the resource a backend's cluster subscribes to over ADS.
LOAD_ASSIGNMENT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
DEFAULT_CONNECT_TIMEOUT_MS = 2000
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")


def origin_name(provider: pb.Provider) -> str:
    """The origin (internal listener and TLS cluster, one name for both) a TLS provider's
    backends are reached through; "" for a provider without TLS. Providers that share a host,
    port and connect timeout share it (and so its TLS context: about 290 KB of Envoy each with
    the system CA bundle, bench/README.md)."""
    if not provider.tls:
        return ""
    timeout = provider.connect_timeout_ms or DEFAULT_CONNECT_TIMEOUT_MS
    name = f"origin.{_UNSAFE.sub('_', provider.host)}.{provider.port}.{timeout}ms"
    if _UNSAFE.search(provider.host):
        # A host the name could not spell as it is (an IPv6 address): a digest of it keeps two
        # such hosts from sharing one origin, and one the other's traffic.
        name += "." + hashlib.blake2b(provider.host.encode(), digest_size=6).hexdigest()
    return name


@dataclass(frozen=True, slots=True)
class BackendEndpoint:
    """What Envoy needs to reach one backend, and what its host says about it."""

    cluster: str
    backend: str
    provider_id: str
    provider: str
    model: str
    genai_provider: str
    host: str
    port: int
    # The internal listener this backend is reached through (`origin_name`), or "": its address.
    origin: str = ""

    @classmethod
    def of(cls, backend: pb.Backend, provider: pb.Provider) -> BackendEndpoint:
        return cls(
            cluster=backend.cluster,
            backend=backend.id,
            provider_id=provider.id,
            provider=provider.name,
            model=backend.model,
            genai_provider=genai_provider_name(provider.type),
            host=provider.host,
            port=provider.port,
            origin=origin_name(provider),
        )

    def metadata(self) -> dict[str, Any]:
        return {
            "filter_metadata": {
                METADATA_NS: {
                    "backend": self.backend,
                    "provider_id": self.provider_id,
                    "provider": self.provider,
                    "model": self.model,
                    # Spans' gen_ai.provider.name (envoygen.tracing).
                    "genai_provider": self.genai_provider,
                }
            }
        }

    def load_assignment(self, addresses: list[str] | None = None, resting: bool = False) -> dict[str, Any]:
        """The cluster's endpoints: one host per address (`addresses`: the provider's resolved
        IPs; None: its host name, for Envoy to resolve), or the one internal listener of its
        origin (which resolves the name itself: `addresses` unused), each UNHEALTHY while the
        backend rests so that every chain and compiled route passes over it (Envoy's panic mode
        still uses it when nothing in a chain is healthy)."""
        metadata = self.metadata()
        endpoints = []
        if self.origin:
            places: list[dict[str, Any]] = [{"envoy_internal_address": {"server_listener_name": self.origin}}]
        else:
            places = [
                {"socket_address": {"address": address, "port_value": self.port}}
                for address in ([self.host] if addresses is None else addresses)
            ]
        for place in places:
            endpoint: dict[str, Any] = {
                "endpoint": {"address": place, "hostname": self.host},
                "metadata": metadata,
            }
            if resting:
                endpoint["health_status"] = "UNHEALTHY"
            endpoints.append(endpoint)
        return {"cluster_name": self.cluster, "endpoints": [{"lb_endpoints": endpoints}] if endpoints else []}
