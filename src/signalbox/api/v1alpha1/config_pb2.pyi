from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProviderType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROVIDER_TYPE_UNSPECIFIED: _ClassVar[ProviderType]
    OPENAI: _ClassVar[ProviderType]
    AZURE_OPENAI: _ClassVar[ProviderType]
    OPENAI_COMPATIBLE: _ClassVar[ProviderType]
    ANTHROPIC: _ClassVar[ProviderType]
    GEMINI: _ClassVar[ProviderType]
    BEDROCK: _ClassVar[ProviderType]

class AuthFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    API_KEY: _ClassVar[AuthFormat]
    GOOGLE_CREDENTIALS: _ClassVar[AuthFormat]
    AWS_CREDENTIALS: _ClassVar[AuthFormat]

class Strategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRATEGY_UNSPECIFIED: _ClassVar[Strategy]
    WEIGHTED: _ClassVar[Strategy]
    ROUND_ROBIN: _ClassVar[Strategy]
    FAILOVER: _ClassVar[Strategy]
    COST: _ClassVar[Strategy]
    LATENCY: _ClassVar[Strategy]
    LEAST_BUSY: _ClassVar[Strategy]
    HASH: _ClassVar[Strategy]
    CLASSIFIED: _ClassVar[Strategy]
    FASTEST: _ClassVar[Strategy]

class BrokenStream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BROKEN_STREAM_CLOSE: _ClassVar[BrokenStream]
    BROKEN_STREAM_ERROR: _ClassVar[BrokenStream]
    BROKEN_STREAM_CONTINUE: _ClassVar[BrokenStream]
PROVIDER_TYPE_UNSPECIFIED: ProviderType
OPENAI: ProviderType
AZURE_OPENAI: ProviderType
OPENAI_COMPATIBLE: ProviderType
ANTHROPIC: ProviderType
GEMINI: ProviderType
BEDROCK: ProviderType
API_KEY: AuthFormat
GOOGLE_CREDENTIALS: AuthFormat
AWS_CREDENTIALS: AuthFormat
STRATEGY_UNSPECIFIED: Strategy
WEIGHTED: Strategy
ROUND_ROBIN: Strategy
FAILOVER: Strategy
COST: Strategy
LATENCY: Strategy
LEAST_BUSY: Strategy
HASH: Strategy
CLASSIFIED: Strategy
FASTEST: Strategy
BROKEN_STREAM_CLOSE: BrokenStream
BROKEN_STREAM_ERROR: BrokenStream
BROKEN_STREAM_CONTINUE: BrokenStream

class RoutingConfig(_message.Message):
    __slots__ = ("schema_version", "content_hash", "generation", "providers", "backends", "policies", "consumers", "jwt_providers")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    CONSUMERS_FIELD_NUMBER: _ClassVar[int]
    JWT_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    content_hash: str
    generation: int
    providers: _containers.RepeatedCompositeFieldContainer[Provider]
    backends: _containers.RepeatedCompositeFieldContainer[Backend]
    policies: _containers.RepeatedCompositeFieldContainer[Policy]
    consumers: _containers.RepeatedCompositeFieldContainer[Consumer]
    jwt_providers: _containers.RepeatedCompositeFieldContainer[JwtProvider]
    def __init__(self, schema_version: _Optional[int] = ..., content_hash: _Optional[str] = ..., generation: _Optional[int] = ..., providers: _Optional[_Iterable[_Union[Provider, _Mapping]]] = ..., backends: _Optional[_Iterable[_Union[Backend, _Mapping]]] = ..., policies: _Optional[_Iterable[_Union[Policy, _Mapping]]] = ..., consumers: _Optional[_Iterable[_Union[Consumer, _Mapping]]] = ..., jwt_providers: _Optional[_Iterable[_Union[JwtProvider, _Mapping]]] = ...) -> None: ...

class SecretRef(_message.Message):
    __slots__ = ("namespace", "name", "key")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    key: str
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class Auth(_message.Message):
    __slots__ = ("secret", "env", "file", "header", "prefix", "format")
    SECRET_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    secret: SecretRef
    env: str
    file: str
    header: str
    prefix: str
    format: AuthFormat
    def __init__(self, secret: _Optional[_Union[SecretRef, _Mapping]] = ..., env: _Optional[str] = ..., file: _Optional[str] = ..., header: _Optional[str] = ..., prefix: _Optional[str] = ..., format: _Optional[_Union[AuthFormat, str]] = ...) -> None: ...

