"""Classification tier 3: a cheap model from a declared provider says what a request is.

It runs only when the rules and semantic tiers were unsure, asks for JSON, and answers from an
LRU cache keyed by the prompt's hash when it can. Any failure — timeout, HTTP error, an answer
that is not the expected JSON — returns None, and the request goes on with the earlier tiers'
answer: the classifier can slow a request by at most its timeout and never fails it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

from .classify import Classification
from .decide import upstream_path
from .runtime import LlmTierConfig

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("signalbox.extproc")

TASK_TYPES = ("chat", "qa", "summarization", "code", "math", "reasoning", "creative", "extraction", "translation")
COMPLEXITIES = ("simple", "moderate", "complex", "expert")
INSTRUCTION = (
    "Classify the user's request for a model router. Reply with one JSON object and nothing else: "
    f'{{"task_type": one of {list(TASK_TYPES)}, "complexity": one of {list(COMPLEXITIES)}}}.'
)
CONFIDENCE = 0.85


class LlmClassifier:
    def __init__(self) -> None:
        self.cache: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.session: aiohttp.ClientSession | None = None
        self.failures = 0

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def classify(self, cfg: LlmTierConfig, text: str, estimated_tokens: int) -> Classification | None:
        backend = cfg.backend
        if backend.provider.key_missing:
            return None  # never ask without the key; the table load already said why
        key = hashlib.sha256(f"{backend.id}\0{text}".encode()).hexdigest()
        answer = self.cache.get(key)
        if answer is None:
            try:
                answer = await asyncio.wait_for(self._ask(cfg, text), cfg.timeout_s)
            except Exception as exc:
                self.failures += 1
                log.info("llm tier (%s) gave no answer, keeping earlier tiers: %s", backend.id, type(exc).__name__)
                return None
            if cfg.cache_size:
                self.cache[key] = answer
                while len(self.cache) > cfg.cache_size:
                    self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        task, complexity = answer
        return Classification(
            task, complexity, "llm", CONFIDENCE, f"llm:{backend.model}", estimated_tokens, f"{task}/{complexity}"
        )

    async def _ask(self, cfg: LlmTierConfig, text: str) -> tuple[str, str]:
        backend, provider = cfg.backend, cfg.backend.provider
        import aiohttp  # 12.7 MB: only in workers whose policies have an LLM tier

        if self.session is None:
            self.session = aiohttp.ClientSession()
        url = f"{provider.scheme}://{provider.authority}{upstream_path(backend, '/v1/chat/completions')}"
        headers = await provider.auth_headers()
        body = {
            "model": backend.upstream_model,
            "messages": [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": text}],
            "temperature": 0,
            "max_tokens": 40,
            "response_format": {"type": "json_object"},
        }
        # Never follow a redirect: it would carry the key to wherever the provider points.
        async with self.session.post(url, json=body, headers=headers, allow_redirects=False) as response:
            if response.status != 200:
                raise ValueError(f"classifier answered HTTP {response.status}")
            response.raise_for_status()
            payload = await response.json(content_type=None)
        content = payload["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise ValueError("classifier answer has no text content")
        answer = json.loads(content[content.find("{") : content.rfind("}") + 1])
        if not isinstance(answer, dict):
            raise ValueError("classifier answer is not a JSON object")
        task, complexity = answer.get("task_type"), answer.get("complexity")
        if task not in TASK_TYPES or complexity not in COMPLEXITIES:
            raise ValueError(f"unexpected labels {task!r}/{complexity!r}")
        return task, complexity
