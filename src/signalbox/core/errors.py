"""The one error tree of Signalbox.

Every failure a user can see is one of these classes. Each boundary maps them to its wire
format in exactly one place: the ext_proc turns `RequestError` into an Envoy immediate response
(`signalbox.extproc.wire.immediate_error`), Envoy's own local replies use `openai_error_body`
through the generated `local_reply_config`, and the CLI and operator print `ConfigError.problems`.

Messages never contain secret values: a key is named by where it lives (Secret name/key, env
variable, file path), never by what it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with one resource, located by a JSON path inside it."""

    kind: str
    name: str
    path: str
    message: str
    namespace: str = "default"
    # "Invalid" (the object itself is wrong) or "RefNotFound" (it names something missing);
    # the operator maps them to the Accepted and ResolvedRefs conditions.
    reason: str = "Invalid"

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}: {self.path}: {self.message}"


class SignalboxError(Exception):
    """Root of every error Signalbox raises on purpose."""


class ConfigError(SignalboxError):
    """Resources that cannot be compiled; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the routing resources:\n{lines}")


class ConfigVersionError(SignalboxError):
    """A compiled config whose schema version this data plane does not understand."""


class BundleError(SignalboxError):
    """A published routing config that cannot be read (missing part, wrong digest, unknown
    encoding): it is not applied, and the config in force stays."""


class ModelFileError(SignalboxError):
    """Classifier weights laid out for other features than this code builds (a stale
    `task_types.npz`): refused at load, never scored against the wrong features."""


class TokenizerFileError(SignalboxError):
    """The embedding model's tokenizer file is of another kind than the one SentencePiece is
    built from (another model or normaliser): refused at load, never read into other ids."""


class CredentialUnavailable(SignalboxError):
    """No access token could be minted from a provider's credentials (token endpoint down, key
    revoked). The message says why, from google-auth, never the credentials themselves."""


class RequestError(SignalboxError):
    """A client request Signalbox refuses; rendered as an OpenAI-style JSON error.

    Subclasses fix the HTTP status and the OpenAI `type`/`code`; the message is specific to the
    request (which field, which alias, which limit).
    """

    status: int = 400
    error_type: str = "invalid_request_error"
    code: str = "invalid_request"

    def __init__(self, message: str, param: str | None = None, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.message = message
        self.param = param
        # Extra response headers (e.g. Retry-After), never anything secret.
        self.headers = headers

    def body(self) -> bytes:
        return openai_error_body(self.message, self.error_type, self.code, self.param)

    def body_for(self, api: str) -> bytes:
        """The body in the client's own API shape: `api` is "anthropic" for Anthropic Messages
        clients (`/v1/messages`), anything else for OpenAI's."""
        if api == ANTHROPIC_API:
            return anthropic_error_body(self.message, self.status)
        return self.body()


class MalformedRequest(RequestError):
    status, code = 400, "invalid_json"


class UnsupportedPath(RequestError):
    status, code = 404, "unknown_url"


class UnknownModel(RequestError):
    status, code = 404, "model_not_found"


class InvalidParameter(RequestError):
    """A parameter with a value the API does not take (a page size out of range, a cursor that
    names no model); the error names the parameter."""

    status, code = 400, "invalid_parameter"


class PayloadTooLarge(RequestError):
    status, code = 413, "request_too_large"


class UnsupportedFeature(RequestError):
    """The request uses something the chosen backend's API cannot express (e.g. `n > 1` on an
    Anthropic backend); the error names it. Other backends of the chain are tried first."""

    status, code = 400, "unsupported_feature"


class Forbidden(RequestError):
    """The caller may not use this endpoint (e.g. a privileged admin endpoint without its token)."""

    status, error_type, code = 403, "permission_error", "forbidden"


class Unauthenticated(RequestError):
    """Consumers are declared and the caller presented no valid key or token for a policy that
    does not serve anonymous callers (OpenAI's wording and code for a bad key)."""

    status, error_type, code = 401, "invalid_request_error", "invalid_api_key"


class ModelNotAllowed(Forbidden):
    """A known consumer asked for an alias it was not given."""

    code = "model_not_allowed"


