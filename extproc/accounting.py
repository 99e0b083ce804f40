"""Token usage and its price.

Usage is read from responses by Envoy itself (core/usage.lua) and reported through the access
log (accesslog.py); cost comes from the prices of the backend that actually answered.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


def cost_usd(usage: Usage, input_price_per_1m: float, output_price_per_1m: float) -> float:
    return (usage.prompt_tokens * input_price_per_1m + usage.completion_tokens * output_price_per_1m) / 1e6
