"""A backend's endpoint as Envoy holds it: its address, and the host name that says which
backend an attempt went to (read by the attempt marker, the logs and spans as
`%UPSTREAM_HOST_NAME%`).

One home for both ways a backend cluster gets its endpoint: inline in the cluster as generated
(STRICT_DNS, Envoy resolves the provider's host name; a bare generator run, or a gateway failing
open) or written into it by the ext_proc on its way to Envoy over ADS (`extproc.xds`, which
resolves the name itself and marks a resting backend's endpoint unhealthy), so the two can
never disagree on what an attempt reads.

A backend of a TLS endpoint many backends share is reached through the endpoint's *origin*
(`envoygen.origins`): an internal listener that hands each connection to one TLS cluster per
host, port and connect timeout. Its endpoint is then that listener, not an address.

How a cluster reaches its backend (REACHES: plain, its own TLS, or an origin) is part of the
resource its generated cluster names (`resource_name`, its EDS service name), and the ext_proc
writes into it only what that way of reaching takes. The file and the config a worker has
loaded can differ for a moment: a cluster that stopped speaking TLS (a provider's https://
turned http://, or its backends moved to an origin) is never given the provider's TLS address,
which would send a request, key and all, in clear text."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from signalbox.api.v1alpha1 import config_pb2 as pb

from .contract import RESTING_LISTENER
from .kept import kept

DEFAULT_CONNECT_TIMEOUT_MS = 2000
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")


# An endpoint's backends share its TLS context (an origin) from this many on. Each TLS context
# costs Envoy about 265 KB more than a plain cluster (the system CA bundle parsed again), and
# each request open through an origin about 24 KB more (two more connection objects), besides
# 20-36 us per attempt (`bench.tls_origin`): from 8 backends an endpoint saves at least
# 1.8 MB, what about 75 requests held open to it at once cost. A hosted provider with a few
# models keeps a TLS cluster per backend; a fleet of thousands shares.
ORIGIN_MIN_BACKENDS = 8
# How a backend cluster reaches its backend -> what its ADS resource adds to the cluster's name.
PLAIN, TLS, ORIGIN = "plain", "tls", "origin"
REACHES = {PLAIN: "", TLS: "/tls", ORIGIN: "/origin"}
ORIGIN_SUFFIX = REACHES[ORIGIN]
# A TLS backend cluster's transport socket for its resting listener's host (plain text: the
# listener is Envoy's own), chosen by the host's metadata under TRANSPORT_SOCKET_MATCH.
TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"
RESTING_MATCH = {"resting": True}


def resource_name(cluster: str, reach: str) -> str:
    """The ADS resource (ClusterLoadAssignment) a backend cluster reaching its backend so asks
    for (cluster names never hold a "/": compiler._cluster_name)."""
    return cluster + REACHES[reach]


def parse_resource(name: str) -> tuple[str, str]:
    """(cluster, reach) of a resource `resource_name` made."""
    cluster, slash, suffix = name.partition("/")
    reach = next((r for r, s in REACHES.items() if s == slash + suffix), "")
    return cluster, reach


def origin_name(provider: pb.Provider) -> str:
    """The origin (internal listener and TLS cluster, one name for both) a TLS provider's
    backends are reached through when they share it; "" for a provider without TLS. Providers
    that share a host, port and connect timeout share it."""
    if not provider.tls:
        return ""
    timeout = provider.connect_timeout_ms or DEFAULT_CONNECT_TIMEOUT_MS
    name = f"origin.{_UNSAFE.sub('_', provider.host)}.{provider.port}.{timeout}ms"
    if _UNSAFE.search(provider.host):
        # A host the name could not spell as it is (an IPv6 address): a digest of it keeps two
        # such hosts from sharing one origin, and one the other's traffic.
        name += "." + hashlib.blake2b(provider.host.encode(), digest_size=6).hexdigest()
    return name


def shared_origins(cfg: pb.RoutingConfig) -> dict[str, str]:
    """Provider id -> its origin, for the providers whose endpoint ORIGIN_MIN_BACKENDS or more
    backends reach: those backends share the origin's TLS context; the others keep a TLS
    cluster each. (Read-only: kept from one generation to the next, `kept`.)"""
    return kept(cfg, "shared_origins", functools.partial(_shared_origins, cfg), str(ORIGIN_MIN_BACKENDS))


def _shared_origins(cfg: pb.RoutingConfig) -> dict[str, str]:
    names = {p.id: origin_name(p) for p in cfg.providers}
    reached: dict[str, int] = {}
    for b in cfg.backends:
        name = names.get(b.provider_id, "")
        if name:
            reached[name] = reached.get(name, 0) + 1
    return {pid: name for pid, name in names.items() if reached.get(name, 0) >= ORIGIN_MIN_BACKENDS}


@dataclass(frozen=True, slots=True)
class BackendEndpoint:
    """What Envoy needs to reach one backend, and which backend its host is."""

    cluster: str
    backend: str
    host: str
    port: int
    # Its provider's origin (`origin_name`; "" without TLS): the internal listener an assignment
    # for the ORIGIN resource names.
    origin: str = ""

    @classmethod
    def of(cls, backend: pb.Backend, provider: pb.Provider) -> BackendEndpoint:
        return cls(
            cluster=backend.cluster,
            backend=backend.id,
            host=provider.host,
            port=provider.port,
            origin=origin_name(provider),
        )

    @property
    def reach(self) -> str:
        """How a cluster reaches this backend with its provider as it is now: by address (plain
        or TLS; a TLS provider always has an origin name) or through the shared origin is the
        generator's choice (`shared_origins`), which the resource names."""
        return TLS if self.origin else PLAIN

    def load_assignment(
        self, addresses: Sequence[str] | None = None, resting: bool = False, reach: str = "", refusing: bool = False
    ) -> dict[str, Any]:
        """The endpoints of the resource `resource_name(cluster, reach)` (`reach`: the
        provider's own way, `self.reach`, unless given): one host per address (`addresses`: the
        provider's resolved IPs; None: its host name, for Envoy to resolve), or for ORIGIN the
        one internal listener of its origin (which resolves the name itself), each UNHEALTHY
        while the backend rests so that every chain and compiled route passes over it (without
        `refusing`, Envoy's panic mode still uses it when nothing else is). A resource asked for a way
        the provider no longer takes (a TLS cluster of a provider now on http://, a plain one of
        a provider now on https://) gets no host: never an address its cluster would misuse.
        `refusing` (the ADS path, where clusters are STATIC): with the resting listener as a
        second host at priority 1, DEGRADED (`contract.RESTING_LISTENER`): Envoy picks it only
        when no healthy host is left (resting or ejected), and it refuses at once, which moves
        a chain walked by priority groups to its next group. (A TLS cluster reaches it in
        plain text: `RESTING_MATCH`.)"""
        reach = reach or self.reach
        endpoints = []
        if reach == ORIGIN:
            places: list[dict[str, Any]] = (
                [{"envoy_internal_address": {"server_listener_name": self.origin}}] if self.origin else []
            )
        elif reach == self.reach:
            places = [
                {"socket_address": {"address": address, "port_value": self.port}}
                for address in ([self.host] if addresses is None else addresses)
            ]
        else:
            places = []
        for place in places:
            # The host's name is the backend's id: what an attempt's marker, the logs and spans
            # read (`%UPSTREAM_HOST_NAME%`). Envoy neither resolves nor sends it (attempt.lua
            # sets the authority). It replaced host metadata (backend, provider, model, GenAI
            # name), which cost Envoy 5.3 KB a host, most of it for having metadata at all:
            # 30 MB of the 2,000-provider fleet's (issue 12); the provider and model are
            # attempt.lua's, looked up by this name on the answer's way back.
            endpoint: dict[str, Any] = {"endpoint": {"address": place, "hostname": self.backend}}
            if resting:
                endpoint["health_status"] = "UNHEALTHY"
            endpoints.append(endpoint)
        name = resource_name(self.cluster, reach)
        if not endpoints:
            return {"cluster_name": name, "endpoints": []}
        localities = [{"lb_endpoints": endpoints}]
        if refusing:
            localities.append(self._refusing(reach))
        return {"cluster_name": name, "endpoints": localities}

    def _refusing(self, reach: str) -> dict[str, Any]:
        """The priority-1 locality of the resting listener, its host named by the backend as
        the others are (the logs and attempt.lua read the backend from it)."""
        endpoint: dict[str, Any] = {
            "endpoint": {
                "address": {"envoy_internal_address": {"server_listener_name": RESTING_LISTENER}},
                "hostname": self.backend,
            },
            "health_status": "DEGRADED",
        }
        if reach == TLS:
            endpoint["metadata"] = {"filter_metadata": {TRANSPORT_SOCKET_MATCH: RESTING_MATCH}}
        return {"priority": 1, "lb_endpoints": [endpoint]}
