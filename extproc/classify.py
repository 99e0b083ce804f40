"""Classification tier 1: request features and rules (microseconds, no model).

`features()` reads what the parsed body says about itself (tokens, tools, images, JSON mode);
`classify()` runs the policy's rules, then the built-in defaults, and returns task type,
complexity, the tier that decided and a confidence. Later tiers (semantic, LLM) plug in after
this one and run only when its confidence is below their threshold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core.rules import RuleMatcher, rule_matcher
from signalbox.core.rules import words as _words

# Rough but stable: OpenAI-family tokenizers average ~4 characters per English token.
CHARS_PER_TOKEN = 4
# What a request is about is stated at its start ("Summarize the following ...") or its end
# ("... summarize the above"): the tiers read that much of each end of the last user message,
# so their cost stays bounded for long documents. Token estimates use the whole prompt.
CLASSIFY_CHARS = 400


def classified_text(text: str) -> str:
    """What the tiers read of a last user message: all of it, or each end of a long one."""
    if len(text) <= 2 * CLASSIFY_CHARS:
        return text
    return f"{text[:CLASSIFY_CHARS]}\n{text[-CLASSIFY_CHARS:]}"


@dataclass(frozen=True, slots=True)
class Features:
    text: str  # the last user message: what the request is about
    estimated_tokens: int  # the whole prompt, for context-window checks
    max_output_tokens: int
    has_tools: bool
    has_images: bool
    json_mode: bool
    stream: bool
    # An embeddings request (by path): only models with the `embeddings` capability serve it.
    embeddings: bool = False


@dataclass(frozen=True, slots=True)
class Classification:
    task_type: str
    complexity: str
    tier: str
    confidence: float
    reason: str
    estimated_tokens: int
    # What adaptive learning is keyed by: the semantic route, else "task/complexity".
    class_key: str = ""


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    regex: RuleMatcher | None
    min_tokens: int
    max_tokens: int
    has_tools: int
    has_images: int
    json_mode: int
    task_type: str
    complexity: str
    confidence: float
    tier: str

    def fires(self, f: Features) -> bool:
        if self.min_tokens >= 0 and f.estimated_tokens < self.min_tokens:
            return False
        if self.max_tokens >= 0 and f.estimated_tokens > self.max_tokens:
            return False
        for flag, value in (
            (self.has_tools, f.has_tools),
            (self.has_images, f.has_images),
            (self.json_mode, f.json_mode),
        ):
            if flag and (flag == 1) != value:
                return False
        return self.regex is None or self.regex.search(f.text)


def _content_text(content: Any) -> tuple[str, bool]:
    """Text of a message's content and whether it has image parts."""
    if isinstance(content, str):
        return content, False
    if isinstance(content, list):
        texts, images = [], False
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if part.get("type") in ("text", "input_text") and isinstance(text, str):
                    texts.append(text)
                elif part.get("type") in ("image_url", "input_image", "image"):
                    images = True
        return "\n".join(texts), images
    return "", False


def _turns(items: list[Any]) -> tuple[int, str, bool]:
    """Characters, the last user text, and whether there are images, of chat messages or
    Responses input items (messages among tool calls and outputs)."""
    total_chars, last_user, images = 0, "", False
    for item in items:
        if not isinstance(item, dict):
            continue
        text, has_image = _content_text(item.get("content"))
        total_chars += len(text)
        images = images or has_image
        if item.get("role") == "user":
            last_user = text
    return total_chars, last_user, images


def features(body: dict[str, Any], embeddings: bool = False) -> Features:
    total_chars, last_user, images = 0, "", False
    messages = body.get("messages")
    items = body.get("input")
    if isinstance(messages, list):
        total_chars, last_user, images = _turns(messages)
    elif isinstance(items, list) and any(isinstance(i, dict) for i in items):
        total_chars, last_user, images = _turns(items)
    else:
        prompt = body.get("prompt", body.get("input", ""))
        # A string, or an array of strings (or of token ids, which carry no text to classify).
        last_user = (
            prompt
            if isinstance(prompt, str)
            else " ".join(p for p in prompt if isinstance(p, str))
            if isinstance(prompt, list)
            else ""
        )
        total_chars = len(last_user)
    response_format = body.get("response_format")
    json_mode = isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")
    max_out = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens") or 0
    if isinstance(max_out, bool):
        max_out = 0
    return Features(
        text=classified_text(last_user),
        estimated_tokens=total_chars // CHARS_PER_TOKEN + 1,
        max_output_tokens=max_out if isinstance(max_out, int) else 0,
        has_tools=bool(body.get("tools") or body.get("functions")),
        has_images=images,
        json_mode=json_mode,
        stream=body.get("stream") is True,
        embeddings=embeddings,
    )


