"""One compiler for the regular expressions of classification rules, shared by both compile stages.

The control plane (`compiler.py`, so `signalbox validate`, `signalbox up` and the operator)
and the data plane (`extproc/classify.py`, building the runtime table) call the same
`rule_matcher`, so a rule the control plane accepts is a rule the data plane loads: there is
no second way to combine patterns that could fail where the first did not.

A rule's patterns and keywords are joined into one alternation (one scan of the text, which
is what keeps the rules tier in microseconds). Joining is only safe for patterns that stand
alone inside `(?:...)`: global inline flags such as `(?i)` must lead the whole expression, and
groups (named or numbered, with back-references) would collide or renumber. So leading global
flags become scoped flags (`(?i)x` -> `(?i:x)`), a pattern with groups is kept as its own
compiled expression beside the joined one, and if the joined expression still does not
compile, every pattern is searched on its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# A pattern's leading global flags, e.g. "(?i)" or "(?ms)". Python 3.11 rejects global flags
# anywhere else, so only a leading group needs rewriting.
_GLOBAL_FLAGS = re.compile(r"^\(\?([aiLmsux]+)\)")


class RuleError(ValueError):
    """A pattern or keyword that cannot be compiled; `index` says which entry of its list."""

    def __init__(self, field: str, index: int, message: str):
        super().__init__(message)
        self.field = field
        self.index = index


@dataclass(frozen=True, slots=True)
class RuleMatcher:
    """Does a rule's text condition hold? One joined expression plus any that cannot be joined."""

    joined: re.Pattern[str] | None
    separate: tuple[re.Pattern[str], ...] = ()

    def search(self, text: str) -> bool:
        if self.joined is not None and self.joined.search(text) is not None:
            return True
        return any(p.search(text) is not None for p in self.separate)


def words(items: Iterable[str]) -> str:
    """One alternation inside a single pair of word boundaries: checking the boundary once per
    position instead of once per word is what keeps the rules tier fast on long texts."""
    items = [w for w in items if w]
    plain = sorted((re.escape(w) for w in items if w[:1].isalnum() and w[-1:].isalnum()), key=len, reverse=True)
    other = [re.escape(w) for w in items if not (w[:1].isalnum() and w[-1:].isalnum())]
    parts = ([rf"\b(?:{'|'.join(plain)})\b"] if plain else []) + other
    return "|".join(parts)


def _scoped(pattern: str) -> str:
    """`(?i)abc` -> `(?i:abc)`: the same meaning, and valid inside an alternation."""
    found = _GLOBAL_FLAGS.match(pattern)
    if not found:
        return pattern
    return f"(?{found.group(1)}:{pattern[found.end() :]})"


def check_pattern(pattern: str) -> re.Pattern[str]:
    """Compile one pattern as the data plane will (case-insensitive); ValueError says why not."""
    if not pattern:
        raise ValueError("an empty pattern matches every request; leave the condition out instead")
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None
    except (RecursionError, OverflowError) as exc:
        raise ValueError(f"regular expression too complex: {exc}") from None


def rule_matcher(patterns: Sequence[str], keywords: Sequence[str]) -> RuleMatcher | None:
    """The matcher for a rule's patterns and keywords, or None when it has neither.

    Raises RuleError naming the first bad entry; the control plane reports it with its JSON path.
    """
    joinable: list[str] = []
    separate: list[re.Pattern[str]] = []
    for i, pattern in enumerate(patterns):
        try:
            compiled = check_pattern(pattern)
        except ValueError as exc:
            raise RuleError("patterns", i, str(exc)) from None
        if compiled.groups or compiled.groupindex:
            separate.append(compiled)
        else:
            joinable.append(_scoped(pattern))
    for i, keyword in enumerate(keywords):
        if not keyword.strip():
            raise RuleError("keywords", i, "an empty keyword matches every request")
    if keywords:
        joinable.append(words(keywords))
    if not joinable and not separate:
        return None
    if not joinable:
        return RuleMatcher(None, tuple(separate))
    try:
        joined = re.compile("|".join(f"(?:{a})" for a in joinable), re.IGNORECASE)
    except (re.error, RecursionError, OverflowError):
        # Valid alone, not joined (e.g. a verbose-mode comment that would swallow the closing
        # parenthesis): search each on its own, slower but the same meaning.
        joined = None
        separate = [re.compile(p, re.IGNORECASE) for p in patterns] + (
            [re.compile(words(keywords), re.IGNORECASE)] if keywords else []
        )
    return RuleMatcher(joined, tuple(separate))
