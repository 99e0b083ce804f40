"""`signalbox operator`: run the kopf operator (one active replica through kopf peering)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import kopf

from .handlers import build_registry
from .kube import ClusterAPI, api_client
from .reconciler import OperatorConfig

log = logging.getLogger("signalbox.operator")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch only these namespaces (repeatable; globs allowed)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster (default)")
    parser.add_argument(
        "--configmap",
        default="signalbox-system/signalbox-routing",
        help="NAMESPACE/NAME of the ConfigMap the compiled routing config is published to",
    )
    parser.add_argument("--server", help="Kubernetes API URL (default: in-cluster config, then kubeconfig)")
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="no peering: for single-replica installs and tests (default: kopf peering)",
    )
    parser.add_argument("--peering", default="signalbox", help="kopf peering object name")
    parser.add_argument("--no-probes", action="store_true", help="disable active health probes")
    parser.add_argument(
        "--replica-configmap",
        default="",
        help="NAMESPACE/NAME of the ConfigMap gateway replicas publish their spend to: budgeted "
        "RoutingPolicies then show it in status.budget (default: not reported)",
    )
    parser.add_argument(
        "--budget-status-seconds",
        type=float,
        default=15.0,
        help="how often status.budget is refreshed (AIProvider status.cooldowns: at least every 5 s)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("SIGNALBOX_REDIS_URL", ""),
        help="the gateways' limit store: budgeted Consumers show their spend in status.spend "
        "(password from $SIGNALBOX_REDIS_PASSWORD; default $SIGNALBOX_REDIS_URL, else not reported)",
    )
    parser.add_argument("--debounce-seconds", type=float, default=0.3)
    parser.add_argument("--log-level", default="info")


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
