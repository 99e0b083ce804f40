"""The files a gateway pod's Envoy and ext_proc watch, written the same way everywhere.

`signalbox up` writes them after each local compile; in a cluster `signalbox config-sync`
writes them from the operator's ConfigMap. Order matters: the routing config first (the
ext_proc must know a backend before Envoy routes to it), then clusters, then the listener that
references them; each file is replaced by an atomic rename, so no reader sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from google.protobuf import json_format

from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core import envoygen

CONFIG_FILE = "config/routing-config.json"
ENVOY_DIR = "envoy"
# What the ext_proc workers of one gateway share (SQLite files: budget spend, learning; see
# signalbox.extproc.sharedstate). Not under config/: the ext_proc reloads on every change there.
STATE_DIR = "state"


def write_atomic(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(data)
    os.replace(tmp, path)


def publish(cfg: pb.RoutingConfig, workdir: Path, options: envoygen.GatewayOptions) -> None:
    write_atomic(workdir / CONFIG_FILE, json_format.MessageToJson(cfg))
    resources = envoygen.resources(cfg, options)
    for name in ("cds.json", "lds.json"):
        write_atomic(workdir / ENVOY_DIR / name, json.dumps(resources[name]))


def write_bootstrap(workdir: Path, options: envoygen.GatewayOptions) -> Path:
    path = workdir / "envoy-bootstrap.json"
    write_atomic(path, json.dumps(envoygen.bootstrap(options, str(workdir / ENVOY_DIR))))
    return path
