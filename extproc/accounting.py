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


# Bytes of an answer per output token, when it reported no usage: a JSON answer is about its
# text (4 characters a token), a stream about one event per token, each with the whole chunk's
# JSON around it (OpenAI's and vLLM's: 150-250 bytes).
JSON_BYTES_PER_TOKEN = 4
SSE_BYTES_PER_TOKEN = 160


def estimated_usage(prompt_tokens: int, max_output_tokens: int, body_bytes: int, streamed: bool) -> Usage:
    """What an answer that reported no usage is counted and charged at: the prompt as estimated
    when the request was decided, and output from the answer's size, at most the request's
    max_tokens. Rough, and rather over than under (a budget errs towards spent); zero, what was
    counted before, let a provider without usage spend a budget without end."""
    per_token = SSE_BYTES_PER_TOKEN if streamed else JSON_BYTES_PER_TOKEN
    completion = -(-body_bytes // per_token)
    if max_output_tokens:
        completion = min(completion, max_output_tokens)
    return Usage(prompt_tokens, completion)
