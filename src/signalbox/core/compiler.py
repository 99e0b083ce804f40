"""Control-plane compile stage: CRD objects (plain dicts) -> one RoutingConfig + problems.

Pure: no Kubernetes or file I/O, so the operator and `signalbox up` share it and tests call it
directly. Every object is validated through `signalbox.core.models`; every problem is collected
(with its JSON path) before deciding. A result with any problem carries no config: the caller
keeps the last good one in force.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core.envoygen.contract import BACKEND_PREFIX, TARGET_PREFIX
from signalbox.core.schema import SCHEMA_VERSION, provider_api

from . import rollouts
from .consumers import KeyHashes, add_consumers, rate_limits
from .errors import Problem
from .gcpause import paused_gc
from .models import (
    AIProvider,
    AuthFormat,
    BrokenStream,
    Consumer,
    OnExhausted,
    ProviderType,
    RolloutMode,
    RolloutSpec,
    RoutingPolicy,
    RoutingPolicySpec,
    Strategy,
)
from .rules import RuleError, rule_matcher

_PROVIDER_TYPES = {
    ProviderType.OPENAI: pb.OPENAI,
    ProviderType.AZURE_OPENAI: pb.AZURE_OPENAI,
    ProviderType.OPENAI_COMPATIBLE: pb.OPENAI_COMPATIBLE,
    ProviderType.ANTHROPIC: pb.ANTHROPIC,
    ProviderType.GEMINI: pb.GEMINI,
    ProviderType.BEDROCK: pb.BEDROCK,
}

STRATEGIES: dict[Strategy, Any] = {s: pb.Strategy.Value(s.name) for s in Strategy}
BROKEN_STREAMS: dict[BrokenStream, Any] = {b: pb.BrokenStream.Value(f"BROKEN_STREAM_{b.name}") for b in BrokenStream}
_TRISTATE = {None: 0, True: 1, False: 2}


@dataclass(frozen=True)
class CompileResult:
    config: pb.RoutingConfig | None
    problems: list[Problem]
    # False when the result equals the config already in force (nothing was applied).
    changed: bool = True

    @property
    def ok(self) -> bool:
        return self.config is not None


def _path(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "$"


def _parse(
    cls: type[AIProvider] | type[RoutingPolicy] | type[Consumer], obj: Mapping[str, Any], problems: list[Problem]
):
    meta = obj.get("metadata") or {}
    name, namespace = str(meta.get("name", "?")), str(meta.get("namespace") or "default")
    try:
        return cls.model_validate({**obj, "metadata": {**meta, "namespace": namespace}})
    except ValidationError as exc:
        for err in exc.errors():
            loc = [p for p in err["loc"] if p not in ("function-after",)]
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(Problem(cls.__name__, name, _path(loc), msg, namespace))
        return None


class ModelCache:
    """Validated resources by the object they were read from, from one compile to the next.

    Why: `signalbox up` compiles everything again whenever one file changes, and validating the
    4,000 resources of the 2,000-provider fleet was 0.3 s of every change (issue 12). With
    `loader.DocumentCache`, a document whose text did not change is the same object as last
    time, and its model (frozen) or its problems are reused. What the last compile did not see
    is forgotten.
    """

    def __init__(self) -> None:
        # (class or message type, id of the object) -> (the object, what was made of it, and its
        # problems or, for a policy, the inputs it was built from)
        self._kept: dict[tuple[type, int], tuple[object, Any, Any]] = {}
        self._seen: dict[tuple[type, int], tuple[object, Any, Any]] = {}

    def parse(
        self,
        cls: type[AIProvider] | type[RoutingPolicy] | type[Consumer],
        obj: Mapping[str, Any],
        problems: list[Problem],
    ):
        key = (cls, id(obj))
        hit = self._seen.get(key) or self._kept.get(key)
        if hit is None or hit[0] is not obj:  # the entry holds its object: an id is never reused under it
            found: list[Problem] = []
            hit = (obj, _parse(cls, obj, found), found)
        self._seen[key] = hit
        problems.extend(hit[2])
        return hit[1]

    def provider(self, prov: AIProvider) -> tuple[pb.Provider, list[pb.Backend]]:
        """A provider's messages, built once per model: building the 2,000 fleet's 2,000
        providers and 10,000 backends was 0.1 s of every change. They depend on the model alone
        (its spec, metadata and health status), and the config gets copies of them."""
        key = (pb.Provider, id(prov))
        hit = self._seen.get(key) or self._kept.get(key)
        if hit is None or hit[0] is not prov:
            hit = (prov, _provider_messages(prov), [])
        self._seen[key] = hit
        return hit[1]

    def built_policy(self, pol: RoutingPolicy, inputs: bytes) -> pb.Policy | None:
        """The policy's message a compile built from this model and the same `_policy_inputs`
        (0.1 s of every change at the 2,000 fleet); None when there is none."""
        hit = self._seen.get((pb.Policy, id(pol))) or self._kept.get((pb.Policy, id(pol)))
        if hit is None or hit[0] is not pol or hit[2] != inputs:
            return None
        self._seen[(pb.Policy, id(pol))] = hit
        return hit[1]

    def keep_policy(self, pol: RoutingPolicy, inputs: bytes, message: pb.Policy) -> None:
        """Keep a policy's message, built without problems (the config gets copies)."""
        self._seen[(pb.Policy, id(pol))] = (pol, message, inputs)

    def compiled(self) -> None:
        """One compile is over: keep what it used, drop the rest."""
        self._kept, self._seen = self._seen, {}


