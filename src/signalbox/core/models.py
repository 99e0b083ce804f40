"""Resource model of `AIProvider` and `RoutingPolicy` (signalbox.io/v1alpha1).

This is the single source of truth for both CRDs: the field descriptions here become
`kubectl explain` output, and the compiler validates every object through these models.
Field names are camelCase on the wire (as Kubernetes users write them) and snake_case in Python.
Checks that need more than one field live in `model_validator`s; checks that need more than one
object (a policy naming a provider) live in `signalbox.core.compiler`.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

GROUP = "signalbox.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class Spec(BaseModel):
    """Base of every spec model: camelCase on the wire, unknown fields are errors."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ProviderType(StrEnum):
    OPENAI = "openai"
    AZURE_OPENAI = "azure-openai"
    OPENAI_COMPATIBLE = "openai-compatible"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"
    BEDROCK = "bedrock"


# Where each provider type expects its key when `auth` names no header: (header, prefix).
_KEY_HEADERS = {
    ProviderType.AZURE_OPENAI: ("api-key", ""),
    ProviderType.ANTHROPIC: ("x-api-key", ""),
    ProviderType.GEMINI: ("x-goog-api-key", ""),
}


class Capability(StrEnum):
    TOOLS = "tools"
    VISION = "vision"
    JSON = "json"
    STREAMING = "streaming"
    EMBEDDINGS = "embeddings"


class Strategy(StrEnum):
    WEIGHTED = "weighted"
    ROUND_ROBIN = "round-robin"
    FAILOVER = "failover"
    COST = "cost"
    LATENCY = "latency"
    LEAST_BUSY = "least-busy"
    HASH = "hash"
    CLASSIFIED = "classified"
    FASTEST = "fastest"


class Complexity(StrEnum):
    SIMPLE = "simple"
    MODERATE = "moderate"
    COMPLEX = "complex"
    EXPERT = "expert"


class TaskType(StrEnum):
    CHAT = "chat"
    QA = "qa"
    SUMMARIZATION = "summarization"
    CODE = "code"
    MATH = "math"
    REASONING = "reasoning"
    CREATIVE = "creative"
    EXTRACTION = "extraction"
    TRANSLATION = "translation"


class RetryOn(StrEnum):
    """Failure kinds that move a request to the next backend of its chain (Envoy retry_on)."""

    SERVER_ERROR = "5xx"
    RATE_LIMITED = "429"
    RESET = "reset"
    CONNECT_FAILURE = "connect-failure"
    PER_TRY_TIMEOUT = "per-try-timeout"
    # 401/403 from a provider: its key was revoked or is wrong; the next backend has its own.
    AUTH = "auth"


class BrokenStream(StrEnum):
    """What a client gets when its stream breaks (a reset, or the idle deadline) after tokens
    were sent: the failover of Envoy's router ends with the headers."""

    # Envoy alone: the client's connection is cut (every SDK raises a protocol error).
    CLOSE = "close"
    # Relayed: a well-formed error event in the client's API format, and no normal end.
    ERROR = "error"
    # Relayed: the answer goes on from the next backend of the chain, given the text sent so far.
    CONTINUE = "continue"


# --------------------------------------------------------------------------- AIProvider


class SecretKeyRef(Spec):
    name: str = Field(min_length=1, description="Name of a Secret in the provider's namespace.")
    key: str = Field(min_length=1, description="Key inside the Secret whose value is the API key.")


def cel(*rules: tuple[str, str]) -> ConfigDict:
    """Model config carrying Kubernetes CEL rules (x-kubernetes-validations) for the CRD.

    Each rule mirrors a Python validator of the same model, so the API server rejects what
    `signalbox validate` rejects, with the same wording.
    """
    return ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}
    )


class AuthFormat(StrEnum):
    API_KEY = "api-key"
    GOOGLE_CREDENTIALS = "google-credentials"
    AWS_CREDENTIALS = "aws-credentials"


class ProviderAuth(Spec):
    """Where the API key lives. Exactly one source; omit `auth` for keyless endpoints."""

    model_config = cel(
        (
            "[has(self.secretRef), has(self.env), has(self.file)].filter(x, x).size() == 1",
            "set exactly one of secretRef, env, file",
        ),
    )

    secret_ref: SecretKeyRef | None = Field(None, description="Kubernetes Secret holding the key (in a cluster).")
    env: str | None = Field(None, description="Environment variable of the gateway holding the key (local runs).")
    file: str | None = Field(None, description="File whose content is the key (local runs).")
    format: AuthFormat = Field(
        AuthFormat.API_KEY,
        description="What the source holds. `api-key` (default): the key itself. `google-credentials`: a Google "
        "credentials JSON (a service account key, or a workload identity federation config such as GKE's or "
        "AWS's), from which the gateway mints OAuth2 access tokens (scope cloud-platform) with google-auth and "
        "sends them as `Authorization: Bearer <token>`, renewed before they expire. Use it for Vertex AI. "
        "`aws-credentials` (type bedrock only): an AWS shared credentials file whose `[default]` profile holds "
        "aws_access_key_id, aws_secret_access_key and optionally aws_session_token; Envoy signs each request "
        "with it (SigV4). Omit `auth` on a bedrock provider to use the gateway's own AWS credential chain "
        "(environment, web identity for IRSA, container or instance role).",
    )
    header: str | None = Field(
        None,
        description="Request header that carries the key. Default: `Authorization` (`api-key` for azure-openai, "
        "`x-api-key` for anthropic, `x-goog-api-key` for gemini; `Authorization` for google-credentials).",
    )
    prefix: str | None = Field(
        None,
        description="Text put before the key in the header. Default: `Bearer ` (empty for azure-openai, "
        "anthropic and gemini; `Bearer ` for google-credentials).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ProviderAuth:
        sources = [s for s in (self.secret_ref, self.env, self.file) if s]
        if len(sources) != 1:
            raise ValueError("set exactly one of secretRef, env, file")
        return self


class ModelSpec(Spec):
    name: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
        description="Name policies use to refer to this model (`provider/model` in backends).",
    )
    upstream_name: str | None = Field(
        None,
        description="Model (or Azure deployment) name sent upstream. Default: `name`.",
    )
    input_price_per_1m: float = Field(0.0, ge=0, description="USD per 1M input tokens.")
    output_price_per_1m: float = Field(0.0, ge=0, description="USD per 1M output tokens.")
    quality: float = Field(0.5, ge=0, le=1, description="Relative answer quality 0..1, used by cost routing.")
    context_window: int = Field(8192, ge=1, description="Maximum tokens of prompt + answer.")
    capabilities: list[Capability] = Field(
        default_factory=lambda: [Capability.STREAMING],
        description="What the model supports; cost routing skips models lacking what a request needs.",
    )
    latency_prior_ms: float = Field(1000.0, gt=0, description="Expected latency before any has been measured.")

    @property
    def upstream(self) -> str:
        return self.upstream_name or self.name


