"""The classification tiers in order, cheapest first, stopping at the first confident answer.

Tier 1 (rules, microseconds) always runs. Tier 2 (semantic) runs when the policy declares routes
and the rules were less confident than the policy's threshold; its route becomes the class that
adaptive routing learns per backend.
"""

from __future__ import annotations

from .classify import Classification, Features, classify
from .runtime import PolicyRuntime


def classify_request(policy: PolicyRuntime, features: Features) -> Classification:
    result = classify(features, policy.rules)
    if policy.semantic is None or result.confidence >= policy.semantic_min_rules_confidence:
        return result
    hit = policy.semantic.classify(features.text)
    if hit is None:
        return result
    return Classification(
        task_type=hit.task_type or result.task_type,
        complexity=hit.complexity or result.complexity,
        tier="semantic",
        confidence=round(hit.similarity, 4),
        reason=hit.name,
        estimated_tokens=result.estimated_tokens,
        class_key=hit.name,
    )