def _cluster_name(*parts: str) -> str:
    """Readable, Envoy-safe cluster names (also used in Envoy stats)."""
    return ".".join(re.sub(r"[^A-Za-z0-9_-]", "_", p) for p in parts)


@paused_gc()
def compile_config(
    providers: Iterable[Mapping[str, Any]],
    policies: Iterable[Mapping[str, Any]],
    secrets_present: set[tuple[str, str, str]] | None = None,
    generation: int = 0,
    consumers: Iterable[Mapping[str, Any]] = (),
    key_hashes: KeyHashes | None = None,
    models: ModelCache | None = None,
) -> CompileResult:
    """Compile every provider, policy and consumer into one RoutingConfig.

    `secrets_present` is the set of (namespace, secret, key) that exist; None skips that check
    (local runs without a cluster). Provider health comes from each object's `status.health`.
    `key_hashes`: each consumer's API key hashes, resolved by the caller (`core.consumers`).
    `models`: resources validated by the last compile with it, reused for the same objects.
    """
    problems: list[Problem] = []
    parse = models.parse if models is not None else _parse
    # "<kind> <namespace>/<name>" of each resource that did not validate: a reference to one is
    # told so, not that it is not found (its own problems say what is wrong with it).
    invalid: set[str] = set()

    def valid(cls: type[Any], objects: Iterable[Mapping[str, Any]]) -> list[Any]:
        out = []
        for obj in objects:
            parsed = parse(cls, obj, problems)
            if parsed:
                out.append(parsed)
            else:
                invalid.add(f"{cls.__name__} {_raw_key(obj)}")
        return out

    parsed_providers: list[AIProvider] = valid(AIProvider, providers)
    parsed_policies: list[RoutingPolicy] = valid(RoutingPolicy, policies)
    parsed_consumers: list[Consumer] = valid(Consumer, consumers)
    parsed_providers.sort(key=lambda p: p.key)
    parsed_policies.sort(key=lambda p: p.key)

    cfg = pb.RoutingConfig(schema_version=SCHEMA_VERSION, generation=generation)
    backend_index: dict[str, int] = {}
    provider_models: dict[str, list[str]] = {}
    for prov in parsed_providers:
        built = models.provider(prov) if models is not None else _provider_messages(prov)
        _add_provider(cfg, prov, built, secrets_present, problems, backend_index)
        provider_models[prov.key] = [m.name for m in prov.spec.models]
    if models is not None:
        models.compiled()

    seen_matches: dict[tuple, str] = {}
    for pol in parsed_policies:
        _add_policy(cfg, pol, backend_index, provider_models, seen_matches, problems, models, invalid)
    add_consumers(cfg, parsed_consumers, key_hashes or {}, problems)
    _add_rollouts(cfg, parsed_policies, problems, invalid)

    if problems:
        return CompileResult(None, problems)
    shared = Counter(alias for p in cfg.policies for alias in p.aliases)
    apis = {p.id: provider_api(p.type) for p in cfg.providers}
    for out in cfg.policies:
        out.compiled = compilable(cfg, out, shared, apis)
    cfg.content_hash = content_hash(cfg)
    return CompileResult(cfg, [])