class HealthCheckSpec(Spec):
    path: str = Field("/models", description="Path below baseUrl probed with the key (GET).")
    url: str | None = Field(
        None,
        pattern=r"^https?://[^/?#]+",
        description="Absolute URL probed instead of baseUrl + path, for providers that serve no GET below "
        "their base path (Vertex AI: https://<region>-aiplatform.googleapis.com/v1/publishers/google/models/<model>). "
        "It gets the provider's key, as the base URL does.",
    )
    interval_seconds: int = Field(30, ge=1, description="Seconds between probes.")
    timeout_seconds: int = Field(5, ge=1, description="Seconds before a probe counts as failed.")
    failure_threshold: int = Field(3, ge=1, description="Consecutive failures before the provider is marked unhealthy.")
    recovery_threshold: int = Field(
        2, ge=1, description="Consecutive successes before an unhealthy provider is healthy again."
    )


# Bedrock's runtime endpoints name their region: https://bedrock-runtime[-fips].<region>.amazonaws.com[.cn]
BEDROCK_HOST = re.compile(r"^bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?$")


class AwsSpec(Spec):
    region: str = Field(
        pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$",
        description="AWS region requests are signed for (SigV4), e.g. us-east-1. Default: the region in a "
        "bedrock-runtime.<region>.amazonaws.com baseUrl.",
    )


class AzureSpec(Spec):
    api_version: str = Field("2024-10-21", description="`api-version` query parameter sent to Azure OpenAI.")


_BEDROCK_AUTH = (
    "a bedrock provider signs its requests with AWS credentials: set auth.format aws-credentials, or omit "
    "auth to use the gateway's AWS credential chain (environment, IRSA web identity, instance role)"
)
_BEDROCK_REGION = "a bedrock provider needs aws.region unless its baseUrl is bedrock-runtime.<region>.amazonaws.com"


# A base URL that ends with an operation the gateway appends (a URL copied from an API
# reference's example request): every request would go to <operation>/<operation>.
_OPERATION_SUFFIX = "/(chat/completions|completions|embeddings|messages|responses)/?$"
_OPERATION_IN_BASE_URL = (
    "baseUrl must be the API's root, without the operation the gateway appends to it "
    "(/chat/completions, /completions, /embeddings, /messages, /responses): e.g. https://api.anthropic.com/v1"
)
# OpenAI's and Anthropic's own hosts serve their APIs below /v1 only: without it every request is a 404.
_BARE_OFFICIAL_HOST = "^https?://api[.](openai|anthropic)[.]com/?$"
_OFFICIAL_NEEDS_V1 = "api.openai.com and api.anthropic.com serve their APIs below /v1: baseUrl must end with /v1"
# Paths the gateway builds itself below these types' base URLs.
_AZURE_ROOT = (
    "an azure-openai baseUrl is the resource's endpoint (https://<resource>.openai.azure.com): "
    "the gateway appends /openai/deployments/<model>/..."
)
_GEMINI_ROOT = "a gemini baseUrl stops before /models: the gateway appends /models/<model>:generateContent"