# Built-in defaults, tried after a policy's own rules. Ordered: the first that fires decides the
# field it sets. Deliberately small and readable; the semantic tier is where accuracy comes from.
_DEFAULT_TASK_RULES: list[tuple[str, str, str]] = [
    (
        "code",
        "code-markers",
        r"```|\bdef \w+\(|\bfunction\s*\w*\(|#include|\bSELECT\b[^;]{0,200}?\bFROM\b|"
        r"=>|\bimport \w+|\bclass \w+[:({]|console\.log|\bstack ?trace\b|\btraceback\b",
    ),
    (
        "code",
        "code-words",
        _words(
            [
                "python",
                "javascript",
                "typescript",
                "java",
                "rust",
                "golang",
                "c++",
                "sql",
                "regex",
                "function",
                "compile",
                "compiler",
                "debug",
                "refactor",
                "unit test",
                "api endpoint",
                "script",
                "bash",
                "kubernetes yaml",
                "dockerfile",
                "algorithm",
                "bug",
            ]
        ),
    ),
    (
        "translation",
        "translate",
        r"\btranslat(e|ion)\b|\bin (french|spanish|german|italian|chinese|"
        r"japanese|portuguese|russian|korean|arabic)\b",
    ),
    (
        "summarization",
        "summarize",
        _words(["summarize", "summarise", "summary", "tl;dr", "tldr", "key points", "condense", "shorten this"]),
    ),
    (
        "math",
        "math",
        r"\d+\s*[-+*/^]\s*\d+|"
        + _words(
            [
                "solve",
                "equation",
                "integral",
                "derivative",
                "calculate",
                "probability",
                "percent",
                "arithmetic",
                "algebra",
                "geometry",
                "theorem",
                "prime",
                "how many",
                "sum of",
                "math",
            ]
        ),
    ),
    (
        "extraction",
        "extract",
        _words(
            [
                "extract",
                "list all",
                "pull out",
                "parse the",
                "fill in the json",
                "named entities",
                "classify the following",
            ]
        ),
    ),
    (
        "creative",
        "creative",
        _words(
            [
                "poem",
                "story",
                "haiku",
                "song",
                "lyrics",
                "limerick",
                "fiction",
                "creative",
                "slogan",
                "imagine",
                "screenplay",
                "joke",
            ]
        ),
    ),
    (
        "reasoning",
        "reasoning",
        _words(
            [
                "why",
                "explain",
                "compare",
                "pros and cons",
                "analyze",
                "analyse",
                "reason",
                "step by step",
                "trade-off",
                "tradeoffs",
                "evaluate",
                "argue",
                "implications",
            ]
        ),
    ),
    # Small talk often ends in "?" too; it must win over the question rule below.
    (
        "chat",
        "small-talk",
        r"^\W*(hi|hello|hey|good (morning|afternoon|evening)|thanks|thank you|how are you|"
        r"how's it going|what's up|nice to meet you)\b",
    ),
    ("qa", "question", r"^\s*(what|who|when|where|which|how|is|are|does|do|can)\b|\?\s*$"),
]
_EXPERT = _words(
    [
        "prove",
        "proof",
        "formal verification",
        "theorem",
        "research-level",
        "novel algorithm",
        "distributed consensus",
        "np-hard",
        "derive",
    ]
)
_COMPLEX = _words(
    [
        "step by step",
        "design",
        "architecture",
        "optimize",
        "analyze",
        "analyse",
        "in detail",
        "comprehensive",
        "trade-off",
        "tradeoffs",
        "multi-step",
        "refactor",
        "implement",
    ]
)


def _default_rules() -> list[CompiledRule]:
    def rule(
        name: str, pattern: str, task: str = "", complexity: str = "", confidence: float = 0.7, min_tokens: int = -1
    ) -> CompiledRule:
        return CompiledRule(
            name,
            RuleMatcher(re.compile(pattern, re.IGNORECASE)) if pattern else None,
            min_tokens,
            -1,
            0,
            0,
            0,
            task,
            complexity,
            confidence,
            "default",
        )

    rules = [rule(name, pattern, task=task) for task, name, pattern in _DEFAULT_TASK_RULES]
    rules += [
        rule("long-prompt", "", complexity="complex", confidence=0.6, min_tokens=1500),
        rule("expert-words", _EXPERT, complexity="expert"),
        rule("complex-words", _COMPLEX, complexity="complex", confidence=0.6),
    ]
    return rules


DEFAULT_RULES: tuple[CompiledRule, ...] = tuple(_default_rules())


def compile_rules(rules: Iterable[pb.Rule], use_defaults: bool) -> tuple[CompiledRule, ...]:
    out = []
    for r in rules:
        out.append(
            CompiledRule(
                r.name,
                # The same function the control plane validated these with (core/rules.py).
                rule_matcher(r.patterns, r.keywords),
                r.min_tokens,
                r.max_tokens,
                r.has_tools,
                r.has_images,
                r.json_mode,
                r.task_type,
                r.complexity,
                0.9,
                "rules",
            )
        )
    return tuple(out) + (DEFAULT_RULES if use_defaults else ())


def embeddings_class(f: Features) -> Classification:
    """Embeddings requests are not classified: there is no task to read, only text to embed."""
    return Classification("embeddings", "simple", "path", 1.0, "embeddings-path", f.estimated_tokens, "embeddings")


def _default_complexity(task: str, f: Features) -> str:
    if f.estimated_tokens > 600 or task in ("reasoning", "math", "code"):
        return "moderate"
    return "simple"


def classify(f: Features, rules: tuple[CompiledRule, ...]) -> Classification:
    """First rule to fire decides each field; a field no rule sets gets a low-confidence default."""
    task = complexity = ""
    task_rule = complexity_rule = None
    for rule in rules:
        wants_task = bool(rule.task_type) and not task
        wants_complexity = bool(rule.complexity) and not complexity
        if not (wants_task or wants_complexity) or not rule.fires(f):
            continue
        if wants_task:
            task, task_rule = rule.task_type, rule
        if wants_complexity:
            complexity, complexity_rule = rule.complexity, rule
        if task and complexity:
            break
    decider = task_rule or complexity_rule
    if not task:
        task = "chat"
    if not complexity:
        complexity = _default_complexity(task, f)
    confidence = decider.confidence if decider else 0.3
    tier = decider.tier if decider else "default"
    reason = "+".join(r.name for r in dict.fromkeys(x for x in (task_rule, complexity_rule) if x)) or "no-rule"
    return Classification(task, complexity, tier, confidence, reason, f.estimated_tokens, f"{task}/{complexity}")
