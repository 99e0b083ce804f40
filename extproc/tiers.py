"""The classification tiers in order, cheapest first, stopping at the first confident answer.

Tier 1 (rules, microseconds) always runs. Tier 2 (semantic) runs when the policy declares routes
and the rules were less confident than the policy's threshold; its route becomes the class that
adaptive routing learns per backend.
"""

from __future__ import annotations

from .classify import Classification, CompiledRule, Features, classify
from .runtime import PolicyRuntime
from .semantic import Classifier


def classify_request(policy: PolicyRuntime, features: Features) -> Classification:
    return classify_tiers(features, policy.rules, policy.semantic, policy.semantic_min_rules_confidence)


def classify_tiers(
    features: Features,
    rules: tuple[CompiledRule, ...],
    semantic: Classifier | None,
    min_rules_confidence: float,
) -> Classification:
    """Tiers 1 and 2 as every policy runs them (and `make eval` measures them: one definition)."""
    result = classify(features, rules)
    if semantic is None or result.confidence >= min_rules_confidence:
        return result
    hit = semantic.classify(features.text)
    if hit is None:
        return result
    task, complexity = hit.task_type or result.task_type, hit.complexity or result.complexity
    return Classification(
        task_type=task,
        complexity=complexity,
        tier="semantic",
        confidence=round(hit.similarity, 4),
        reason=hit.name,
        estimated_tokens=result.estimated_tokens,
        class_key=hit.name if hit.is_class else f"{task}/{complexity}",
    )
