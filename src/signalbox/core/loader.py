"""Reads the multi-document YAML a user would `kubectl apply` (files or folders).

Used by `signalbox up`/`validate`/the tests; the operator gets the same dicts from the API server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, Problem
from .gcpause import paused_gc
from .models import API_VERSION, KINDS


@dataclass
class Documents:
    """Signalbox objects found in the inputs, as plain dicts, by kind."""

    providers: list[dict[str, Any]] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)
    consumers: list[dict[str, Any]] = field(default_factory=list)


# libyaml's safe loader when PyYAML was built with it: the same documents, several times
# faster (a 4,000-object fleet took 4.6 s to read with the pure-Python one).
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# What a folder given as input contributes: its YAML files, at any depth.
YAML_SUFFIXES = (".yaml", ".yml")


# A document marker: "---" at the start of a line, then a space or the line's end. YAML forbids
# it inside any scalar, so it always starts a new document.
_DOCUMENT_START = re.compile(r"^---(?=[ \t\r\n]|$)", re.MULTILINE)
# What makes a file's documents depend on more than their own text, or end otherwise: a
# directive (%YAML, %TAG) and a document end marker ("...").
_NOT_SPLIT = re.compile(r"^(%|\.\.\.(?=[ \t\r\n]|$))", re.MULTILINE)


def _has_content(piece: str) -> bool:
    """Whether text before a file's first marker holds a document (a line that is neither blank
    nor a comment)."""
    return any(line.strip() and not line.lstrip().startswith("#") for line in piece.splitlines())


class DocumentCache:
    """Parsed YAML documents by their text, from one load to the next.

    Why: `signalbox up` compiles every file again whenever one changes, and at the 2,000-provider
    fleet reading 4,000 documents was 0.6 s of every change (issue 12: a change should reach
    traffic in about a second). A document whose text did not change is not parsed again; the
    object is the same one as before (the compiler never changes its inputs, and its own cache,
    `compiler.ModelCache`, keys on it). What the last load did not see is forgotten.
    """

    def __init__(self) -> None:
        self._parsed: dict[str, list[Any]] = {}
        self._seen: dict[str, list[Any]] = {}

    def documents(self, text: str) -> list[Any]:
        """The documents in one file's text, as `yaml.load_all` gives them."""
        if _NOT_SPLIT.search(text):
            return list(yaml.load_all(text, Loader=SAFE_LOADER))
        starts = [m.start() for m in _DOCUMENT_START.finditer(text)]
        # Each piece holds one document, or none (comments before the first marker).
        pieces = [text[a:b] for a, b in zip([0, *starts], [*starts, len(text)], strict=True)]
        new = sum(p not in self._seen and p not in self._parsed for p in pieces)
        if 2 * new > len(pieces):
            self._parse_whole(text, pieces)
        out: list[Any] = []
        for piece in pieces:
            if piece in self._seen:
                found = self._seen[piece]
            elif piece in self._parsed:
                found = self._parsed[piece]
            else:
                try:
                    found = list(yaml.load_all(piece, Loader=SAFE_LOADER))
                except yaml.YAMLError:
                    # Said with the file's own line numbers.
                    return list(yaml.load_all(text, Loader=SAFE_LOADER))
            self._seen[piece] = found
            out.extend(found)
        return out

    def _parse_whole(self, text: str, pieces: list[str]) -> None:
        """Most pieces are new (a start, a file replaced): one parse of the whole text, its
        documents kept by piece, is faster than a parse per piece (the 2,000-provider fleet's
        4,000 documents: 0.91 against 1.12 s). Nothing is kept if the text does not parse, or
        its documents do not line up with the pieces: the pieces are then parsed one by one."""
        try:
            documents = list(yaml.load_all(text, Loader=SAFE_LOADER))
        except yaml.YAMLError:
            return
        # Every piece after the first starts with a marker: one document each (None if empty).
        counts = [int(i > 0 or _has_content(piece)) for i, piece in enumerate(pieces)]
        if sum(counts) != len(documents):
            return
        found = iter(documents)
        for piece, count in zip(pieces, counts, strict=True):
            self._parsed[piece] = [next(found) for _ in range(count)]

    def loaded(self) -> None:
        """One load is over: keep what it read, drop the rest."""
        self._parsed, self._seen = self._seen, {}


def yaml_files(paths: list[str | Path]) -> list[Path]:
    """The files to read, in order, each once (a file named again, or inside a folder also
    given, is not read twice: its objects would be defined twice)."""
    files: dict[Path, Path] = {}
    for raw in paths:
        path = Path(raw)
        found = sorted(p for p in path.rglob("*") if p.suffix in YAML_SUFFIXES) if path.is_dir() else [path]
        for file in found:
            files.setdefault(file.resolve(), file)
    return list(files.values())


@paused_gc()
def load(paths: list[str | Path], cache: DocumentCache | None = None) -> Documents:
    """Collect AIProvider, RoutingPolicy and Consumer objects; other kinds (Secrets, Deployments) are skipped.

    Raises ConfigError listing every unreadable file or document at once. `cache`: documents
    parsed by the last load with it, parsed again only if their text changed.
    """
    try:
        return _load(paths, cache)
    finally:
        if cache is not None:
            cache.loaded()


def _load(paths: list[str | Path], cache: DocumentCache | None) -> Documents:
    docs = Documents()
    problems: list[Problem] = []
    # Where each object was first defined: two of one kind, namespace and name are one object
    # in a cluster (the second `kubectl apply` replaces the first), so locally they are an error
    # naming both files, not two policies that then clash over their aliases.
    defined: dict[tuple[str, str, str], str] = {}
    for file in yaml_files(paths):
        try:
            text = file.read_text()
            items = cache.documents(text) if cache else list(yaml.load_all(text, Loader=SAFE_LOADER))
        except (OSError, yaml.YAMLError) as exc:
            problems.append(Problem("File", str(file), "$", f"cannot read YAML: {exc}"))
            continue
        for index, item in enumerate(items):
            if item is None:
                continue
            if not isinstance(item, dict):
                problems.append(Problem("File", str(file), f"$[{index}]", "document is not a mapping"))
                continue
            kind = item.get("kind")
            if kind not in KINDS:
                continue
            if item.get("apiVersion") != API_VERSION:
                name = str((item.get("metadata") or {}).get("name", "?"))
                problems.append(
                    Problem(str(kind), name, "apiVersion", f"must be {API_VERSION}, got {item.get('apiVersion')!r}")
                )
                continue
            meta = item.get("metadata")
            meta = meta if isinstance(meta, dict) else {}
            name, namespace = str(meta.get("name", "?")), str(meta.get("namespace") or "default")
            where = f"{file} (document {index + 1})"
            first = defined.setdefault((kind, namespace, name), where)
            if first != where:
                problems.append(
                    Problem(
                        kind,
                        name,
                        "metadata.name",
                        f"defined twice, in {first} and in {where}: in a cluster the second would replace the first",
                        namespace,
                    )
                )
                continue
            {"AIProvider": docs.providers, "RoutingPolicy": docs.policies, "Consumer": docs.consumers}[kind].append(
                item
            )
    if problems:
        raise ConfigError(problems)
    return docs