class Provider(_message.Message):
    __slots__ = ("id", "name", "type", "host", "port", "tls", "base_path", "auth", "azure_api_version", "healthy", "connect_timeout_ms", "sanitize_streams", "responses_api", "aws_region", "idle_timeout_ms", "no_stream_usage")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    BASE_PATH_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    AZURE_API_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    CONNECT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    SANITIZE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_API_FIELD_NUMBER: _ClassVar[int]
    AWS_REGION_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    NO_STREAM_USAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    type: ProviderType
    host: str
    port: int
    tls: bool
    base_path: str
    auth: Auth
    azure_api_version: str
    healthy: bool
    connect_timeout_ms: int
    sanitize_streams: bool
    responses_api: bool
    aws_region: str
    idle_timeout_ms: int
    no_stream_usage: bool
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., type: _Optional[_Union[ProviderType, str]] = ..., host: _Optional[str] = ..., port: _Optional[int] = ..., tls: _Optional[bool] = ..., base_path: _Optional[str] = ..., auth: _Optional[_Union[Auth, _Mapping]] = ..., azure_api_version: _Optional[str] = ..., healthy: _Optional[bool] = ..., connect_timeout_ms: _Optional[int] = ..., sanitize_streams: _Optional[bool] = ..., responses_api: _Optional[bool] = ..., aws_region: _Optional[str] = ..., idle_timeout_ms: _Optional[int] = ..., no_stream_usage: _Optional[bool] = ...) -> None: ...

class Backend(_message.Message):
    __slots__ = ("id", "provider_id", "model", "upstream_model", "input_price_per_1m", "output_price_per_1m", "quality", "context_window", "capabilities", "latency_prior_ms", "healthy", "cluster")
    ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_PRICE_PER_1M_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PRICE_PER_1M_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_PRIOR_MS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    id: str
    provider_id: str
    model: str
    upstream_model: str
    input_price_per_1m: float
    output_price_per_1m: float
    quality: float
    context_window: int
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    latency_prior_ms: float
    healthy: bool
    cluster: str
    def __init__(self, id: _Optional[str] = ..., provider_id: _Optional[str] = ..., model: _Optional[str] = ..., upstream_model: _Optional[str] = ..., input_price_per_1m: _Optional[float] = ..., output_price_per_1m: _Optional[float] = ..., quality: _Optional[float] = ..., context_window: _Optional[int] = ..., capabilities: _Optional[_Iterable[str]] = ..., latency_prior_ms: _Optional[float] = ..., healthy: _Optional[bool] = ..., cluster: _Optional[str] = ...) -> None: ...

