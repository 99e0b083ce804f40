"""A backend's endpoint as Envoy holds it: its address, and the host metadata attempt.lua, the
request log and spans read (which backend, provider and model an attempt went to).

One home for both ways a backend cluster gets its endpoint: inline in the cluster (STRICT_DNS,
Envoy resolves the provider's host name; a bare generator run) or from the ext_proc over ADS
(`extproc.xds`, which resolves the name itself and marks a resting backend's endpoint
unhealthy), so the two can never disagree on what an attempt reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from signalbox.api.v1alpha1 import config_pb2 as pb

from ..schema import genai_provider_name
from .contract import METADATA_NS

# The type of the resource a backend's cluster subscribes to over ADS.
LOAD_ASSIGNMENT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


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
        IPs; None: its host name, for Envoy to resolve), each UNHEALTHY while the backend rests
        so that every chain and compiled route passes over it (Envoy's panic mode still uses
        it when nothing in a chain is healthy)."""
        metadata = self.metadata()
        endpoints = []
        for address in [self.host] if addresses is None else addresses:
            endpoint: dict[str, Any] = {
                "endpoint": {
                    "address": {"socket_address": {"address": address, "port_value": self.port}},
                    "hostname": self.host,
                },
                "metadata": metadata,
            }
            if resting:
                endpoint["health_status"] = "UNHEALTHY"
            endpoints.append(endpoint)
        return {"cluster_name": self.cluster, "endpoints": [{"lb_endpoints": endpoints}] if endpoints else []}
