"""Data-plane compile stage: RoutingConfig -> RuntimeTable (immutable, built once per reload).

Everything the per-request path needs is precomputed here (regexes, alias lookup, provider
paths, resolved keys) so request code never parses config. The server swaps the table as one
reference; each gRPC stream reads the reference once.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core.budget import HOLD_SLACK_SECONDS, Budget
from signalbox.core.envoygen.contract import compiled_split, routes_key, split_text
from signalbox.core.envoygen.endpoints import BackendEndpoint, origin_name
from signalbox.core.errors import OPENAI_API, RESPONSES_API, ConfigVersionError
from signalbox.core.limits import SubjectLimits
from signalbox.core.schema import BROKEN_STREAM_NAMES, SCHEMA_VERSION, STRATEGY_NAMES, genai_provider_name, provider_api
from signalbox.core.secrets import Prefixed, SecretValue

from . import default_routes
from .classify import CompiledRule, compile_rules
from .identity import Identities, subject_limits
from .semantic import Classifier, SemanticRouter

KeyResolver = Callable[[pb.Auth], SecretValue | None]
T = TypeVar("T")


def credential(auth: pb.Auth, value: str | None) -> SecretValue | None:
    """What a source's content gives to send: the key itself, or (format google-credentials) the
    access token source its credentials mint from; None when there is nothing usable."""
    value = (value or "").strip()
    if not value:
        return None
    if auth.format == pb.GOOGLE_CREDENTIALS:
        # Imported here: google-auth and its HTTP and crypto stack weigh 13.5 MB, which every
        # ext_proc worker would carry whether or not a provider uses Google credentials.
        from signalbox.core.googleauth import google_token

        return google_token(SecretValue(value))
    if auth.format == pb.AWS_CREDENTIALS:
        # Envoy signs with the file; a file without usable keys leaves the provider unroutable.
        from signalbox.core.awscreds import parse

        return SecretValue(value) if parse(value) is not None else None
    return SecretValue(value)


def default_key_resolver(secrets_dir: str | None = None) -> KeyResolver:
    """Resolve keys from env variables, files, or Secrets mounted as `<dir>/<ns>/<name>/<key>`."""

    def resolve(auth: pb.Auth) -> SecretValue | None:
        source = auth.WhichOneof("source")
        try:
            if source == "env":
                value = os.environ.get(auth.env)
            elif source == "file":
                value = Path(auth.file).read_text()
            elif source == "secret" and secrets_dir:
                s = auth.secret
                value = (Path(secrets_dir) / s.namespace / s.name / s.key).read_text()
            else:
                value = None
        except OSError:
            value = None
        return credential(auth, value)

    return resolve


@dataclass(frozen=True, slots=True)
class ProviderRuntime:
    id: str
    name: str
    azure: bool
    scheme: str
    authority: str
    base_path: str
    azure_api_version: str
    auth_header: str
    auth_value: SecretValue | None
    # Declared auth whose key could not be read (Secret not synced, env variable unset, file
    # unreadable): its backends are not routed to, never sent keyless.
    key_missing: bool = False
    # The API family it speaks ("openai" or "anthropic"): a client of the other is translated.
    api: str = OPENAI_API
    # Its `gen_ai.provider.name` (OpenTelemetry GenAI conventions) in metrics.
    genai_name: str = "openai"
    # Serves OpenAI's Responses API itself: a Responses client is passed through.
    responses_api: bool = False
    # Takes `stream_options` (usage asked for at the end of streams); false: sends none.
    stream_usage: bool = True
    # Its host, port and origin (`endpoints.origin_name`, "" without TLS): its backends'
    # endpoints are made from them when asked for (`BackendRuntime.endpoint`).
    host: str = ""
    port: int = 0
    origin: str = ""
    # The digest of the message it was built from: the next config's table keeps it while that
    # is unchanged (`RuntimeTable.from_config(reuse=...)`).
    built_from: bytes = field(default=b"", compare=False, repr=False)

    async def auth_headers(self) -> dict[str, str]:
        """The key header for the gateway's own calls to this provider (mirror, LLM tier); a
        minted token is revealed in a thread (it may wait on Google's token endpoint). Raises
        CredentialUnavailable when no token can be minted."""
        value = self.auth_value
        if value is None:
            return {}
        return {self.auth_header: await asyncio.to_thread(value.reveal) if value.minted else value.reveal()}

    def speaks(self, client_api: str) -> bool:
        """Whether a client of this API reaches it untranslated."""
        return client_api == self.api or (client_api == RESPONSES_API and self.responses_api)


@dataclass(frozen=True, slots=True)
class BackendRuntime:
    id: str
    provider: ProviderRuntime
    model: str
    upstream_model: str
    input_price: float
    output_price: float
    quality: float
    context_window: int
    capabilities: frozenset[str]
    latency_prior_ms: float
    # The Envoy cluster that reaches it (outlier ejections are reported per cluster).
    cluster: str = ""
    # The digest of the message it was built from: the next config's table keeps it while that
    # is unchanged (`RuntimeTable.from_config(reuse=...)`).
    built_from: bytes = field(default=b"", compare=False, repr=False)

    @property
    def endpoint(self) -> BackendEndpoint:
        """Its address and host name, as the ADS server gives them to Envoy (extproc.xds). Made
        when asked for, from its provider's: one object per backend held in every worker was
        0.7 MB at the 2,000-provider fleet, and only the worker holding Envoy's stream asks."""
        p = self.provider
        return BackendEndpoint(cluster=self.cluster, backend=self.id, host=p.host, port=p.port, origin=p.origin)


@dataclass(frozen=True, slots=True)
class Choice:
    """A backend as one policy sees it (only healthy backends with a target are choices)."""

    index: int
    backend: BackendRuntime
    weight: int
    priority: int
    target: str


@dataclass(frozen=True, slots=True)
class ClassRouteRuntime:
    task_types: frozenset[str]
    complexities: frozenset[str]
    choices: tuple[Choice, ...]


@dataclass(frozen=True, slots=True)
class LlmTierConfig:
    backend: BackendRuntime
    timeout_s: float
    min_confidence: float
    cache_size: int


@dataclass(frozen=True, slots=True)
class MirrorRuntime:
    backend: BackendRuntime
    percent: float
    max_in_flight: int


@dataclass(frozen=True, slots=True)
class PolicyRuntime:
    id: str
    name: str
    strategy: str
    headers: tuple[tuple[str, str], ...]
    path_prefixes: tuple[str, ...]
    choices: tuple[Choice, ...]
    # Declared backends, healthy or not, for explain output.
    all_backends: tuple[BackendRuntime, ...]
    hash_header: str
    exploration_rate: float
    ewma_alpha: float
    min_quality: Mapping[str, float]
    rules: tuple[CompiledRule, ...]
    routes: tuple[ClassRouteRuntime, ...]
    semantic: Classifier | None = None
    semantic_min_rules_confidence: float = 0.8
    learning: bool = False
    learning_exploration_rate: float = 0.0
    learning_prior_weight: float = 5.0
    # Learn per prompt too (neighbours.py): the router phase embeds the prompt.
    learning_per_prompt: bool = False
    quality_tolerance: float = -1.0  # negative: per-complexity minimum quality
    llm: LlmTierConfig | None = None
    budget: Budget | None = None
    # Envoy routes this policy alone (weighted_clusters): the ext_proc only explains it.
    compiled: bool = False
    # Where Envoy sends it, as the router phase passes a decision for it on (contract.SPLIT_KEY;
    # "" for a policy the router phase decides).
    split: str = ""
    # How long a request of this policy may stay open (its timeout plus slack): an open
    # request whose access log entry never comes stops counting after this (inflight.py).
    open_seconds: float = 330.0
    # Consumers declared: serve callers without a valid key or token anyway.
    allow_anonymous: bool = False
    # Limits of the whole policy (every caller), admitted with the consumer's (limits.py).
    limits: SubjectLimits | None = None
    # A candidate policy tried on this policy's traffic (rollout.py).
    rollout: pb.Rollout | None = None
    # Copies of a sampled share of requests to a backend being qualified (mirror.py).
    mirror: MirrorRuntime | None = None
    # Equal for two policies whose tiers 1 and 2 classify every request alike (same rules,
    # defaults and semantic routes): a rollout's candidate reuses the live classification.
    classifier_key: bytes = b""
    # A stream that breaks after tokens were sent: "close" (Envoy cuts it), "error" or
    # "continue" (the stream relay, relay.py).
    broken_stream: str = "close"
    # The digest of the message it was built from: the next config's table keeps it while that
    # is unchanged (`RuntimeTable.from_config(reuse=...)`).
    built_from: bytes = field(default=b"", compare=False, repr=False)

    def matches(self, path: str, headers: dict[str, str]) -> bool:
        if self.path_prefixes and not path.startswith(self.path_prefixes):
            return False
        return all(headers.get(name) == value for name, value in self.headers)


@dataclass(frozen=True)
class RuntimeTable:
    generation: int
    content_hash: str
    # alias -> policies, most specific (most header matches) first.
    by_alias: dict[str, tuple[PolicyRuntime, ...]]
    backends: dict[str, BackendRuntime]
    policies: tuple[PolicyRuntime, ...] = field(default=())
    identities: Identities = field(default_factory=Identities.empty)
    # What its decisions' routes depend on (contract.routes_key): Envoy's routes name it.
    routes_key: str = ""

    @functools.cached_property
    def by_id(self) -> dict[str, PolicyRuntime]:
        return {p.id: p for p in self.policies}

    @functools.cached_property
    def by_cluster(self) -> dict[str, BackendRuntime]:
        return {b.cluster: b for b in self.backends.values() if b.cluster}

    @property
    def aliases(self) -> list[str]:
        return sorted(self.by_alias)

    @property
    def providers_without_key(self) -> list[ProviderRuntime]:
        return sorted(
            {b.provider.id: b.provider for b in self.backends.values() if b.provider.key_missing}.values(),
            key=lambda p: p.id,
        )

    @classmethod
    def empty(cls) -> RuntimeTable:
        return cls(generation=0, content_hash="", by_alias={}, backends={})

    @classmethod
    def from_config(
        cls, cfg: pb.RoutingConfig, resolve_key: KeyResolver | None = None, reuse: RuntimeTable | None = None
    ) -> RuntimeTable:
        """The table of `cfg`. With `reuse` (the table in force), each provider, backend and
        policy whose message (and key, and the backends it names) is unchanged is taken from it
        instead of being built again: a change to one policy of the 2,000-provider fleet built
        14,000 objects anew, and a worker's RSS grew by 10-30 MB over its first changes with
        every rebuilt copy freed into the heap (bench/README.md, issue 12). Built objects are
        immutable, so sharing them between tables changes nothing a request sees."""
        if cfg.schema_version != SCHEMA_VERSION:
            raise ConfigVersionError(
                f"routing config schema version {cfg.schema_version} is not supported "
                f"(this data plane reads version {SCHEMA_VERSION})"
            )
        old = reuse or cls.empty()
        providers = _providers(cfg, resolve_key or default_key_resolver(), old)
        shared = _Shared()
        backends = []
        for b in cfg.backends:
            provider, digest = providers[b.provider_id], _digest(b)
            kept_backend = old.backends.get(b.id)
            if kept_backend and kept_backend.built_from == digest and kept_backend.provider is provider:
                backends.append(kept_backend)
            else:
                backends.append(_backend(b, provider, digest, shared))
        policies_list = []
        for p in cfg.policies:
            kept_policy, digest = old.by_id.get(p.id), _digest(p)
            if kept_policy and kept_policy.built_from == digest and _names_same_backends(kept_policy, p, backends):
                policies_list.append(kept_policy)
            else:
                policies_list.append(_policy(p, backends, digest, shared))
        policies = tuple(policies_list)
        by_alias: dict[str, list[PolicyRuntime]] = {}
        for policy, source in zip(policies, cfg.policies, strict=True):
            for alias in source.aliases:
                by_alias.setdefault(alias, []).append(policy)
        ordered = {
            a: tuple(sorted(ps, key=lambda p: (-len(p.headers), -len(p.path_prefixes), p.id)))
            for a, ps in by_alias.items()
        }
        return cls(
            generation=cfg.generation,
            content_hash=cfg.content_hash,
            by_alias=ordered,
            backends={b.id: b for b in backends},
            policies=policies,
            identities=Identities.from_config(cfg),
            routes_key=routes_key(cfg),
        )


class _Shared:
    """One object for equal values across a table's backends and policies. A value read from a
    message is a new object each time: at the 2,000-provider fleet the 10,000 backends' model
    names, prices, qualities and context windows, and the policies' minimum qualities, repeat
    a handful of values, and one object each was 2.6 MB of every worker (issue 12)."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[tuple[type, object], Any] = {}

    def __call__(self, value: T) -> T:
        # Keyed with its type: 1, 1.0 and True are equal, and a field keeps the type it has.
        return self._values.setdefault((type(value), value), value)  # type: ignore[no-any-return]

    def mapping(self, items: Iterable[tuple[str, float]]) -> Mapping[str, float]:
        """A read-only mapping, one for each distinct content."""
        key = tuple(sorted(items))
        return self._values.setdefault((MappingProxyType, key), MappingProxyType(dict(key)))  # type: ignore[no-any-return]


def _digest(message: pb.Provider | pb.Backend | pb.Policy) -> bytes:
    """What a built object is compared on with the next config's: its message's digest."""
    return hashlib.blake2b(message.SerializeToString(deterministic=True), digest_size=16).digest()


def _providers(cfg: pb.RoutingConfig, resolve_key: KeyResolver, old: RuntimeTable) -> dict[str, ProviderRuntime]:
    """Each provider by id, its key resolved again (a rotation changes no message)."""
    kept = {b.provider.id: b.provider for b in old.backends.values()}
    providers = {}
    for p in cfg.providers:
        has_auth = p.HasField("auth")
        key = resolve_key(p.auth) if has_auth else None
        auth_value = _with_prefix(p.auth.prefix, key) if has_auth else None
        before, digest = kept.get(p.id), _digest(p)
        if before and before.built_from == digest and _same_key(before.auth_value, auth_value):
            providers[p.id] = before
        else:
            providers[p.id] = _provider(p, auth_value, has_auth and key is None, digest)
    return providers


def _same_key(kept: SecretValue | None, new: SecretValue | None) -> bool:
    """Whether a provider kept from the table before sends the key it would now: a rotated
    key (config-sync rewrites the same config after one) builds the provider again, and so
    does a minted token's source, which is never revealed here (that may call the network)."""
    if kept is None or new is None:
        return kept is new
    return not kept.minted and not new.minted and kept.reveal() == new.reveal()


def _names_same_backends(kept: PolicyRuntime, p: pb.Policy, backends: list[BackendRuntime]) -> bool:
    """Whether the indices of an unchanged policy message still name the backend objects the
    kept policy holds (a backend added or removed before them shifts every index after it)."""
    named = [backends[b.backend] for b in p.backends]
    if len(named) != len(kept.all_backends) or any(a is not b for a, b in zip(named, kept.all_backends, strict=True)):
        return False
    mirror = backends[p.mirror.backend - 1] if p.HasField("mirror") and p.mirror.backend else None
    llm = backends[p.llm_backend - 1] if p.llm_backend else None
    return (kept.mirror.backend if kept.mirror else None) is mirror and (kept.llm.backend if kept.llm else None) is llm


def _provider(p: pb.Provider, auth_value: SecretValue | None, key_missing: bool, digest: bytes) -> ProviderRuntime:
    default_port = 443 if p.tls else 80
    return ProviderRuntime(
        id=p.id,
        name=p.name,
        azure=p.type == pb.AZURE_OPENAI,
        scheme="https" if p.tls else "http",
        authority=p.host if p.port == default_port else f"{p.host}:{p.port}",
        base_path=p.base_path,
        azure_api_version=p.azure_api_version,
        auth_header=p.auth.header if p.HasField("auth") else "",
        auth_value=auth_value,
        key_missing=key_missing,
        api=provider_api(p.type),
        genai_name=genai_provider_name(p.type),
        responses_api=p.responses_api and provider_api(p.type) == OPENAI_API,
        stream_usage=not p.no_stream_usage,
        host=p.host,
        port=p.port,
        origin=origin_name(p),
        built_from=digest,
    )


def _semantic(p: pb.Policy) -> Classifier | None:
    if p.semantic_routes:
        return SemanticRouter(p.semantic_routes, p.semantic_default_route)
    return default_routes.router() if p.use_default_rules else None


def _classifier_key(p: pb.Policy) -> bytes:
    """What tiers 1 and 2 read of a policy (tiers.classify_request), as deterministic bytes."""
    inputs = pb.Policy(
        rules=p.rules,
        use_default_rules=p.use_default_rules,
        semantic_routes=p.semantic_routes,
        semantic_default_route=p.semantic_default_route,
        semantic_min_rules_confidence=p.semantic_min_rules_confidence,
    )
    return inputs.SerializeToString(deterministic=True)


@functools.lru_cache(maxsize=256)
def _capabilities(names: tuple[str, ...]) -> frozenset[str]:
    """One frozenset per distinct list: most backends share theirs (10,000 sets were 2.7 MB of
    every worker at the 2,000-provider fleet)."""
    return frozenset(names)


def _backend(b: pb.Backend, provider: ProviderRuntime, digest: bytes, shared: _Shared) -> BackendRuntime:
    return BackendRuntime(
        id=b.id,
        provider=provider,
        model=shared(b.model),
        upstream_model=shared(b.upstream_model),
        input_price=shared(b.input_price_per_1m),
        output_price=shared(b.output_price_per_1m),
        quality=shared(b.quality),
        context_window=shared(b.context_window),
        capabilities=_capabilities(tuple(b.capabilities)),
        latency_prior_ms=shared(b.latency_prior_ms),
        cluster=b.cluster,
        built_from=digest,
    )


def _with_prefix(prefix: str, key: SecretValue | None) -> SecretValue | None:
    if key is None:
        return None
    return Prefixed(prefix, key) if key.minted else SecretValue(prefix + key.reveal())


def _policy(p: pb.Policy, backends: list[BackendRuntime], digest: bytes, shared: _Shared) -> PolicyRuntime:
    choices_by_index = {
        i: Choice(i, backends[pbb.backend], pbb.weight, pbb.priority, pbb.target)
        for i, pbb in enumerate(p.backends)
        if pbb.target and not backends[pbb.backend].provider.key_missing
    }
    choices = tuple(sorted(choices_by_index.values(), key=lambda c: (c.priority, c.index)))
    routes = tuple(
        ClassRouteRuntime(
            task_types=frozenset(r.task_types),
            complexities=frozenset(r.complexities),
            choices=tuple(choices_by_index[i] for i in r.backends if i in choices_by_index),
        )
        for r in p.routes
    )
    return PolicyRuntime(
        id=p.id,
        name=p.name,
        strategy=STRATEGY_NAMES[p.strategy],
        headers=tuple((h.name, h.value) for h in p.headers),
        path_prefixes=tuple(p.path_prefixes),
        choices=choices,
        all_backends=tuple(backends[b.backend] for b in p.backends),
        hash_header=p.hash_header,
        exploration_rate=p.exploration_rate,
        ewma_alpha=p.ewma_alpha or 0.3,
        min_quality=shared.mapping(p.min_quality.items()),
        rules=compile_rules(p.rules, p.use_default_rules),
        routes=routes,
        semantic=_semantic(p),
        semantic_min_rules_confidence=(
            p.semantic_min_rules_confidence if p.semantic_routes else default_routes.MIN_RULES_CONFIDENCE
        ),
        learning=p.learning,
        compiled=p.compiled,
        split=split_text(compiled_split(p)) if p.compiled else "",
        broken_stream=BROKEN_STREAM_NAMES[p.broken_stream],
        allow_anonymous=p.allow_anonymous,
        # A copy: a part of the config message keeps all of it in memory (upb's arena), and a
        # policy outlives its config when the next table reuses it.
        rollout=pb.Rollout.FromString(p.rollout.SerializeToString()) if p.HasField("rollout") else None,
        classifier_key=shared(_classifier_key(p)),
        mirror=MirrorRuntime(backends[p.mirror.backend - 1], p.mirror.percent, p.mirror.max_in_flight)
        if p.HasField("mirror") and p.mirror.backend
        else None,
        limits=subject_limits(f"policy:{p.id}", f"policy {p.name}", p.limits) if p.HasField("limits") else None,
        open_seconds=p.timeout_ms / 1000 + HOLD_SLACK_SECONDS,
        learning_exploration_rate=p.learning_exploration_rate,
        learning_prior_weight=p.learning_prior_weight,
        learning_per_prompt=p.learning_per_prompt,
        quality_tolerance=p.quality_tolerance,
        llm=LlmTierConfig(backends[p.llm_backend - 1], p.llm_timeout_ms / 1000, p.llm_min_confidence, p.llm_cache_size)
        if p.llm_backend
        else None,
        budget=Budget(
            p.budget.hourly_usd,
            p.budget.daily_usd,
            p.budget.downgrade_at,
            p.budget.reject_when_exhausted,
            hold_seconds=p.timeout_ms / 1000 + HOLD_SLACK_SECONDS,
        )
        if p.HasField("budget")
        else None,
        built_from=digest,
    )