class AIProviderSpec(Spec):
    """An LLM API endpoint and the models it serves."""

    model_config = cel(
        ("self.models.all(m, self.models.filter(n, n.name == m.name).size() == 1)", "model names must be unique"),
        (
            "self.baseUrl.matches('^https?://[^/?#]+[^?#]*$')",
            "baseUrl must be an http:// or https:// URL with a host and no query or fragment",
        ),
        (f"!self.baseUrl.matches('{_OPERATION_SUFFIX}')", _OPERATION_IN_BASE_URL),
        (f"!self.baseUrl.matches('{_BARE_OFFICIAL_HOST}')", _OFFICIAL_NEEDS_V1),
        (
            "!has(self.type) || self.type != 'azure-openai' || !self.baseUrl.matches('/openai(/|$)')",
            _AZURE_ROOT,
        ),
        ("!has(self.type) || self.type != 'gemini' || !self.baseUrl.matches('/models(/|:|$)')", _GEMINI_ROOT),
        (
            "!has(self.type) || self.type != 'bedrock' || !has(self.auth) || "
            "(has(self.auth.format) && self.auth.format == 'aws-credentials')",
            _BEDROCK_AUTH,
        ),
        (
            "!has(self.auth) || !has(self.auth.format) || self.auth.format != 'aws-credentials' || "
            "(has(self.type) && self.type == 'bedrock')",
            "auth.format aws-credentials is for type bedrock only",
        ),
        (
            "!has(self.type) || self.type != 'bedrock' || has(self.aws) || "
            "self.baseUrl.matches('^https://bedrock-runtime(-fips)?[.][a-z0-9-]+[.]amazonaws[.]com([.]cn)?(/.*)?$')",
            _BEDROCK_REGION,
        ),
    )

    type: ProviderType = Field(
        ProviderType.OPENAI_COMPATIBLE,
        description="API dialect: openai, azure-openai (deployment paths, api-key header), "
        "openai-compatible (vLLM, Ollama, Together, Groq), anthropic (Messages API, x-api-key "
        "header), gemini (Gemini API generateContent, x-goog-api-key header) or bedrock (AWS Bedrock's "
        "Converse API, SigV4-signed: see auth and aws). Clients of any "
        "API reach backends of any type: requests, answers, errors and streams are translated "
        "per attempt.",
    )
    base_url: str = Field(
        description="URL that `/chat/completions` (anthropic: `/messages`; gemini: "
        "`/models/<model>:generateContent`; bedrock: `/model/<model>/converse`) is appended to, e.g. "
        "https://api.openai.com/v1, https://api.anthropic.com/v1, https://generativelanguage.googleapis.com/v1beta "
        "or https://bedrock-runtime.us-east-1.amazonaws.com."
    )
    auth: ProviderAuth | None = Field(None, description="Where the API key comes from.")
    azure: AzureSpec | None = Field(None, description="Azure OpenAI settings (type azure-openai).")
    aws: AwsSpec | None = Field(None, description="AWS settings (type bedrock): the region requests are signed for.")
    models: list[ModelSpec] = Field(min_length=1, description="Models this provider serves.")
    health_check: HealthCheckSpec = Field(default_factory=HealthCheckSpec, description="Active health probe settings.")
    connect_timeout_ms: int = Field(2000, ge=1, description="TCP connect timeout to the provider, in milliseconds.")
    idle_timeout_ms: int | None = Field(
        None,
        ge=100,
        le=3600000,
        description="How long the gateway keeps an idle connection to the provider open, in milliseconds. "
        "Keep it below the server's own keep-alive timeout: a request sent on a connection the server is "
        "closing fails unanswered (a 503 with one backend, a needless failover with more). Default: 4000 "
        "for http:// base URLs (vLLM's, SGLang's and LiteLLM's servers close idle connections after 5 s), "
        "50000 for https:// (hosted APIs keep theirs 60 s or more; a new connection costs a TLS handshake).",
    )
    stream_usage: bool = Field(
        True,
        description="Ask for token usage at the end of streams (`stream_options.include_usage`, which "
        "accounting and budgets read), on OpenAI-API backends. Set false for servers that refuse the field "
        "(some OpenAI-compatible APIs answer it with a 400 or 422): the gateway then sends no "
        "`stream_options`, not even a client's, and a stream is counted from the usage the server sends on "
        "its own; without any, budgets and limits charge an estimate from the answer's size.",
    )
    sanitize_streams: bool | None = Field(
        None,
        description="Pass this provider's streams on whole events only, dropping any event whose data is "
        "not a JSON object (a malformed event would make the client's SDK raise mid-stream). Costs "
        "LuaJIT time per chunk (bench/README.md). Default: on for openai-compatible servers, off for "
        "openai and azure-openai.",
    )
    responses_api: bool | None = Field(
        None,
        description="The provider serves OpenAI's Responses API itself (POST <baseUrl>/responses): a client "
        "calling /v1/responses is passed through untranslated (stateful features such as previous_response_id "
        "included) instead of being translated to chat completions. Default: true for type openai, false "
        "otherwise (set it for OpenAI-compatible servers that implement /responses).",
    )

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError("baseUrl must be an http:// or https:// URL with a host and no query or fragment")
        if re.search(_OPERATION_SUFFIX, value):
            raise ValueError(_OPERATION_IN_BASE_URL)
        if re.match(_BARE_OFFICIAL_HOST, value):
            raise ValueError(_OFFICIAL_NEEDS_V1)
        return value.rstrip("/")

    @model_validator(mode="after")
    def _root_of_type(self) -> AIProviderSpec:
        if self.type == ProviderType.AZURE_OPENAI and re.search("/openai(/|$)", self.base_url):
            raise ValueError(_AZURE_ROOT)
        if self.type == ProviderType.GEMINI and re.search("/models(/|:|$)", self.base_url):
            raise ValueError(_GEMINI_ROOT)
        return self

    def key_header(self) -> tuple[str, str]:
        """(header, prefix) the key is sent in: `auth`'s own, else the type's default."""
        header, prefix = _KEY_HEADERS.get(self.type, ("authorization", "Bearer "))
        if self.auth is None:
            return header, prefix
        if self.auth.format == AuthFormat.GOOGLE_CREDENTIALS:
            header, prefix = "authorization", "Bearer "  # an OAuth2 access token, whatever the API
        if self.auth.format == AuthFormat.AWS_CREDENTIALS:
            return "", ""  # no header carries the key: Envoy signs the request with it
        return (self.auth.header or header).lower(), self.auth.prefix if self.auth.prefix is not None else prefix

    def aws_region(self) -> str:
        """The region a bedrock provider's requests are signed for ("" when none can be known)."""
        if self.aws is not None:
            return self.aws.region
        found = BEDROCK_HOST.match(urlsplit(self.base_url).hostname or "")
        return found.group(1) if found else ""

    @model_validator(mode="after")
    def _bedrock(self) -> AIProviderSpec:
        if self.type == ProviderType.BEDROCK:
            if self.auth is not None and self.auth.format != AuthFormat.AWS_CREDENTIALS:
                raise ValueError(_BEDROCK_AUTH)
            if not self.aws_region():
                raise ValueError(_BEDROCK_REGION)
        elif self.auth is not None and self.auth.format == AuthFormat.AWS_CREDENTIALS:
            raise ValueError("auth.format aws-credentials is for type bedrock only")
        return self

    @model_validator(mode="after")
    def _unique_models(self) -> AIProviderSpec:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique, repeated: {', '.join(dup)}")
        return self