def content_hash(cfg: pb.RoutingConfig) -> str:
    clone = pb.RoutingConfig()
    clone.CopyFrom(cfg)
    clone.content_hash = ""
    clone.generation = 0
    return hashlib.sha256(clone.SerializeToString(deterministic=True)).hexdigest()


def _add_provider(
    cfg: pb.RoutingConfig,
    prov: AIProvider,
    built: tuple[pb.Provider, list[pb.Backend]],
    secrets_present: set[tuple[str, str, str]] | None,
    problems: list[Problem],
    backend_index: dict[str, int],
) -> None:
    """The provider's messages (`_provider_messages`) into the config, and a problem when its
    key's Secret is missing."""
    meta, a = prov.metadata, prov.spec.auth
    if (
        a
        and a.secret_ref
        and secrets_present is not None
        and (meta.namespace, a.secret_ref.name, a.secret_ref.key) not in secrets_present
    ):
        problems.append(
            Problem(
                "AIProvider",
                meta.name,
                "spec.auth.secretRef",
                f"Secret {meta.namespace}/{a.secret_ref.name} with key {a.secret_ref.key!r} not found",
                meta.namespace,
                "RefNotFound",
            )
        )
    provider, backends = built
    cfg.providers.append(provider)
    for backend in backends:
        backend_index[backend.id] = len(cfg.backends)
        cfg.backends.append(backend)


def _provider_messages(prov: AIProvider) -> tuple[pb.Provider, list[pb.Backend]]:
    """A provider and its backends, from its model alone (cacheable: `ModelCache.provider`)."""
    spec, meta = prov.spec, prov.metadata
    url = urlsplit(spec.base_url)
    tls = url.scheme == "https"
    azure = spec.type == ProviderType.AZURE_OPENAI
    health = ((prov.status or {}).get("health") or {}) if isinstance(prov.status, dict) else {}
    healthy = bool(health.get("healthy", True))
    out = pb.Provider(
        id=prov.key,
        name=meta.name,
        type=_PROVIDER_TYPES[spec.type],
        host=url.hostname or "",
        port=url.port or (443 if tls else 80),
        tls=tls,
        base_path=url.path.rstrip("/"),
        azure_api_version=(spec.azure.api_version if spec.azure else "2024-10-21") if azure else "",
        healthy=healthy,
        connect_timeout_ms=spec.connect_timeout_ms,
        # 0: the default for its scheme, which schema.idle_timeout_ms alone decides.
        idle_timeout_ms=spec.idle_timeout_ms or 0,
        no_stream_usage=not spec.stream_usage,
        # First-party APIs stream well-formed events; self-hosted and proxy servers vary.
        sanitize_streams=spec.type == ProviderType.OPENAI_COMPATIBLE
        if spec.sanitize_streams is None
        else spec.sanitize_streams,
        # Only OpenAI's own API is known to serve /responses; others say so themselves.
        responses_api=spec.type == ProviderType.OPENAI if spec.responses_api is None else spec.responses_api,
        aws_region=spec.aws_region() if spec.type == ProviderType.BEDROCK else "",
    )
    if spec.auth:
        a = spec.auth
        out.auth.header, out.auth.prefix = spec.key_header()
        if a.format == AuthFormat.GOOGLE_CREDENTIALS:
            out.auth.format = pb.GOOGLE_CREDENTIALS
        elif a.format == AuthFormat.AWS_CREDENTIALS:
            out.auth.format = pb.AWS_CREDENTIALS
        if a.secret_ref:
            out.auth.secret.CopyFrom(
                pb.SecretRef(namespace=meta.namespace, name=a.secret_ref.name, key=a.secret_ref.key)
            )
        elif a.env:
            out.auth.env = a.env
        elif a.file:
            out.auth.file = a.file
    backends = [
        pb.Backend(
            id=f"{prov.key}/{model.name}",
            provider_id=prov.key,
            model=model.name,
            upstream_model=model.upstream,
            input_price_per_1m=model.input_price_per_1m,
            output_price_per_1m=model.output_price_per_1m,
            quality=model.quality,
            context_window=model.context_window,
            capabilities=[c.value for c in model.capabilities],
            latency_prior_ms=model.latency_prior_ms,
            healthy=healthy,
            cluster=_cluster_name(BACKEND_PREFIX, meta.namespace, meta.name, model.name),
        )
        for model in spec.models
    ]
    return out, backends