class LimitExceeded(RequestError):
    """A consumer's or policy's requests per minute or concurrency limit (OpenAI's 429 shape)."""

    status, error_type, code = 429, "requests", "rate_limit_exceeded"


class TokenLimitExceeded(LimitExceeded):
    error_type = "tokens"


class LimitsUnavailable(RequestError):
    """The limit store (Redis) cannot be reached and a limit is configured to fail closed."""

    status, error_type, code = 503, "server_error", "limits_unavailable"


class BackendsResting(RequestError):
    """Every backend left for this request rests (rate limited, or its key rejected, or failing
    and taken out): the gateway refuses at once instead of sending to a provider that has said
    "not now". Answered inside Envoy (`envoygen.contract.RESTING_LISTENER`)."""

    status, error_type, code = 429, "requests", "backends_resting"


class UpstreamNotApi(RequestError):
    """A backend answered 2xx with a web page instead of its API (a base URL that is the
    provider's site, a proxy's or login page in front of it), or with a redirect (which the
    client's SDK would follow past the gateway): the next backend is tried, and a client that
    gets it last gets this, not a page its SDK cannot read."""

    status, error_type, code = 502, "server_error", "upstream_not_api"


class AnswerTooLarge(RequestError):
    """A provider's answer larger than the gateway reads whole (for its usage): Envoy stops it
    before its headers reach the client. The limit is the gateway's `max_answer_bytes`."""

    status, error_type, code = 502, "server_error", "answer_too_large"


class NoHealthyBackend(RequestError):
    status, error_type, code = 503, "server_error", "no_healthy_backend"


class StreamBroken(RequestError):
    """A provider's stream broke after tokens were sent: the error event that ends the client's
    stream (extproc.relay, `failover.onBrokenStream`), never a status the client sees."""

    status, error_type, code = 502, "api_error", "stream_broken"


class UpstreamTimeout(RequestError):
    """Every backend tried was silent past its deadline, or the policy's whole budget ran out."""

    status, error_type, code = 504, "server_error", "upstream_timeout"


class ProviderKeyUnavailable(RequestError):
    """A failover attempt reached a backend whose API key the gateway cannot read."""

    status, error_type, code = 503, "server_error", "provider_key_unavailable"


class BudgetExhausted(RequestError):
    """The policy spent its hourly or daily budget and is configured to refuse until it resets."""

    status, error_type, code = 429, "insufficient_quota", "budget_exhausted"


class InternalError(RequestError):
    """A bug or an unexpected failure while deciding: logged once with the request id, which the
    client also gets, so the two can be matched. Never a dropped stream."""

    status, error_type, code = 500, "server_error", "internal_error"

    def __init__(self, request_id: str):
        super().__init__(
            f"the gateway failed while routing this request (request id {request_id or 'unknown'}); it has been logged"
        )
        self.request_id = request_id


class RoutingUnavailable(RequestError):
    """The routing service itself could not decide (used by Envoy's fail-closed local reply)."""

    status, error_type, code = 503, "server_error", "routing_unavailable"


# What a client is told when Envoy and the ext_proc hold different configs for a moment (a
# change reaches them apart): a 503 its SDK retries, never an error about its request.
CONFIG_CHANGING = "the routing config is changing; try again"


def openai_error_body(message: str, error_type: str, code: str, param: str | None = None) -> bytes:
    """The JSON body OpenAI clients parse into `openai.APIStatusError`."""
    return json.dumps(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}},
        separators=(",", ":"),
    ).encode()


# The API families the gateway speaks, by the name the data plane uses for them.
# "responses" is OpenAI's Responses API: clients only (every backend is translated to), with
# OpenAI's error shape.
OPENAI_API, ANTHROPIC_API, RESPONSES_API = "openai", "anthropic", "responses"
# Google's Gemini API: backends only.
GEMINI_API = "gemini"
# AWS Bedrock's Converse API: backends only.
BEDROCK_API = "bedrock"

# Anthropic's error `type` for each status (its API reference, "Errors").
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    if status in _ANTHROPIC_ERROR_TYPES:
        return _ANTHROPIC_ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def anthropic_error_body(message: str, status: int) -> bytes:
    """The JSON body Anthropic clients parse into `anthropic.APIStatusError`."""
    return json.dumps(
        {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}},
        separators=(",", ":"),
    ).encode()