# --------------------------------------------------------------------------- RoutingPolicy


# An HTTP header name (RFC 9110 token characters, without the quote, so that Envoy can be asked
# for the header by name in a CEL attribute).
HEADER_NAME = r"^[A-Za-z0-9!#$%&*+.^_`|~-]+$"


class HeaderMatch(Spec):
    name: str = Field(
        min_length=1, max_length=256, pattern=HEADER_NAME, description="Request header name (case-insensitive)."
    )
    value: str = Field(description="Exact value the header must have.")


# A model alias: what a client sends as `model`, and an id of the gateway's models API (no
# control characters: the generated models script keeps the aliases one per line).
Alias = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]


class PolicyMatch(Spec):
    models: list[Alias] = Field(
        min_length=1,
        description="Model aliases clients send in the body's `model` (e.g. `auto`) that this policy serves "
        "(1 to 256 characters, no control characters).",
    )
    headers: list[HeaderMatch] = Field(
        default_factory=list,
        description="Extra headers a request must carry; a policy with more matching headers "
        "wins over one with fewer for the same alias.",
    )
    path_prefixes: list[str] = Field(
        default_factory=list,
        description="Only requests whose path starts with one of these (default: all API paths).",
    )


class BackendRef(Spec):
    provider: str = Field(min_length=1, description="AIProvider name (same namespace).")
    model: str = Field(min_length=1, description="Model name declared by that provider.")
    weight: int = Field(1, ge=0, le=10000, description="Share of traffic for weighted routing.")
    priority: int = Field(0, ge=0, description="Failover order: lower first. Ties keep listing order.")

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.model}"


class FailoverSpec(Spec):
    enabled: bool = Field(
        True,
        description="On failure, retry the same request on the other backends in priority "
        "order (with their own model, auth and path).",
    )
    retry_on: list[RetryOn] = Field(
        default_factory=lambda: [
            RetryOn.SERVER_ERROR,
            RetryOn.RATE_LIMITED,
            RetryOn.RESET,
            RetryOn.CONNECT_FAILURE,
            RetryOn.AUTH,
        ],
        description="Failures that trigger failover: 5xx, 429 (the next backend at once, whatever "
        "its Retry-After), reset, connect-failure, per-try-timeout (implied by 5xx), auth (401/403).",
    )
    per_try_timeout_ms: int | None = Field(
        None,
        ge=1,
        description="First-response deadline per backend: if its response has not started after "
        "this long (for a non-streamed answer, the whole answer), it is abandoned and the next one "
        "tried; a backend that timed out is not tried again within the request. Default: none.",
    )
    first_token_timeout_ms: int | None = Field(
        None,
        ge=1,
        description="Time-to-first-token deadline per backend: if no byte of its answer's body has come after "
        "this long (a stream whose headers came at once counts only from its first event), it is abandoned and "
        "the next backend tried, and the client sees only the answer that came in time. A streamed answer's "
        "headers wait in the gateway until its first body bytes, which costs two messages to the ext_proc per "
        "streamed attempt of this policy. It replaces perTryTimeoutMs (the first token comes after the headers); "
        "for a non-streamed answer, whose first byte comes with the rest, it is the whole answer's deadline. "
        "Default: none.",
    )
    idle_timeout_ms: int | None = Field(
        None,
        ge=1,
        description="Silence deadline per backend: no byte for this long (before or during its "
        "answer) abandons it. Before the answer started the next backend is tried; during a stream "
        "the client's stream ends with an error, never as a normal end. Default: none (a "
        "non-streamed answer of a reasoning model can be silent for minutes).",
    )
    max_attempts: int | None = Field(
        None, ge=1, description="Attempts in total, first included. Default: the chain's length."
    )
    on_broken_stream: BrokenStream = Field(
        BrokenStream.CLOSE,
        description="A stream that breaks after tokens were sent (the provider resets it, or is silent past "
        "idleTimeoutMs): `close` cuts the client's connection (Envoy alone; every SDK raises a protocol "
        "error); `error` ends the client's stream with a well-formed error event in its API's format "
        "(never [DONE]); `continue` asks the next backend of the chain to go on from the text already "
        "sent (as the start of its answer where its API takes one, Anthropic's and Bedrock's; otherwise "
        "as a request to continue it) and the client sees one uninterrupted stream, or the error event "
        "if no backend can. `error` and `continue` pass this policy's streams through the gateway's "
        "stream relay (Python), which costs throughput (bench/README.md, Relayed streams). Default: close.",
    )