def _raw_key(obj: Mapping[str, Any]) -> str:
    """ "<namespace>/<name>" of a resource as sent, whatever else is wrong with it."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def _unresolved(kind: str, key: str, invalid: AbstractSet[str], what: str = "") -> str:
    """The message of a reference to a `kind` `key` the config does not have (`what`: more of
    what was named): one that did not validate is named so, where "not found" sent a user
    looking for a resource that is there."""
    if f"{kind} {key}" in invalid:
        return f"{kind} {key} is invalid (its own problems say why)"
    return f"{kind} {key}{what} not found"


def _backend_of(
    cfg: pb.RoutingConfig,
    pol: RoutingPolicy,
    provider: str,
    model: str,
    path: str,
    backend_index: dict[str, int],
    problems: list[Problem],
    invalid: AbstractSet[str],
) -> int:
    """A backend a policy names outside its chain (LLM tier, mirror): its index plus one, or 0
    with a RefNotFound problem. The ext_proc calls these itself, and it does not sign AWS
    requests: a Bedrock backend is refused here (Envoy signs the chains' attempts)."""
    ns = pol.metadata.namespace
    key = f"{ns}/{provider}/{model}"
    if key in backend_index:
        provider_id = cfg.backends[backend_index[key]].provider_id
        if any(p.id == provider_id and p.type == pb.BEDROCK for p in cfg.providers):
            problems.append(
                Problem(
                    "RoutingPolicy",
                    pol.metadata.name,
                    path,
                    f"AIProvider {ns}/{provider} is a bedrock provider, which can serve a policy's backends but "
                    "not its LLM tier or mirror",
                    ns,
                    "Invalid",
                )
            )
            return 0
        return backend_index[key] + 1
    problems.append(
        Problem(
            "RoutingPolicy",
            pol.metadata.name,
            path,
            _unresolved("AIProvider", f"{ns}/{provider}", invalid, f" with model {model!r}"),
            ns,
            "RefNotFound",
        )
    )
    return 0


def _add_policy(
    cfg,
    pol: RoutingPolicy,
    backend_index,
    provider_models,
    seen_matches,
    problems,
    models: ModelCache | None = None,
    invalid: AbstractSet[str] = frozenset(),
) -> None:
    spec, meta = pol.spec, pol.metadata
    ns = meta.namespace
    resolved: list[tuple[int, int]] = []  # (position in spec.backends, index in cfg.backends)
    for i, ref in enumerate(spec.backends):
        provider_key = f"{ns}/{ref.provider}"
        if provider_key not in provider_models:
            problems.append(
                Problem(
                    "RoutingPolicy",
                    meta.name,
                    f"spec.backends[{i}].provider",
                    _unresolved("AIProvider", provider_key, invalid),
                    ns,
                    "RefNotFound",
                )
            )
            continue
        if ref.model not in provider_models[provider_key]:
            have = ", ".join(provider_models[provider_key])
            problems.append(
                Problem(
                    "RoutingPolicy",
                    meta.name,
                    f"spec.backends[{i}].model",
                    f"AIProvider {provider_key} declares no model {ref.model!r} (has: {have})",
                    ns,
                    "RefNotFound",
                )
            )
            continue
        resolved.append((i, backend_index[f"{provider_key}/{ref.model}"]))

    headers = tuple(sorted((h.name.lower(), h.value) for h in spec.match.headers))
    for j, alias in enumerate(spec.match.models):
        key = (alias, headers, tuple(sorted(spec.match.path_prefixes)))
        if key in seen_matches:
            problems.append(
                Problem(
                    "RoutingPolicy",
                    meta.name,
                    f"spec.match.models[{j}]",
                    f"alias {alias!r} with the same header/path match is already served by "
                    f"RoutingPolicy {seen_matches[key]}",
                    ns,
                )
            )
        else:
            seen_matches[key] = pol.key
    if len(resolved) != len(spec.backends):
        return
    inputs = _policy_inputs(cfg, pol, resolved, backend_index) if models is not None else b""
    built = models.built_policy(pol, inputs) if models is not None else None
    if built is None:
        before = len(problems)
        built = _policy_message(cfg, pol, resolved, headers, backend_index, problems, invalid)
        if models is not None and len(problems) == before:
            models.keep_policy(pol, inputs, built)
    cfg.policies.append(built)


def _policy_inputs(cfg: pb.RoutingConfig, pol: RoutingPolicy, resolved: list[tuple[int, int]], backend_index) -> bytes:
    """What a policy's message depends on besides its model: the backends it names (their
    places in the config, health, capabilities and clusters) and, for an LLM tier or mirror,
    the backend and whether its provider is Bedrock."""
    spec, ns = pol.spec, pol.metadata.namespace
    chain = [index for _, index in resolved]
    extra = [
        backend_index.get(f"{ns}/{ref.provider}/{ref.model}", -1)
        for ref in (spec.classification.llm, spec.mirror)
        if ref is not None
    ]
    parts = [repr((chain, extra)).encode()]
    parts += [cfg.backends[index].SerializeToString(deterministic=True) for index in chain]
    for index in extra:
        if index >= 0:  # as `_backend_of` reads it: the backend, and whether its provider is Bedrock
            backend = cfg.backends[index]
            bedrock = any(p.id == backend.provider_id and p.type == pb.BEDROCK for p in cfg.providers)
            parts += [backend.SerializeToString(deterministic=True), b"bedrock" if bedrock else b""]
    return b"\x00".join(parts)


def _policy_message(
    cfg: pb.RoutingConfig,
    pol: RoutingPolicy,
    resolved: list[tuple[int, int]],
    headers: tuple[tuple[str, str], ...],
    backend_index,
    problems: list[Problem],
    invalid: AbstractSet[str] = frozenset(),
) -> pb.Policy:
    """A policy's message, from its model and `_policy_inputs` (cacheable:
    `ModelCache.built_policy`)."""
    spec, meta = pol.spec, pol.metadata
    ns = meta.namespace
    out = pb.Policy(
        id=pol.key,
        name=meta.name,
        aliases=spec.match.models,
        headers=[pb.HeaderMatch(name=n, value=v) for n, v in headers],
        path_prefixes=spec.match.path_prefixes,
        strategy=STRATEGIES[spec.strategy],
        failover=spec.failover.enabled,
        retry_on=[r.value for r in spec.failover.retry_on],
        per_try_timeout_ms=spec.failover.per_try_timeout_ms or 0,
        idle_timeout_ms=spec.failover.idle_timeout_ms or 0,
        first_token_timeout_ms=spec.failover.first_token_timeout_ms or 0,
        broken_stream=BROKEN_STREAMS[spec.failover.on_broken_stream],
        timeout_ms=spec.timeout_ms,
        hash_header=(spec.hash.header or "").lower(),
        exploration_rate=spec.latency.exploration_rate,
        ewma_alpha=spec.latency.ewma_alpha,
        hedge_delay_ms=spec.hedge.delay_ms,
        min_quality={k.value: v for k, v in spec.cost.min_quality.items()},
        use_default_rules=spec.classification.use_default_rules,
        learning=spec.learning.enabled,
        learning_exploration_rate=spec.learning.exploration_rate,
        learning_prior_weight=spec.learning.prior_weight,
        learning_per_prompt=spec.learning.enabled and spec.learning.per_prompt,
        quality_tolerance=-1.0 if spec.cost.quality_tolerance is None else spec.cost.quality_tolerance,
        allow_anonymous=spec.allow_anonymous,
    )
    if spec.limits is not None:
        out.limits.CopyFrom(rate_limits(spec.limits))
    if spec.budget is not None:
        out.budget.CopyFrom(
            pb.Budget(
                hourly_usd=spec.budget.hourly_usd or 0.0,
                daily_usd=spec.budget.daily_usd or 0.0,
                downgrade_at=spec.budget.downgrade_at,
                reject_when_exhausted=spec.budget.on_exhausted == OnExhausted.REJECT,
            )
        )
    llm = spec.classification.llm
    if llm is not None:
        llm_backend = _backend_of(
            cfg, pol, llm.provider, llm.model, "spec.classification.llm", backend_index, problems, invalid
        )
        if llm_backend:
            out.llm_backend = llm_backend
            out.llm_timeout_ms = llm.timeout_ms
            out.llm_min_confidence = llm.min_confidence
            out.llm_cache_size = llm.cache_size
    if spec.mirror is not None:
        mirror = _backend_of(
            cfg, pol, spec.mirror.provider, spec.mirror.model, "spec.mirror", backend_index, problems, invalid
        )
        if mirror:
            out.mirror.CopyFrom(
                pb.Mirror(backend=mirror, percent=spec.mirror.percent, max_in_flight=spec.mirror.max_in_flight)
            )
    semantic = spec.classification.semantic
    if semantic is not None:
        out.semantic_default_route = semantic.default_route or ""
        out.semantic_min_rules_confidence = semantic.min_rules_confidence
        for semantic_route in semantic.routes:
            out.semantic_routes.append(
                pb.SemanticRoute(
                    name=semantic_route.name,
                    utterances=semantic_route.utterances,
                    threshold=semantic_route.threshold,
                    task_type=semantic_route.task_type.value if semantic_route.task_type else "",
                    complexity=semantic_route.complexity.value if semantic_route.complexity else "",
                )
            )
        names = [r.name for r in semantic.routes]
        if semantic.default_route and semantic.default_route not in names:
            problems.append(
                Problem(
                    "RoutingPolicy",
                    meta.name,
                    "spec.classification.semantic.defaultRoute",
                    f"{semantic.default_route!r} is not one of the routes ({', '.join(names)})",
                    ns,
                )
            )
    for rule in spec.classification.rules:
        out.rules.append(
            pb.Rule(
                name=rule.name,
                patterns=rule.patterns,
                keywords=rule.keywords,
                min_tokens=-1 if rule.min_tokens is None else rule.min_tokens,
                max_tokens=-1 if rule.max_tokens is None else rule.max_tokens,
                has_tools=_TRISTATE[rule.has_tools],
                has_images=_TRISTATE[rule.has_images],
                json_mode=_TRISTATE[rule.json_mode],
                task_type=rule.task_type.value if rule.task_type else "",
                complexity=rule.complexity.value if rule.complexity else "",
            )
        )
    for r, rule in enumerate(spec.classification.rules):
        try:
            rule_matcher(rule.patterns, rule.keywords)
        except RuleError as exc:
            problems.append(
                Problem(
                    "RoutingPolicy",
                    meta.name,
                    f"spec.classification.rules[{r}].{exc.field}[{exc.index}]",
                    str(exc),
                    ns,
                )
            )

    # Failover order: priority, then listing order. Unhealthy backends never get a target and
    # are left out of every chain; Envoy outlier detection covers what health probes miss.
    order = sorted(range(len(spec.backends)), key=lambda i: (spec.backends[i].priority, i))
    position_to_backend = dict(resolved)
    healthy = [i for i in order if cfg.backends[position_to_backend[i]].healthy]
    for i, ref in enumerate(spec.backends):
        b = position_to_backend[i]
        live = "pending" if i in healthy else ""  # named below, once every position is known
        out.backends.append(pb.PolicyBackend(backend=b, weight=ref.weight, priority=ref.priority, target=live))
    named = [i for i, pbb in enumerate(out.backends) if pbb.target]
    for i, members in zip(named, chains(cfg, out, named), strict=True):
        out.backends[i].target = target_name(members)
    out.max_attempts = spec.failover.max_attempts or (len(healthy) if spec.failover.enabled else 1)
    keys = [b.key for b in spec.backends]
    for route in spec.routes:
        out.routes.append(
            pb.ClassRoute(
                task_types=[t.value for t in route.task_types],
                complexities=[c.value for c in route.complexities],
                backends=[keys.index(k) for k in route.backends],
            )
        )
    return out


def rollout_epoch(rollout: RolloutSpec, candidate: RoutingPolicySpec) -> str:
    """The run a rollout is in (rollouts.epoch) from the validated specs, as the operator
    computes it for status: their dumps carry the defaults, so equal meaning, equal epoch."""
    return rollouts.epoch(
        rollout.model_dump(mode="json", by_alias=True), candidate.model_dump(mode="json", by_alias=True)
    )


def _add_rollouts(
    cfg: pb.RoutingConfig,
    policies: list[RoutingPolicy],
    problems: list[Problem],
    invalid: AbstractSet[str] = frozenset(),
) -> None:
    """Each policy's rollout names a candidate policy of its namespace, not itself."""
    compiled = {p.id: p for p in cfg.policies}
    by_key = {p.key: p for p in policies}
    for pol in policies:
        rollout = pol.spec.rollout
        if rollout is None or pol.key not in compiled:
            continue
        ns, name = pol.metadata.namespace, pol.metadata.name
        candidate = f"{ns}/{rollout.candidate}"
        if candidate == pol.key:
            problems.append(
                Problem("RoutingPolicy", name, "spec.rollout.candidate", "a policy cannot be its own candidate", ns)
            )
        elif candidate not in compiled:
            problems.append(
                Problem(
                    "RoutingPolicy",
                    name,
                    "spec.rollout.candidate",
                    _unresolved("RoutingPolicy", candidate, invalid),
                    ns,
                    "RefNotFound",
                )
            )
        else:
            compiled[pol.key].rollout.CopyFrom(
                pb.Rollout(
                    candidate=candidate,
                    canary=rollout.mode == RolloutMode.CANARY,
                    percent=rollout.percent,
                    sticky_header=(rollout.sticky_header or "").lower(),
                    epoch=rollout_epoch(rollout, by_key[candidate].spec),
                    max_error_rate=rollout.max_error_rate,
                    min_requests=rollout.min_requests,
                )
            )


# Strategies whose choice needs no prompt and no state Envoy does not have: weighted and
# round-robin become weighted_clusters (a random split with the same shares), failover and
# fastest the first healthy backend's aggregate cluster (hedging is Envoy's already).
COMPILED_STRATEGIES = frozenset({pb.WEIGHTED, pb.ROUND_ROBIN, pb.FAILOVER, pb.FASTEST})


def compilable(
    cfg: pb.RoutingConfig,
    policy: pb.Policy,
    alias_uses: Counter[str] | None = None,
    apis: dict[str, str] | None = None,
) -> bool:
    """Whether Envoy can route this policy alone, with the same outcome the ext_proc would give.

    Not when the choice reads the prompt or state only the ext_proc has (cost, classified,
    latency, least-busy, hash; a budget or limits; learning; the LLM tier; a rollout or a
    mirror; any consumer declared; a relayed broken stream), when the policy is picked by
    headers or paths as well as its alias (or shares an alias), or when its healthy backends
    differ in capabilities, context window or API family: then the prompt decides which are
    eligible (what one API family cannot express, another may).
    """
    if policy.strategy not in COMPILED_STRATEGIES or policy.learning or policy.HasField("budget"):
        return False
    if cfg.consumers or policy.HasField("limits") or policy.HasField("rollout") or policy.HasField("mirror"):
        # Who calls, and how much they have used, is checked by the ext_proc: a presented key
        # is compared by its hash and counters live in the limit store (docs/design-notes.md).
        return False
    if policy.headers or policy.path_prefixes or policy.llm_backend:
        return False
    if policy.broken_stream != pb.BROKEN_STREAM_CLOSE:
        return False  # its streams go through the ext_proc's relay
    if alias_uses is not None and any(alias_uses[a] > 1 for a in policy.aliases):
        return False
    live = [b for b in policy.backends if b.target]
    if not live:
        return False
    if policy.strategy == pb.WEIGHTED and not any(b.weight for b in live):
        return False
    if apis is None:
        apis = {p.id: provider_api(p.type) for p in cfg.providers}
    shapes = {
        (
            frozenset(cfg.backends[b.backend].capabilities),
            cfg.backends[b.backend].context_window,
            apis[cfg.backends[b.backend].provider_id],
        )
        for b in live
    }
    return len(shapes) == 1


def target_name(members: list[pb.Backend]) -> str:
    """A failover chain's aggregate cluster, named by its members: policies whose chains are
    the same share one (its settings are all its members'), so the generated config grows with
    the distinct chains, not with the policies. Readable from its first member and length."""
    digest = hashlib.sha256("|".join(b.cluster for b in members).encode()).hexdigest()[:10]
    first = members[0].cluster.removeprefix(BACKEND_PREFIX + ".")
    return f"{TARGET_PREFIX}.{first}.{len(members)}.{digest}"


def chain(cfg: pb.RoutingConfig, policy: pb.Policy, first: int) -> list[pb.Backend]:
    """Backends a request whose first choice is policy.backends[first] may be tried on, in order.

    Shared by the Envoy generator (aggregate clusters) and the explain output, so both always
    describe the same failover order.
    """
    return chains(cfg, policy, (first,))[0]


def chains(cfg: pb.RoutingConfig, policy: pb.Policy, firsts: Iterable[int] | None = None) -> list[list[pb.Backend]]:
    """`chain` for each first choice in `firsts` (default: every backend's position), the
    failover order sorted once: the compile and the generator name a chain per policy and
    backend, 10,000 of them at the 2,000-policy fleet."""
    backends = policy.backends
    order = sorted(range(len(backends)), key=lambda i: (backends[i].priority, i)) if policy.failover else []
    out = []
    for first in range(len(backends)) if firsts is None else firsts:
        members = [first, *(i for i in order if i != first and backends[i].target)]
        chosen = [cfg.backends[backends[i].backend] for i in members]
        if "embeddings" in chosen[0].capabilities:
            # The first choice may be serving an embeddings request: never fail it over to a
            # model that cannot embed (the router phase only picks embedding models for those).
            chosen = [b for b in chosen if "embeddings" in b.capabilities]
        out.append(chosen)
    return out
