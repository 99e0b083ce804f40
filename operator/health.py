"""Active health probes: one HTTP probe, and the threshold state machine that debounces it.

A provider becomes unhealthy after `failureThreshold` failed probes in a row and healthy again
after `recoveryThreshold` successes in a row; single blips change nothing. A provider never
probed counts as healthy (routing must work before the first probe).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from signalbox.core.awscreds import parse as parse_aws
from signalbox.core.envoygen.contract import ANTHROPIC_VERSION
from signalbox.core.errors import CredentialUnavailable
from signalbox.core.models import BEDROCK_HOST, AIProviderSpec, AuthFormat, ProviderType
from signalbox.core.secrets import SecretValue

from .conditions import now


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency_ms: float
    message: str


async def probe(spec: AIProviderSpec, key: SecretValue | None, client: httpx.AsyncClient) -> ProbeResult:
    """GET baseUrl + healthCheck.path (or healthCheck.url) with the provider's key; any 2xx is a
    success."""
    url = probe_url(spec)
    headers: dict[str, str] = {}
    if spec.type == ProviderType.BEDROCK:
        signed = await asyncio.to_thread(_aws_signed, spec, key, url)
        if isinstance(signed, str):
            return ProbeResult(False, 0.0, signed)
        headers = signed
    elif spec.auth and key is not None:
        header, prefix = spec.key_header()
        if spec.auth.format == AuthFormat.GOOGLE_CREDENTIALS:
            from signalbox.core.googleauth import google_token  # 13.5 MB, only when used

            token = google_token(key)
            if token is None:
                return ProbeResult(False, 0.0, "the Secret does not hold Google credentials google-auth can use")
            try:
                headers[header] = prefix + await asyncio.to_thread(token.reveal)
            except CredentialUnavailable as exc:
                return ProbeResult(False, 0.0, str(exc)[:300])
        else:
            headers[header] = prefix + key.reveal()
    if spec.type == ProviderType.ANTHROPIC:
        headers["anthropic-version"] = ANTHROPIC_VERSION
    params = {"api-version": spec.azure.api_version} if spec.azure else None
    started = time.monotonic()
    try:
        response = await client.get(url, headers=headers, params=params, timeout=spec.health_check.timeout_seconds)
    except httpx.HTTPError as exc:
        # The exception text names the URL, never the headers.
        return ProbeResult(False, 0.0, f"{type(exc).__name__}: {exc}"[:300])
    latency = (time.monotonic() - started) * 1000
    if 200 <= response.status_code < 300:
        return ProbeResult(True, round(latency, 1), f"HTTP {response.status_code}")
    message = f"HTTP {response.status_code} from {spec.health_check.url or spec.health_check.path}"
    if response.status_code in (401, 403):
        # What gateways see too: their attempts fail over and rest this provider's backends.
        message += ": the provider rejected the API key (revoked, expired or wrong)"
    return ProbeResult(False, round(latency, 1), message)


def probe_url(spec: AIProviderSpec) -> str:
    """healthCheck.url, else baseUrl + healthCheck.path; a Bedrock runtime endpoint serves no
    GET, so by default its probe lists the region's foundation models (bedrock:ListFoundationModels)."""
    if spec.health_check.url:
        return spec.health_check.url
    if spec.type == ProviderType.BEDROCK and "path" not in spec.health_check.model_fields_set:
        found = BEDROCK_HOST.match(urlsplit(spec.base_url).hostname or "")
        if found:
            return f"https://bedrock.{found.group(1)}.amazonaws.com/foundation-models"
    return spec.base_url + spec.health_check.path


def _aws_signed(spec: AIProviderSpec, key: SecretValue | None, url: str) -> dict[str, str] | str:
    """SigV4 headers for a GET of `url` with botocore's signer (blocking: run in a thread), or why
    not. Credentials: the provider's AWS credentials file, else botocore's default chain (the
    operator pod's IRSA role, environment, instance role)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    from botocore.session import get_session

    if spec.auth is not None:
        keys = parse_aws(key.reveal()) if key is not None else None
        if keys is None:
            return "the credentials source holds no [default] profile with aws_access_key_id and aws_secret_access_key"
        token = keys.session_token.reveal() if keys.session_token else None
        credentials = Credentials(keys.access_key, keys.secret_key.reveal(), token)
    else:
        credentials = get_session().get_credentials()
        if credentials is None:
            return "no AWS credentials: the operator's AWS credential chain found none (IRSA, environment, role)"
    request = AWSRequest(method="GET", url=url)
    SigV4Auth(credentials, "bedrock", spec.aws_region()).add_auth(request)
    return {k: v for k, v in request.headers.items()}


@dataclass
class HealthTracker:
    failure_threshold: int
    recovery_threshold: int
    healthy: bool = True
    failures: int = 0
    successes: int = 0
    last_transition: str = field(default_factory=now)

    @classmethod
    def resume(cls, spec: AIProviderSpec, health: dict[str, Any] | None) -> HealthTracker:
        """Continue from what status says, so an operator restart does not reset health."""
        health = health or {}
        return cls(
            failure_threshold=spec.health_check.failure_threshold,
            recovery_threshold=spec.health_check.recovery_threshold,
            healthy=bool(health.get("healthy", True)),
            failures=int(health.get("consecutiveFailures", 0)),
            successes=int(health.get("consecutiveSuccesses", 0)),
            last_transition=str(health.get("lastTransitionTime") or now()),
        )

    def observe(self, result: ProbeResult) -> bool:
        """Record one probe; True when `healthy` flipped."""
        if result.ok:
            self.successes, self.failures = self.successes + 1, 0
            flip = not self.healthy and self.successes >= self.recovery_threshold
        else:
            self.failures, self.successes = self.failures + 1, 0
            flip = self.healthy and self.failures >= self.failure_threshold
        if flip:
            self.healthy = not self.healthy
            self.last_transition = now()
        return flip

    def status(self, result: ProbeResult) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "latencyMs": result.latency_ms,
            "lastProbeTime": now(),
            "lastTransitionTime": self.last_transition,
            "consecutiveFailures": self.failures,
            "consecutiveSuccesses": self.successes,
            "message": result.message,
        }