class HashSpec(Spec):
    header: str | None = Field(
        None,
        max_length=256,
        pattern=HEADER_NAME,
        description="Header whose value keeps a client on one backend (e.g. x-user-id). Default: the client address.",
    )


class LatencySpec(Spec):
    exploration_rate: float = Field(
        0.05, ge=0, le=1, description="Share of requests sent to a random backend to keep latency estimates fresh."
    )
    ewma_alpha: float = Field(0.3, gt=0, le=1, description="Weight of the newest observation in the latency average.")


class HedgeSpec(Spec):
    delay_ms: int = Field(
        1500,
        ge=1,
        description="For strategy `fastest`: if the first backend has not answered after this "
        "long, the next one is raced and the first answer wins.",
    )


class LearningSpec(Spec):
    enabled: bool = Field(
        False,
        description="Learn each backend's quality per request class from outcomes and feedback, and let cost "
        "routing use what was learned instead of the declared quality.",
    )
    exploration_rate: float = Field(
        0.05, ge=0, le=1, description="Share of requests sent to a random eligible backend to keep learning."
    )
    prior_weight: float = Field(
        5.0, ge=0, description="How many observations the declared quality counts for before any are made."
    )
    per_prompt: bool = Field(
        True,
        description="Learn per prompt too: a backend's expected quality on a request leans on its scores for "
        "the most similar earlier prompts (by meaning), so easy and hard prompts of one class can go to "
        "different backends. The class figure stays the fallback where few similar prompts were scored. "
        "What one gateway replica learns reaches the others within a sync interval (replica ConfigMap).",
    )


class CostSpec(Spec):
    quality_tolerance: float | None = Field(
        None,
        ge=0,
        le=1,
        description="If set: the cheapest backend whose (learned or declared) quality is within this of the best "
        "eligible backend's, instead of the per-complexity minimum quality.",
    )
    min_quality: dict[Complexity, float] = Field(
        default_factory=lambda: {
            Complexity.SIMPLE: 0.0,
            Complexity.MODERATE: 0.5,
            Complexity.COMPLEX: 0.7,
            Complexity.EXPERT: 0.85,
        },
        description="Lowest model quality acceptable for each request complexity.",
    )

    @field_validator("min_quality")
    @classmethod
    def _range(cls, value: dict[Complexity, float]) -> dict[Complexity, float]:
        bad = [k for k, v in value.items() if not 0 <= v <= 1]
        if bad:
            raise ValueError(f"quality thresholds must be within 0..1 (bad: {bad})")
        return value


class OnExhausted(StrEnum):
    CHEAPEST = "cheapest"
    REJECT = "reject"


class BudgetSpec(Spec):
    """Spend limits of one policy, in USD per calendar hour and day (UTC).

    Spend is what providers report as usage times the model's prices, summed over every gateway
    replica; a request still in flight counts at its expected cost until it finishes. Crossing
    `downgradeAt` of a limit makes the policy cheaper; reaching a limit applies `onExhausted`
    until the window resets.
    """

    model_config = cel(("has(self.hourlyUsd) || has(self.dailyUsd)", "a budget needs hourlyUsd or dailyUsd"))

    hourly_usd: float | None = Field(None, gt=0, description="USD the policy may spend per calendar hour (UTC).")
    daily_usd: float | None = Field(None, gt=0, description="USD the policy may spend per calendar day (UTC).")
    downgrade_at: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Share of a limit after which the policy downgrades: whatever its strategy, it picks the "
        "cheapest eligible backend whose quality meets the minimum of the next lower complexity.",
    )
    on_exhausted: OnExhausted = Field(
        OnExhausted.REJECT,
        description="When a limit is reached: `reject` answers 429 (code budget_exhausted) until the window "
        "resets; `cheapest` keeps serving on the cheapest eligible backend.",
    )

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetSpec:
        if self.hourly_usd is None and self.daily_usd is None:
            raise ValueError("a budget needs hourlyUsd or dailyUsd")
        return self


class ClassRule(Spec):
    """A rule of classification tier 1. All conditions given must hold for the rule to fire."""

    model_config = cel(
        ("has(self.taskType) || has(self.complexity)", "a rule must set taskType, complexity or both"),
    )

    name: str = Field(min_length=1, description="Shown as the reason when the rule decides.")
    patterns: list[str] = Field(
        default_factory=list, description="Regular expressions (case-insensitive), any may match."
    )
    keywords: list[str] = Field(default_factory=list, description="Words or phrases (case-insensitive), any may match.")
    min_tokens: int | None = Field(None, ge=0, description="Estimated prompt tokens at least.")
    max_tokens: int | None = Field(None, ge=0, description="Estimated prompt tokens at most.")
    has_tools: bool | None = Field(None, description="Request declares tools.")
    has_images: bool | None = Field(None, description="Request contains image parts.")
    json_mode: bool | None = Field(None, description="Request asks for JSON output.")
    task_type: TaskType | None = Field(None, description="Task type set when the rule fires.")
    complexity: Complexity | None = Field(None, description="Complexity set when the rule fires.")

    @model_validator(mode="after")
    def _meaningful(self) -> ClassRule:
        if self.task_type is None and self.complexity is None:
            raise ValueError("a rule must set taskType, complexity or both")
        return self