class HeaderMatch(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class PolicyBackend(_message.Message):
    __slots__ = ("backend", "weight", "priority", "target")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    backend: int
    weight: int
    priority: int
    target: str
    def __init__(self, backend: _Optional[int] = ..., weight: _Optional[int] = ..., priority: _Optional[int] = ..., target: _Optional[str] = ...) -> None: ...

class Rule(_message.Message):
    __slots__ = ("name", "patterns", "keywords", "min_tokens", "max_tokens", "has_tools", "has_images", "json_mode", "task_type", "complexity")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATTERNS_FIELD_NUMBER: _ClassVar[int]
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HAS_TOOLS_FIELD_NUMBER: _ClassVar[int]
    HAS_IMAGES_FIELD_NUMBER: _ClassVar[int]
    JSON_MODE_FIELD_NUMBER: _ClassVar[int]
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    COMPLEXITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    patterns: _containers.RepeatedScalarFieldContainer[str]
    keywords: _containers.RepeatedScalarFieldContainer[str]
    min_tokens: int
    max_tokens: int
    has_tools: int
    has_images: int
    json_mode: int
    task_type: str
    complexity: str
    def __init__(self, name: _Optional[str] = ..., patterns: _Optional[_Iterable[str]] = ..., keywords: _Optional[_Iterable[str]] = ..., min_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., has_tools: _Optional[int] = ..., has_images: _Optional[int] = ..., json_mode: _Optional[int] = ..., task_type: _Optional[str] = ..., complexity: _Optional[str] = ...) -> None: ...

class SemanticRoute(_message.Message):
    __slots__ = ("name", "utterances", "threshold", "task_type", "complexity")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UTTERANCES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    COMPLEXITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    utterances: _containers.RepeatedScalarFieldContainer[str]
    threshold: float
    task_type: str
    complexity: str
    def __init__(self, name: _Optional[str] = ..., utterances: _Optional[_Iterable[str]] = ..., threshold: _Optional[float] = ..., task_type: _Optional[str] = ..., complexity: _Optional[str] = ...) -> None: ...

class ClassRoute(_message.Message):
    __slots__ = ("task_types", "complexities", "backends")
    TASK_TYPES_FIELD_NUMBER: _ClassVar[int]
    COMPLEXITIES_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    task_types: _containers.RepeatedScalarFieldContainer[str]
    complexities: _containers.RepeatedScalarFieldContainer[str]
    backends: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, task_types: _Optional[_Iterable[str]] = ..., complexities: _Optional[_Iterable[str]] = ..., backends: _Optional[_Iterable[int]] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("id", "name", "aliases", "headers", "path_prefixes", "strategy", "backends", "failover", "retry_on", "per_try_timeout_ms", "max_attempts", "timeout_ms", "hash_header", "exploration_rate", "ewma_alpha", "hedge_delay_ms", "min_quality", "rules", "use_default_rules", "routes", "semantic_routes", "semantic_default_route", "semantic_min_rules_confidence", "learning", "learning_exploration_rate", "learning_prior_weight", "quality_tolerance", "llm_backend", "llm_timeout_ms", "llm_min_confidence", "llm_cache_size", "budget", "compiled", "idle_timeout_ms", "allow_anonymous", "limits", "learning_per_prompt", "rollout", "mirror", "first_token_timeout_ms", "broken_stream")
    class MinQualityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    PATH_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    FAILOVER_FIELD_NUMBER: _ClassVar[int]
    RETRY_ON_FIELD_NUMBER: _ClassVar[int]
    PER_TRY_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    HASH_HEADER_FIELD_NUMBER: _ClassVar[int]
    EXPLORATION_RATE_FIELD_NUMBER: _ClassVar[int]
    EWMA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    HEDGE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_QUALITY_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    USE_DEFAULT_RULES_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_ROUTES_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_DEFAULT_ROUTE_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_MIN_RULES_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_FIELD_NUMBER: _ClassVar[int]
    LEARNING_EXPLORATION_RATE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_PRIOR_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    LLM_BACKEND_FIELD_NUMBER: _ClassVar[int]
    LLM_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    LLM_MIN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    LLM_CACHE_SIZE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_ANONYMOUS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_PER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    MIRROR_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    BROKEN_STREAM_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    headers: _containers.RepeatedCompositeFieldContainer[HeaderMatch]
    path_prefixes: _containers.RepeatedScalarFieldContainer[str]
    strategy: Strategy
    backends: _containers.RepeatedCompositeFieldContainer[PolicyBackend]
    failover: bool
    retry_on: _containers.RepeatedScalarFieldContainer[str]
    per_try_timeout_ms: int
    max_attempts: int
    timeout_ms: int
    hash_header: str
    exploration_rate: float
    ewma_alpha: float
    hedge_delay_ms: int
    min_quality: _containers.ScalarMap[str, float]
    rules: _containers.RepeatedCompositeFieldContainer[Rule]
    use_default_rules: bool
    routes: _containers.RepeatedCompositeFieldContainer[ClassRoute]
    semantic_routes: _containers.RepeatedCompositeFieldContainer[SemanticRoute]
    semantic_default_route: str
    semantic_min_rules_confidence: float
    learning: bool
    learning_exploration_rate: float
    learning_prior_weight: float
    quality_tolerance: float
    llm_backend: int
    llm_timeout_ms: int
    llm_min_confidence: float
    llm_cache_size: int
    budget: Budget
    compiled: bool
    idle_timeout_ms: int
    allow_anonymous: bool
    limits: RateLimits
    learning_per_prompt: bool
    rollout: Rollout
    mirror: Mirror
    first_token_timeout_ms: int
    broken_stream: BrokenStream
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., headers: _Optional[_Iterable[_Union[HeaderMatch, _Mapping]]] = ..., path_prefixes: _Optional[_Iterable[str]] = ..., strategy: _Optional[_Union[Strategy, str]] = ..., backends: _Optional[_Iterable[_Union[PolicyBackend, _Mapping]]] = ..., failover: _Optional[bool] = ..., retry_on: _Optional[_Iterable[str]] = ..., per_try_timeout_ms: _Optional[int] = ..., max_attempts: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., hash_header: _Optional[str] = ..., exploration_rate: _Optional[float] = ..., ewma_alpha: _Optional[float] = ..., hedge_delay_ms: _Optional[int] = ..., min_quality: _Optional[_Mapping[str, float]] = ..., rules: _Optional[_Iterable[_Union[Rule, _Mapping]]] = ..., use_default_rules: _Optional[bool] = ..., routes: _Optional[_Iterable[_Union[ClassRoute, _Mapping]]] = ..., semantic_routes: _Optional[_Iterable[_Union[SemanticRoute, _Mapping]]] = ..., semantic_default_route: _Optional[str] = ..., semantic_min_rules_confidence: _Optional[float] = ..., learning: _Optional[bool] = ..., learning_exploration_rate: _Optional[float] = ..., learning_prior_weight: _Optional[float] = ..., quality_tolerance: _Optional[float] = ..., llm_backend: _Optional[int] = ..., llm_timeout_ms: _Optional[int] = ..., llm_min_confidence: _Optional[float] = ..., llm_cache_size: _Optional[int] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., compiled: _Optional[bool] = ..., idle_timeout_ms: _Optional[int] = ..., allow_anonymous: _Optional[bool] = ..., limits: _Optional[_Union[RateLimits, _Mapping]] = ..., learning_per_prompt: _Optional[bool] = ..., rollout: _Optional[_Union[Rollout, _Mapping]] = ..., mirror: _Optional[_Union[Mirror, _Mapping]] = ..., first_token_timeout_ms: _Optional[int] = ..., broken_stream: _Optional[_Union[BrokenStream, str]] = ...) -> None: ...

