"""A RoutingPolicy's rollout, for its status (`kubectl describe rp`, `kubectl get rp`).

The gateways count a rollout's figures and pause a failing candidate themselves
(`signalbox.extproc.rolloutstats`); each replica publishes its figures in its key of the replica
ConfigMap. The operator only reports: it sums the figures of the rollout's current epoch
(`signalbox.core.rollouts`: the digest of spec.rollout and the candidate's spec, computed here
as the compiler computes it) into `status.rollout`. The reconciler turns `status.rollout.state`
into the `RolloutProgressing` condition, and its Event when the rollout pauses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from signalbox.core import rollouts
from signalbox.core.compiler import rollout_epoch
from signalbox.core.models import RolloutMode, RoutingPolicySpec
from signalbox.core.replicastate import decode_rollouts

PROGRESSING = "RolloutProgressing"


def summarize(
    policy_spec: Mapping[str, Any], candidate_spec: Mapping[str, Any] | None, replicas: Mapping[str, str]
) -> dict[str, Any] | None:
    """`status.rollout` of a live policy from the replica ConfigMap's data; None when it has no
    valid rollout or its candidate is missing or invalid (the reconciler reports why)."""
    try:
        spec = RoutingPolicySpec.model_validate(policy_spec)
        candidate = RoutingPolicySpec.model_validate(candidate_spec) if candidate_spec is not None else None
    except ValidationError:
        return None
    if spec.rollout is None or candidate is None:
        return None
    run = rollout_epoch(spec.rollout, candidate)
    parts = [decode_rollouts(raw).get(run, {}) for key, raw in replicas.items() if key.endswith(".json")]
    rule = rollouts.PauseRule(spec.rollout.max_error_rate, spec.rollout.min_requests)
    canary = spec.rollout.mode == RolloutMode.CANARY
    return rollouts.status(spec.rollout.candidate, canary, spec.rollout.percent, run, rollouts.total(parts), rule)


def condition_of(rollout: Mapping[str, Any], status: Mapping[str, Any] | None) -> tuple[bool, str, str]:
    """(status, reason, message) of the RolloutProgressing condition of a policy with
    `spec.rollout` = `rollout` and `status.rollout` = `status` (None until first reported). The
    figures stay in status.rollout: the condition changes only with the state."""
    if status and status.get("state") == rollouts.PAUSED_STATE:
        return False, "PausedOnErrors", str(status.get("message") or "the candidate failed too often")
    candidate = rollout.get("candidate", "")
    if rollout.get("mode") == RolloutMode.CANARY.value:
        return True, rollouts.CANARY, f"candidate {candidate} serves {rollout.get('percent', 0)} % of requests"
    return True, rollouts.SHADOW, f"candidate {candidate} decides every request in shadow; the live policy serves"