class SemanticRoute(Spec):
    """A class of requests described by examples; a request joins the most similar route."""

    name: str = Field(min_length=1, description="Class name: shown as the reason, and what learning is keyed by.")
    utterances: list[str] = Field(
        min_length=1, description="Example requests of this class (paraphrases are matched by meaning)."
    )
    threshold: float = Field(
        0.5, ge=-1, le=1, description="Lowest cosine similarity to one of the utterances that joins this route."
    )
    task_type: TaskType | None = Field(None, description="Task type of requests on this route.")
    complexity: Complexity | None = Field(None, description="Complexity of requests on this route.")


class SemanticSpec(Spec):
    routes: list[SemanticRoute] = Field(min_length=1, description="Semantic routes, matched by embeddings.")
    default_route: str | None = Field(
        None, description="Route for requests similar to none (default: keep the rules tier's answer)."
    )
    min_rules_confidence: float = Field(
        0.8,
        ge=0,
        le=1,
        description="The semantic tier runs only when the rules tier is less confident than this.",
    )


class LlmClassifierSpec(Spec):
    """Tier 3: ask a cheap model what the request is, when the cheaper tiers were unsure."""

    provider: str = Field(min_length=1, description="AIProvider (same namespace) serving the classifier model.")
    model: str = Field(min_length=1, description="Model name declared by that provider.")
    timeout_ms: int = Field(
        800,
        ge=10,
        le=10000,
        description="Give up after this long and keep the earlier tiers' answer; the request never fails.",
    )
    min_confidence: float = Field(
        0.6, ge=0, le=1, description="Runs only when the rules and semantic tiers were less confident than this."
    )
    cache_size: int = Field(10000, ge=0, description="Answers remembered by prompt hash (0: no cache).")


class ClassificationSpec(Spec):
    use_default_rules: bool = Field(
        True,
        description=(
            "Apply the built-in classification after the policy's rules: the trained task-type model"
            " (unless semantic routes are declared) and the keyword task-type and complexity rules,"
            " whose task type stands only where the model is unsure."
        ),
    )
    rules: list[ClassRule] = Field(
        default_factory=list, description="Policy rules, tried in order before the defaults."
    )
    semantic: SemanticSpec | None = Field(
        None, description="Tier 2: embedding similarity to example utterances (a model shipped in a package)."
    )
    llm: LlmClassifierSpec | None = Field(None, description="Tier 3: a cheap model classifies, with a strict timeout.")


class ClassRoute(Spec):
    """One row of a classified policy's table: requests of these classes go to these backends."""

    task_types: list[TaskType] = Field(default_factory=list, description="Task types this row takes (empty: any).")
    complexities: list[Complexity] = Field(
        default_factory=list, description="Complexities this row takes (empty: any)."
    )
    backends: list[str] = Field(min_length=1, description="`provider/model` keys from the policy's backends, weighted.")


class RolloutMode(StrEnum):
    SHADOW = "shadow"
    CANARY = "canary"


class RolloutSpec(Spec):
    """Try a candidate policy on this policy's traffic before it takes over (issue 17)."""

    candidate: str = Field(
        min_length=1,
        description="RoutingPolicy (same namespace) whose decisions are tried. Give it an alias no client "
        "uses if it should serve nothing of its own.",
    )
    mode: RolloutMode = Field(
        RolloutMode.SHADOW,
        description="`shadow`: the candidate decides every request after the live decision, which alone is "
        "served; the pair is counted. `canary`: `percent` of the traffic is decided and served by the candidate.",
    )
    percent: float = Field(0.0, ge=0, le=100, description="Canary: share of the traffic the candidate serves.")
    sticky_header: str | None = Field(
        None,
        max_length=256,
        pattern=HEADER_NAME,
        description="Header whose value keeps a caller on one side of a canary (e.g. x-user-id). Default: the "
        "client address.",
    )
    max_error_rate: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Pause the rollout when more than this share of the candidate's requests fail (canary: "
        "served by it and answered 5xx, 429 or a broken stream; shadow: it could not decide). Paused, the live "
        "policy serves everything until the candidate or this rollout is edited.",
    )
    min_requests: int = Field(
        20,
        ge=1,
        le=1_000_000,
        description="Candidate requests counted before the error rate can pause the rollout.",
    )


class MirrorSpec(Spec):
    """Copy a sampled share of this policy's requests to a backend being qualified (issue 17)."""

    provider: str = Field(min_length=1, description="AIProvider (same namespace) of the backend that gets copies.")
    model: str = Field(min_length=1, description="Model declared by that provider.")
    percent: float = Field(
        10.0,
        ge=0,
        le=100,
        description="Share of requests copied, sampled at random. Each copy is sent after the live decision, "
        "asks for the whole answer at once (never a stream), and its answer is read for status, latency and "
        "tokens, then discarded; its cost is counted apart (signalbox_mirror_cost_usd_total), never charged "
        "to budgets or limits.",
    )
    max_in_flight: int = Field(
        32,
        ge=1,
        le=10_000,
        description="Copies open at once per gateway worker; beyond this a copy is dropped (counted), so a slow "
        "mirror never holds memory or slows the live traffic.",
    )


