"""Token usage and its price.

Usage is read from responses by Envoy itself (its JSON and SSE readers) and reported through the access
log (accesslog.py); cost comes from the prices of the backend that actually answered.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


# Output tokens presumed for a request that sets no max_tokens, before it is answered.
DEFAULT_OUTPUT_TOKENS = 256


def cost_usd(usage: Usage, input_price_per_1m: float, output_price_per_1m: float) -> float:
    return (usage.prompt_tokens * input_price_per_1m + usage.completion_tokens * output_price_per_1m) / 1e6


def expected_usage(estimated_prompt_tokens: int, max_output_tokens: int) -> Usage:
    """What a request is presumed to use before it is answered: its prompt estimate and its
    max_tokens, or DEFAULT_OUTPUT_TOKENS. Cost routing ranks backends by it, and a budgeted
    request holds its cost while in flight."""
    return Usage(estimated_prompt_tokens, max_output_tokens or DEFAULT_OUTPUT_TOKENS)
