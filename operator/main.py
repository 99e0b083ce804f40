"""`signalbox operator`: run the kopf operator (one active replica through kopf peering)."""

from __future__ import annotations

import argparse
import asyncio
import logging

import kopf

from .handlers import build_registry
from .kube import ClusterAPI, api_client
from .reconciler import OperatorConfig

log = logging.getLogger("signalbox.operator")


def config_from(args: argparse.Namespace) -> OperatorConfig:
    namespace, _, name = args.configmap.partition("/")
    if not name:
        raise SystemExit("--configmap must be NAMESPACE/NAME")
    replica_namespace, _, replica_name = args.replica_configmap.rpartition("/")
    if args.replica_configmap and not (replica_namespace and replica_name):
        raise SystemExit("--replica-configmap must be NAMESPACE/NAME")
    return OperatorConfig(
        configmap_namespace=namespace,
        configmap_name=name,
        debounce_seconds=args.debounce_seconds,
        probes=not args.no_probes,
        replica_configmap_namespace=replica_namespace,
        replica_configmap_name=replica_name,
        budget_status_seconds=args.budget_status_seconds,
        redis_url=args.redis_url,
        # What kopf is told to watch is what the settings (namespace scanning) are made for.
        namespaces=tuple(args.namespace),
    )


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    api = ClusterAPI(api_client(args.server))
    registry = build_registry(config, api, server=args.server)
    asyncio.run(
        kopf.operator(
            registry=registry,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            standalone=args.standalone,
            peering_name=args.peering,
            liveness_endpoint="http://0.0.0.0:8081/healthz",
        )
    )
    return 0