class RoutingPolicySpec(Spec):
    """Which requests a policy takes and how it chooses among its backends."""

    model_config = cel(
        (
            "self.backends.all(b, self.backends.filter(c, c.provider == b.provider && c.model == b.model).size() == 1)",
            "backends must be unique",
        ),
        (
            "self.strategy != 'classified' || (has(self.routes) && size(self.routes) > 0)",
            "strategy classified needs at least one entry in routes",
        ),
        (
            "self.strategy != 'weighted' || self.backends.exists(b, !has(b.weight) || b.weight > 0)",
            "strategy weighted needs at least one backend with weight > 0",
        ),
        (
            "!has(self.routes) || self.routes.all(r, r.backends.all(k, "
            "self.backends.exists(b, b.provider + '/' + b.model == k)))",
            "routes name backends not in spec.backends",
        ),
    )

    match: PolicyMatch = Field(description="Which requests this policy takes.")
    strategy: Strategy = Field(Strategy.WEIGHTED, description="How the first backend is chosen.")
    backends: list[BackendRef] = Field(min_length=1, description="Backends this policy may use.")
    failover: FailoverSpec = Field(default_factory=FailoverSpec, description="In-request failover.")
    timeout_ms: int = Field(
        120_000,
        ge=1,
        description="Whole-request budget in milliseconds, every attempt included: however the "
        "providers behave, the call ends within it (a 504 if nothing answered).",
    )
    hash: HashSpec = Field(default_factory=HashSpec, description="Sticky routing (strategy hash).")
    latency: LatencySpec = Field(default_factory=LatencySpec, description="Strategy latency.")
    hedge: HedgeSpec = Field(default_factory=HedgeSpec, description="Strategy fastest.")
    cost: CostSpec = Field(default_factory=CostSpec, description="Strategy cost.")
    classification: ClassificationSpec = Field(
        default_factory=ClassificationSpec, description="Request classification (tier 1 rules, tier 2 semantic)."
    )
    learning: LearningSpec = Field(default_factory=LearningSpec, description="Adaptive routing from outcomes.")
    budget: BudgetSpec | None = Field(
        None,
        description="Spend limits per UTC hour and/or day: downgrade, then refuse or go cheapest. Spend is "
        "reported usage times the model's prices, over all gateway replicas; a request in flight counts at its "
        "expected cost until it finishes.",
    )
    routes: list[ClassRoute] = Field(
        default_factory=list,
        description="Strategy classified: first row matching the request's class wins; "
        "requests matching none use all backends.",
    )
    allow_anonymous: bool = Field(
        False,
        description="Once any Consumer exists, callers without a valid key or token get 401; this policy "
        "serves them anyway. (With no Consumer declared every caller is anonymous and served.)",
    )
    limits: RateLimits | None = Field(
        None, description="Limits of the whole policy, every caller together (each Consumer has its own too)."
    )
    mirror: MirrorSpec | None = Field(
        None,
        description="Copy a share of the requests to another backend to qualify it: answers discarded, "
        "measured and costed apart. A policy with a mirror is decided by the ext_proc.",
    )
    rollout: RolloutSpec | None = Field(
        None,
        description="Shadow or canary a candidate policy on this policy's traffic; promote or roll back by "
        "editing this field.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RoutingPolicySpec:
        keys = [b.key for b in self.backends]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"backends must be unique, repeated: {', '.join(dup)}")
        if self.strategy == Strategy.CLASSIFIED and not self.routes:
            raise ValueError("strategy classified needs at least one entry in routes")
        if self.strategy == Strategy.WEIGHTED and not any(b.weight for b in self.backends):
            raise ValueError("strategy weighted needs at least one backend with weight > 0")
        unknown = sorted({k for r in self.routes for k in r.backends if k not in keys})
        if unknown:
            raise ValueError(f"routes name backends not in spec.backends: {', '.join(unknown)}")
        return self


# --------------------------------------------------------------------------- limits (shared)


class StoreUnavailable(StrEnum):
    """What a limit does while the shared store (Redis) cannot be reached."""

    ALLOW = "allow"
    REFUSE = "refuse"


class RateLimits(Spec):
    """Request, token and concurrency limits, counted over every gateway replica that shares
    the limit store (Redis; without one, per replica). Windows are calendar minutes (UTC)."""

    requests_per_minute: int | None = Field(None, ge=1, description="Requests admitted per calendar minute (UTC).")
    tokens_per_minute: int | None = Field(
        None,
        ge=1,
        description="Input plus output tokens per calendar minute (UTC), as providers report them. A request "
        "in flight holds its estimate (prompt estimate plus max_tokens) until its real usage replaces it.",
    )
    max_concurrent: int | None = Field(None, ge=1, description="Requests in flight at once.")
    count_cached_tokens: bool = Field(
        True, description="Whether input tokens served from the provider's prompt cache count towards tokensPerMinute."
    )
    when_store_unavailable: StoreUnavailable = Field(
        StoreUnavailable.ALLOW,
        description="While the limit store cannot be reached: `allow` admits requests uncounted (fail open), "
        "`refuse` answers 503 limits_unavailable (fail closed). Counted in signalbox_limit_store_errors_total.",
    )


# --------------------------------------------------------------------------- Consumer