class Mirror(_message.Message):
    __slots__ = ("backend", "percent", "max_in_flight")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    backend: int
    percent: float
    max_in_flight: int
    def __init__(self, backend: _Optional[int] = ..., percent: _Optional[float] = ..., max_in_flight: _Optional[int] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("candidate", "canary", "percent", "sticky_header", "epoch", "max_error_rate", "min_requests")
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    STICKY_HEADER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    candidate: str
    canary: bool
    percent: float
    sticky_header: str
    epoch: str
    max_error_rate: float
    min_requests: int
    def __init__(self, candidate: _Optional[str] = ..., canary: _Optional[bool] = ..., percent: _Optional[float] = ..., sticky_header: _Optional[str] = ..., epoch: _Optional[str] = ..., max_error_rate: _Optional[float] = ..., min_requests: _Optional[int] = ...) -> None: ...

class RateLimits(_message.Message):
    __slots__ = ("requests_per_minute", "tokens_per_minute", "max_concurrent", "count_cached_tokens", "fail_closed")
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    COUNT_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FAIL_CLOSED_FIELD_NUMBER: _ClassVar[int]
    requests_per_minute: int
    tokens_per_minute: int
    max_concurrent: int
    count_cached_tokens: bool
    fail_closed: bool
    def __init__(self, requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., max_concurrent: _Optional[int] = ..., count_cached_tokens: _Optional[bool] = ..., fail_closed: _Optional[bool] = ...) -> None: ...

class KeyHash(_message.Message):
    __slots__ = ("sha256", "expires_unix")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    expires_unix: int
    def __init__(self, sha256: _Optional[str] = ..., expires_unix: _Optional[int] = ...) -> None: ...

class JwtMatch(_message.Message):
    __slots__ = ("issuer", "claims")
    class ClaimsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    claims: _containers.ScalarMap[str, str]
    def __init__(self, issuer: _Optional[str] = ..., claims: _Optional[_Mapping[str, str]] = ...) -> None: ...

class JwtProvider(_message.Message):
    __slots__ = ("name", "issuer", "audiences", "jwks", "jwks_uri")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    JWKS_FIELD_NUMBER: _ClassVar[int]
    JWKS_URI_FIELD_NUMBER: _ClassVar[int]
    name: str
    issuer: str
    audiences: _containers.RepeatedScalarFieldContainer[str]
    jwks: str
    jwks_uri: str
    def __init__(self, name: _Optional[str] = ..., issuer: _Optional[str] = ..., audiences: _Optional[_Iterable[str]] = ..., jwks: _Optional[str] = ..., jwks_uri: _Optional[str] = ...) -> None: ...

class ConsumerBudget(_message.Message):
    __slots__ = ("hourly_usd", "daily_usd", "monthly_usd", "downgrade_at", "reject_when_exhausted", "fail_closed")
    HOURLY_USD_FIELD_NUMBER: _ClassVar[int]
    DAILY_USD_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_USD_FIELD_NUMBER: _ClassVar[int]
    DOWNGRADE_AT_FIELD_NUMBER: _ClassVar[int]
    REJECT_WHEN_EXHAUSTED_FIELD_NUMBER: _ClassVar[int]
    FAIL_CLOSED_FIELD_NUMBER: _ClassVar[int]
    hourly_usd: float
    daily_usd: float
    monthly_usd: float
    downgrade_at: float
    reject_when_exhausted: bool
    fail_closed: bool
    def __init__(self, hourly_usd: _Optional[float] = ..., daily_usd: _Optional[float] = ..., monthly_usd: _Optional[float] = ..., downgrade_at: _Optional[float] = ..., reject_when_exhausted: _Optional[bool] = ..., fail_closed: _Optional[bool] = ...) -> None: ...

class Consumer(_message.Message):
    __slots__ = ("id", "name", "team", "keys", "jwt", "aliases", "policies", "limits", "budget")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    JWT_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    team: str
    keys: _containers.RepeatedCompositeFieldContainer[KeyHash]
    jwt: _containers.RepeatedCompositeFieldContainer[JwtMatch]
    aliases: _containers.RepeatedScalarFieldContainer[str]
    policies: _containers.RepeatedScalarFieldContainer[str]
    limits: RateLimits
    budget: ConsumerBudget
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., team: _Optional[str] = ..., keys: _Optional[_Iterable[_Union[KeyHash, _Mapping]]] = ..., jwt: _Optional[_Iterable[_Union[JwtMatch, _Mapping]]] = ..., aliases: _Optional[_Iterable[str]] = ..., policies: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[RateLimits, _Mapping]] = ..., budget: _Optional[_Union[ConsumerBudget, _Mapping]] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("hourly_usd", "daily_usd", "downgrade_at", "reject_when_exhausted")
    HOURLY_USD_FIELD_NUMBER: _ClassVar[int]
    DAILY_USD_FIELD_NUMBER: _ClassVar[int]
    DOWNGRADE_AT_FIELD_NUMBER: _ClassVar[int]
    REJECT_WHEN_EXHAUSTED_FIELD_NUMBER: _ClassVar[int]
    hourly_usd: float
    daily_usd: float
    downgrade_at: float
    reject_when_exhausted: bool
    def __init__(self, hourly_usd: _Optional[float] = ..., daily_usd: _Optional[float] = ..., downgrade_at: _Optional[float] = ..., reject_when_exhausted: _Optional[bool] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("task_type", "complexity", "tier", "confidence", "reason", "estimated_tokens", "class_key")
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    COMPLEXITY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CLASS_KEY_FIELD_NUMBER: _ClassVar[int]
    task_type: str
    complexity: str
    tier: str
    confidence: float
    reason: str
    estimated_tokens: int
    class_key: str
    def __init__(self, task_type: _Optional[str] = ..., complexity: _Optional[str] = ..., tier: _Optional[str] = ..., confidence: _Optional[float] = ..., reason: _Optional[str] = ..., estimated_tokens: _Optional[int] = ..., class_key: _Optional[str] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("backend", "kept", "reason")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    backend: str
    kept: bool
    reason: str
    def __init__(self, backend: _Optional[str] = ..., kept: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("policy", "strategy", "backend", "provider", "model", "target", "reason", "classification", "candidates", "config_generation")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_GENERATION_FIELD_NUMBER: _ClassVar[int]
    policy: str
    strategy: str
    backend: str
    provider: str
    model: str
    target: str
    reason: str
    classification: Classification
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    config_generation: int
    def __init__(self, policy: _Optional[str] = ..., strategy: _Optional[str] = ..., backend: _Optional[str] = ..., provider: _Optional[str] = ..., model: _Optional[str] = ..., target: _Optional[str] = ..., reason: _Optional[str] = ..., classification: _Optional[_Union[Classification, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., config_generation: _Optional[int] = ...) -> None: ...
