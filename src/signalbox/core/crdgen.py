"""CustomResourceDefinitions generated from `signalbox.core.models` (one source of truth).

pydantic's JSON Schema (2020-12) is turned into a Kubernetes *structural* OpenAPI v3 schema:
references inlined, `Optional[X]` reduced to X (absence is the Kubernetes way to say "unset"),
numeric `exclusiveMinimum` rewritten to the OpenAPI 3.0 boolean form, `additionalProperties:
false` dropped (the API server prunes unknown fields instead), titles removed. Descriptions,
defaults, enums, patterns and the models' CEL rules (`x-kubernetes-validations`) are kept.
`make crds` writes crds/*.yaml; CI fails when they differ from what this module produces.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from .models import GROUP, VERSION, AIProviderSpec, ConsumerSpec, RoutingPolicySpec

_CONDITIONS = {
    "type": "array",
    "description": "Latest observations of the object's state (Accepted, ResolvedRefs, Ready, Healthy).",
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
    "items": {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string", "description": "Condition type."},
            "status": {
                "type": "string",
                "enum": ["True", "False", "Unknown"],
                "description": "True, False or Unknown.",
            },
            "reason": {"type": "string", "description": "One-word CamelCase reason."},
            "message": {"type": "string", "description": "Human-readable details, with JSON paths of problems."},
            "observedGeneration": {"type": "integer", "description": "metadata.generation this was computed for."},
            "lastTransitionTime": {"type": "string", "format": "date-time", "description": "When status last changed."},
        },
    },
}

_PROVIDER_STATUS = {
    "type": "object",
    "description": "Written by the Signalbox operator.",
    "properties": {
        "observedGeneration": {"type": "integer", "description": "metadata.generation last processed."},
        "conditions": _CONDITIONS,
        "health": {
            "type": "object",
            "description": "Result of the active health probes.",
            "properties": {
                "healthy": {"type": "boolean", "description": "Whether routing may use this provider."},
                "latencyMs": {"type": "number", "description": "Latency of the last successful probe."},
                "lastProbeTime": {"type": "string", "format": "date-time", "description": "When it was last probed."},
                "lastTransitionTime": {
                    "type": "string",
                    "format": "date-time",
                    "description": "When healthy last changed.",
                },
                "consecutiveFailures": {"type": "integer", "description": "Failed probes in a row."},
                "consecutiveSuccesses": {"type": "integer", "description": "Successful probes in a row."},
                "message": {"type": "string", "description": "Outcome of the last probe."},
            },
        },
        "cooldowns": {
            "type": "array",
            "description": "Models the gateways keep new requests off for now, as their replicas last published "
            "(a 429 and its Retry-After, a rejected key, rate-limit headers near zero; refreshed every few seconds).",
            "items": {
                "type": "object",
                "properties": {
                    "model": {"type": "string", "description": "Model name (spec.models[].name)."},
                    "reason": {
                        "type": "string",
                        "description": "rate_limited, key_rejected, unavailable (a 503 with Retry-After) or "
                        "low_remaining (the provider's rate-limit headers).",
                    },
                    "until": {"type": "string", "format": "date-time", "description": "When it ends."},
                    "replicas": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "Gateway replicas that saw why.",
                    },
                },
            },
        },
    },
}

_POLICY_STATUS = {
    "type": "object",
    "description": "Written by the Signalbox operator.",
    "properties": {
        "observedGeneration": {"type": "integer", "description": "metadata.generation last processed."},
        "conditions": _CONDITIONS,
        "backends": {"type": "integer", "description": "Healthy backends this policy can route to."},
        "configGeneration": {"type": "integer", "description": "Routing config generation that carries it."},
        "budget": {
            "type": "object",
            "description": "What the gateway replicas have spent against spec.budget, as they last published it "
            "(refreshed every few seconds; the gateways enforce the budget themselves).",
            "properties": {
                "state": {
                    "type": "string",
                    "enum": ["ok", "downgrade", "exhausted"],
                    "description": "ok; downgrade (past downgradeAt of a limit); exhausted (a limit reached).",
                },
                "windows": {
                    "type": "array",
                    "description": "One entry per limit (hour, day).",
                    "items": {
                        "type": "object",
                        "properties": {
                            "window": {"type": "string", "description": "hour or day (UTC calendar windows)."},
                            "limitUsd": {"type": "number", "description": "The limit."},
                            "spentUsd": {"type": "number", "description": "Spent in this window, all replicas."},
                            "inFlightUsd": {
                                "type": "number",
                                "description": "Estimated cost of requests in flight, held against the limit.",
                            },
                            "resetsAt": {"type": "string", "format": "date-time", "description": "When it resets."},
                        },
                    },
                },
            },
        },
        "rollout": {
            "type": "object",
            "description": "The run of spec.rollout so far, summed over the gateway replicas as they last published "
            "it (refreshed every few seconds). Figures start afresh whenever spec.rollout or the candidate changes.",
            "properties": {
                "state": {
                    "type": "string",
                    "enum": ["Shadow", "Canary", "Paused"],
                    "description": "Shadow or Canary as declared; Paused when the candidate's error rate passed "
                    "spec.rollout.maxErrorRate (the live policy serves everything).",
                },
                "candidate": {"type": "string", "description": "The candidate policy."},
                "epoch": {"type": "string", "description": "Digest of spec.rollout and the candidate's spec."},
                "percent": {"type": "number", "description": "Canary: the share the candidate serves."},
                "requests": {"type": "integer", "description": "Requests of this policy during the run."},
                "candidateRequests": {
                    "type": "integer",
                    "description": "Of those, decided by the candidate (shadow: every one; canary: its share).",
                },
                "differingPercent": {
                    "type": "number",
                    "description": "Shadow: share of requests for which the candidate chose another backend.",
                },
                "candidateErrors": {
                    "type": "integer",
                    "description": "Canary: served by the candidate and failed (5xx, 429, broken stream); shadow: "
                    "requests it could not decide.",
                },
                "liveErrors": {"type": "integer", "description": "Served by the live policy and failed."},
                "liveCostUsd": {
                    "type": "number",
                    "description": "Canary: real cost of the live side; shadow: estimated cost of the live choices.",
                },
                "candidateCostUsd": {
                    "type": "number",
                    "description": "Canary: real cost of the candidate's side; shadow: estimated cost of its choices.",
                },
                "message": {"type": "string", "description": "Why it paused, and how to resume."},
            },
        },
    },
}


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    defs = schema.get("$defs", {})

    def convert(node: Any) -> Any:
        if isinstance(node, list):
            return [convert(n) for n in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[1]]
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            return convert(merged)
        if "anyOf" in node:
            options = [o for o in node["anyOf"] if o.get("type") != "null"]
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            if len(options) == 1:
                return convert({**options[0], **rest})
            return convert({**rest, "anyOf": options})
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in ("title", "$defs", "propertyNames"):
                continue
            if key == "default" and value is None:
                continue
            if key == "additionalProperties" and value is False:
                continue
            if key == "exclusiveMinimum" and not isinstance(value, bool):
                out["minimum"], out["exclusiveMinimum"] = value, True
                continue
            if key == "properties":
                out[key] = {k: convert(v) for k, v in value.items()}
                continue
            out[key] = convert(value)
        return out

    return convert(schema)


_CONSUMER_STATUS = {
    "type": "object",
    "description": "Written by the Signalbox operator.",
    "properties": {
        "observedGeneration": {"type": "integer", "description": "metadata.generation last processed."},
        "conditions": _CONDITIONS,
        "keySecret": {"type": "string", "description": "Secret holding the consumer's gateway API key (`api-key`)."},
        "keyRotation": {"type": "string", "description": "spec.apiKey.rotation the key in force was made for."},
        "previousKeyExpires": {
            "type": "string",
            "format": "date-time",
            "description": "When the rotated-out key (`previous-api-key`) stops working.",
        },
        "spend": {
            "type": "object",
            "description": "Spend against spec.limits.budget, as the limit store last said (refreshed every few "
            "seconds; the gateways enforce the limits themselves).",
            "properties": {
                "window": {"type": "string", "description": "The window closest to its limit (hour, day, month)."},
                "spentUsd": {"type": "number", "description": "Spent in that window, every replica."},
                "limitUsd": {"type": "number", "description": "Its limit."},
                "remainingUsd": {"type": "number", "description": "What is left of it."},
                "resetsAt": {"type": "string", "format": "date-time", "description": "When it resets."},
            },
        },
    },
}


def crd(
    kind: str, plural: str, short: str, spec_model: type[BaseModel], status: dict, columns: list[dict]
) -> dict[str, Any]:
    spec = structural(spec_model.model_json_schema(by_alias=True, mode="validation"))
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "signalbox"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["signalbox"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        *columns,
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": spec.get("description", ""),
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "signalbox.io/v1alpha1"},
                                "kind": {"type": "string", "description": kind},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def definitions() -> dict[str, dict[str, Any]]:
    """File name -> CRD object."""
    return {
        "aiproviders.yaml": crd(
            "AIProvider",
            "aiproviders",
            "aip",
            AIProviderSpec,
            _PROVIDER_STATUS,
            [
                {"name": "Type", "type": "string", "jsonPath": ".spec.type"},
                {"name": "Healthy", "type": "boolean", "jsonPath": ".status.health.healthy"},
                {"name": "Latency", "type": "number", "jsonPath": ".status.health.latencyMs", "description": "ms"},
                {"name": "Models", "type": "string", "jsonPath": ".spec.models[*].name"},
                {"name": "Resting", "type": "string", "jsonPath": ".status.cooldowns[*].model"},
            ],
        ),
        "routingpolicies.yaml": crd(
            "RoutingPolicy",
            "routingpolicies",
            "rp",
            RoutingPolicySpec,
            _POLICY_STATUS,
            [
                {"name": "Strategy", "type": "string", "jsonPath": ".spec.strategy"},
                {"name": "Accepted", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Accepted")].status'},
                {"name": "Backends", "type": "integer", "jsonPath": ".status.backends"},
                {"name": "Budget", "type": "string", "jsonPath": ".status.budget.state"},
                {"name": "Rollout", "type": "string", "jsonPath": ".status.rollout.state"},
            ],
        ),
        "consumers.yaml": crd(
            "Consumer",
            "consumers",
            "sbc",
            ConsumerSpec,
            _CONSUMER_STATUS,
            [
                {"name": "Team", "type": "string", "jsonPath": ".spec.team"},
                {"name": "Accepted", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Accepted")].status'},
                {"name": "Key", "type": "string", "jsonPath": ".status.keySecret"},
                {"name": "Spent", "type": "number", "jsonPath": ".status.spend.spentUsd", "description": "USD"},
                {"name": "Remaining", "type": "number", "jsonPath": ".status.spend.remainingUsd", "description": "USD"},
            ],
        ),
        "kopfpeerings.yaml": kopf_peering("KopfPeering", "kopfpeerings", "Namespaced"),
        "clusterkopfpeerings.yaml": kopf_peering("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
    }


def kopf_peering(kind: str, plural: str, scope: str) -> dict[str, Any]:
    """kopf's peering resource (one active operator replica), shipped so the chart installs it."""
    open_object = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev", "labels": {"app.kubernetes.io/part-of": "signalbox"}},
        "spec": {
            "group": "kopf.dev",
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "Liveness records of kopf operator replicas (one is active).",
                            "properties": {"spec": open_object, "status": open_object},
                        }
                    },
                }
            ],
        },
    }


def render(obj: dict[str, Any]) -> str:
    header = "# Generated by `make crds` from src/signalbox/core/models.py. Do not edit.\n"
    return header + yaml.safe_dump(obj, sort_keys=False, width=120)