class ConsumerApiKey(Spec):
    """Gateway API keys. In a cluster the operator generates the key into a Secret; locally
    `signalbox up` reads it from an environment variable or a file. Only its SHA-256 reaches
    the gateway's config."""

    model_config = cel(("!(has(self.env) && has(self.file))", "set at most one of env, file"))

    secret_name: str | None = Field(
        None,
        description="Secret (same namespace) the operator writes the key to, under `api-key` (and the key "
        "being rotated out under `previous-api-key`). Default: `<consumer>-api-key`.",
    )
    env: str | None = Field(None, description="Environment variable holding the key (local runs).")
    file: str | None = Field(None, description="File whose content is the key (local runs).")
    rotation: str = Field(
        "",
        max_length=63,
        description="Change this value to rotate: the operator writes a new key, and the old one keeps "
        "working for gracePeriodSeconds so clients can switch without downtime.",
    )
    grace_period_seconds: int = Field(
        3600, ge=0, description="How long a rotated-out key stays valid (0: revoked at once)."
    )

    @model_validator(mode="after")
    def _one_local_source(self) -> ConsumerApiKey:
        if self.env and self.file:
            raise ValueError("set at most one of env, file")
        return self


class ConsumerJwt(Spec):
    """A JWT from an issuer the gateway trusts, checked by Envoy (jwt_authn); the consumer is
    the one whose claims the token carries."""

    model_config = cel(("has(self.jwks) != has(self.jwksUri)", "set exactly one of jwks, jwksUri"))

    issuer: str = Field(min_length=1, description="The token's `iss`.")
    audiences: list[str] = Field(default_factory=list, description="Accepted `aud` values (empty: any audience).")
    jwks: str | None = Field(None, description="The issuer's public keys, a JWKS JSON document inline.")
    jwks_uri: str | None = Field(
        None, pattern=r"^https?://", description="URL of the issuer's JWKS (fetched and cached by Envoy)."
    )
    claims: dict[str, str] = Field(
        min_length=1,
        description="Claims the token must carry, all of them, e.g. `sub: team-a` or `groups: payments` "
        "(a list claim matches when it contains the value).",
    )

    @model_validator(mode="after")
    def _one_jwks(self) -> ConsumerJwt:
        if (self.jwks is None) == (self.jwks_uri is None):
            raise ValueError("set exactly one of jwks, jwksUri")
        return self


class ConsumerBudget(Spec):
    """USD the consumer may spend per calendar hour, day and month (UTC), over every policy."""

    model_config = cel(("has(self.hourlyUsd) || has(self.dailyUsd) || has(self.monthlyUsd)", "a budget needs a limit"))

    hourly_usd: float | None = Field(None, gt=0, description="USD per calendar hour (UTC).")
    daily_usd: float | None = Field(None, gt=0, description="USD per calendar day (UTC).")
    monthly_usd: float | None = Field(None, gt=0, description="USD per calendar month (UTC).")
    downgrade_at: float = Field(
        0.8, gt=0, le=1, description="Share of a limit after which the consumer's requests go to cheaper backends."
    )
    on_exhausted: OnExhausted = Field(
        OnExhausted.REJECT,
        description="When a limit is reached: `reject` answers 429 (budget_exhausted) until the window resets; "
        "`cheapest` keeps serving on the cheapest eligible backend.",
    )
    when_store_unavailable: StoreUnavailable = Field(
        StoreUnavailable.ALLOW,
        description="While the limit store cannot be reached: `allow` (fail open) or `refuse` (503, fail closed).",
    )

    @model_validator(mode="after")
    def _some_limit(self) -> ConsumerBudget:
        if self.hourly_usd is None and self.daily_usd is None and self.monthly_usd is None:
            raise ValueError("a budget needs a limit")
        return self


class ConsumerLimits(RateLimits):
    budget: ConsumerBudget | None = Field(None, description="Spend limits of this consumer.")


class ConsumerSpec(Spec):
    """Who calls the gateway, how they prove it, what they may use and how much.

    Once any Consumer exists, the gateway answers 401 to callers without a valid key or token
    (unless a policy sets allowAnonymous) and 403 to a consumer on an alias it was not given.
    """

    model_config = cel(("has(self.apiKey) || has(self.jwt)", "a consumer needs apiKey, jwt or both"))

    team: str = Field("", description="Team or application, for people reading status and logs.")
    api_key: ConsumerApiKey | None = Field(
        None, description="Gateway API keys (sent as `Authorization: Bearer` or `x-api-key`)."
    )
    jwt: ConsumerJwt | None = Field(None, description="JWTs from a trusted issuer (`Authorization: Bearer`).")
    models: list[str] = Field(
        default_factory=list,
        description="Aliases (the body's `model`) this consumer may call. Empty, with `policies` empty too: all.",
    )
    policies: list[str] = Field(
        default_factory=list,
        description="RoutingPolicies (`name` in this namespace, or `namespace/name`) whose aliases it may call.",
    )
    limits: ConsumerLimits | None = Field(None, description="This consumer's limits.")
    disabled: bool = Field(False, description="Revoke every key and token of this consumer (401) at once.")

    @model_validator(mode="after")
    def _identity(self) -> ConsumerSpec:
        if self.api_key is None and self.jwt is None:
            raise ValueError("a consumer needs apiKey, jwt or both")
        return self


# --------------------------------------------------------------------------- objects


Name = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    name: Name
    namespace: str = "default"
    generation: int = 0


class AIProvider(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    metadata: ObjectMeta
    spec: AIProviderSpec
    status: dict | None = None

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"


class RoutingPolicy(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    metadata: ObjectMeta
    spec: RoutingPolicySpec

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"


class Consumer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    metadata: ObjectMeta
    spec: ConsumerSpec

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"


KINDS: dict[str, type[AIProvider] | type[RoutingPolicy] | type[Consumer]] = {
    "AIProvider": AIProvider,
    "RoutingPolicy": RoutingPolicy,
    "Consumer": Consumer,
}
