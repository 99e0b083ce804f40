"""Reads the multi-document YAML a user would `kubectl apply` (files or folders).

Used by `signalbox up`/`validate`/the tests; the operator gets the same dicts from the API server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, Problem
from .gcpause import paused_gc
from .models import API_VERSION, KINDS


@dataclass
class Documents:
    """Signalbox objects found in the inputs, as plain dicts, by kind."""

    providers: list[dict[str, Any]] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)
    consumers: list[dict[str, Any]] = field(default_factory=list)


# libyaml's safe loader when PyYAML was built with it: the same documents, several times
# faster (a 4,000-object fleet took 4.6 s to read with the pure-Python one).
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# What a folder given as input contributes: its YAML files, at any depth.
YAML_SUFFIXES = (".yaml", ".yml")


def yaml_files(paths: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in YAML_SUFFIXES))
        else:
            files.append(path)
    return files


@paused_gc()
def load(paths: list[str | Path]) -> Documents:
    """Collect AIProvider, RoutingPolicy and Consumer objects; other kinds (Secrets, Deployments) are skipped.

    Raises ConfigError listing every unreadable file or document at once.
    """
    docs = Documents()
    problems: list[Problem] = []
    for file in yaml_files(paths):
        try:
            items = list(yaml.load_all(file.read_text(), Loader=SAFE_LOADER))
        except (OSError, yaml.YAMLError) as exc:
            problems.append(Problem("File", str(file), "$", f"cannot read YAML: {exc}"))
            continue
        for index, item in enumerate(items):
            if item is None:
                continue
            if not isinstance(item, dict):
                problems.append(Problem("File", str(file), f"$[{index}]", "document is not a mapping"))
                continue
            kind = item.get("kind")
            if kind not in KINDS:
                continue
            if item.get("apiVersion") != API_VERSION:
                name = str((item.get("metadata") or {}).get("name", "?"))
                problems.append(
                    Problem(str(kind), name, "apiVersion", f"must be {API_VERSION}, got {item.get('apiVersion')!r}")
                )
                continue
            {"AIProvider": docs.providers, "RoutingPolicy": docs.policies, "Consumer": docs.consumers}[kind].append(
                item
            )
    if problems:
        raise ConfigError(problems)
    return docs
