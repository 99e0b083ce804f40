"""The operator's command-line arguments, apart from the operator: `signalbox`'s parser is
built by every command, the ext_proc workers' included, and importing the operator for it
loaded kopf, the Kubernetes client and pydantic into each worker (about 1.1 s and tens of MB
each, issue 12)."""

from __future__ import annotations

import argparse
import os


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
