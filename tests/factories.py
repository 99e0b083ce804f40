"""Builders of AIProvider / RoutingPolicy objects for tests (plain dicts, as kubectl sends them)."""

from __future__ import annotations

from typing import Any

import yaml

API = "signalbox.io/v1alpha1"


def model(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, **fields}


def provider(
    name: str,
    base_url: str,
    models: list[dict[str, Any]],
    namespace: str = "default",
    healthy: bool | None = None,
    **spec: Any,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": API,
        "kind": "AIProvider",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"type": "openai-compatible", "baseUrl": base_url, "models": models, **spec},
    }
    if healthy is not None:
        obj["status"] = {"health": {"healthy": healthy}}
    return obj


def backend(provider_name: str, model_name: str, **fields: Any) -> dict[str, Any]:
    return {"provider": provider_name, "model": model_name, **fields}


def policy(
    name: str,
    aliases: list[str],
    backends: list[dict[str, Any]],
    strategy: str = "weighted",
    namespace: str = "default",
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "RoutingPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"match": {"models": aliases}, "strategy": strategy, "backends": backends, **spec},
    }


def dump(*objects: dict[str, Any]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


def consumer(name: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "Consumer",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
