"""Vertex AI (issue 14): Gemini's API on Vertex's paths, authorised by OAuth2 access tokens the
gateway mints from a service account key (`auth.format: google-credentials`, google-auth).

The fake provider is both Google's token endpoint (the service account's `token_uri`) and
Vertex: it accepts only tokens it issued and that have not expired, and records each JWT
assertion, which the test verifies with the service account's public key, as Google does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import anthropic
import httpx
import jwt
import openai
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from signalbox import gatewayfiles
from tests.factories import backend, dump, model, policy, provider

from .conftest import logs, running, start_gateway

pytestmark = pytest.mark.dataplane

CAPS = {"capabilities": ["streaming", "tools"], "contextWindow": 100000}
VERTEX_PATH = "/v1/projects/demo-project/locations/us-central1/publishers/google"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"


class ServiceAccount:
    """A Google service account key file (the JSON `gcloud iam service-accounts keys create`
    writes) whose token endpoint is the fake's."""

    def __init__(self, directory: Path, token_uri: str, name: str):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        self.email = f"{name}@demo-project.iam.gserviceaccount.com"
        self.token_uri = token_uri
        self.path = directory / f"{name}.json"
        self.path.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": "demo-project",
                    "private_key_id": f"kid-{name}",
                    "private_key": self.pem,
                    "client_email": self.email,
                    "client_id": "1234567890",
                    "token_uri": token_uri,
                }
            )
        )

    def verify(self, assertion: str) -> dict:
        """The assertion's claims if this account signed it for Google's token endpoint, the
        audience Google requires whichever `token_uri` it is posted to (raises if not)."""
        return jwt.decode(assertion, self.key.public_key(), algorithms=["RS256"], audience=GOOGLE_TOKEN_AUDIENCE)

    def secret_lines(self) -> list[str]:
        """Lines of the private key long enough to be unmistakable in a file."""
        return [line for line in self.pem.splitlines() if len(line) > 40]


def resources(url: str, account: ServiceAccount) -> str:
    return dump(
        provider(
            "vertex",
            url + VERTEX_PATH,
            [model("flash", upstreamName="gemini-2.5-flash", **CAPS)],
            type="gemini",
            auth={"file": str(account.path), "format": "google-credentials"},
        ),
        policy("vertex", ["vertex"], [backend("vertex", "flash")]),
    )


@pytest.fixture(scope="module")
def vertex():
    yield from running(("vertex",))


@pytest.fixture(scope="module")
def account(vertex, tmp_path_factory):
    return ServiceAccount(tmp_path_factory.mktemp("sa"), vertex["vertex"].url + "/token", "gateway")


@pytest.fixture(scope="module")
def gateway(vertex, account, tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("gw"), resources(vertex["vertex"].url, account))
    yield gw
    gw.stop()


def token_requests(fake) -> list[dict]:
    return [r for r in fake.requests() if r["api"] == "oauth2"]


def vertex_requests(fake) -> list[dict]:
    return [r for r in fake.requests() if r["api"] == "gemini"]


def test_openai_sdk_reaches_vertex_with_a_token_minted_from_the_service_account(gateway, vertex, account):
    fake = vertex["vertex"]
    with openai.OpenAI(base_url=gateway.url, api_key="client", max_retries=0, timeout=20) as client:
        answer = client.chat.completions.create(model="vertex", messages=[{"role": "user", "content": "hello"}])
    assert answer.choices[0].message.content == "[vertex] answer from gemini-2.5-flash"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (10, 7)

    minted = token_requests(fake)
    assert minted, "the gateway never asked the token endpoint"
    claims = account.verify(minted[0]["body"]["assertion"])
    assert claims["iss"] == account.email and claims["scope"] == CLOUD_PLATFORM
    assert minted[0]["body"]["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"

    got = vertex_requests(fake)[-1]
    assert got["path"] == f"{VERTEX_PATH}/models/gemini-2.5-flash:generateContent"
    assert got["headers"]["Authorization"].startswith("Bearer ya29.vertex.")
    assert "x-goog-api-key" not in {k.lower() for k in got["headers"]}
    assert got["body"]["contents"] == [{"role": "user", "parts": [{"text": "hello"}]}]


def test_anthropic_sdk_streams_from_vertex(gateway, vertex):
    client = anthropic.Anthropic(base_url=gateway.url.removesuffix("/v1"), api_key="client", max_retries=0)
    with (
        client,
        client.messages.stream(
            model="vertex",
            max_tokens=64,
            messages=[{"role": "user", "content": "count"}],
            extra_headers={"x-fake-chunks": "3"},
        ) as stream,
    ):
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "chunk0 chunk1 chunk2 " and final.usage.output_tokens == 3
    got = vertex_requests(vertex["vertex"])[-1]
    assert got["path"] == f"{VERTEX_PATH}/models/gemini-2.5-flash:streamGenerateContent?alt=sse"


def test_the_service_account_key_and_tokens_stay_out_of_config_logs_and_metrics(gateway, vertex, account):
    with openai.OpenAI(base_url=gateway.url, api_key="client", max_retries=0, timeout=20) as client:
        client.chat.completions.create(model="vertex", messages=[{"role": "user", "content": "hi"}])
    tokens = {r["headers"]["Authorization"].removeprefix("Bearer ") for r in vertex_requests(vertex["vertex"])}
    assert tokens
    workdir = Path(gateway.workdir)
    exposed = [
        *(workdir / "envoy").rglob("*.json"),
        workdir / gatewayfiles.CONFIG_FILE,
    ]
    texts = [p.read_bytes().decode(errors="replace") for p in exposed] + [
        logs(gateway),
        httpx.get(f"{gateway.admin_url}/metrics").text,
        httpx.get(f"{gateway.admin_url}/v1/route", params={"model": "vertex"}).text,
    ]
    for text in texts:
        for secret in [*account.secret_lines(), *tokens]:
            assert secret not in text


def test_tokens_are_renewed_before_they_expire(vertex, tmp_path_factory):
    """Tokens that live 4 s: the gateway keeps minting fresh ones into the provider's key file,
    so requests over more than two lifetimes all succeed, each with a token still alive. (Real
    tokens live an hour and are renewed minutes ahead; here the lifetime must still exceed
    the refresh interval plus the second attempt.lua may keep a key file's value, with room
    for a loaded machine.)"""
    fake = vertex["vertex"]
    fake.behave(token_lifetime_s=4)
    seen = len(fake.requests())
    # A key of its own: the module gateway's account already holds an hour-long token.
    account = ServiceAccount(tmp_path_factory.mktemp("sa2"), fake.url + "/token", "short-lived")
    gw = start_gateway(tmp_path_factory.mktemp("gw2"), resources(fake.url, account), token_refresh_seconds=0.25)
    try:
        with openai.OpenAI(base_url=gw.url, api_key="client", max_retries=0, timeout=20) as client:
            started = time.monotonic()
            while time.monotonic() - started < 9:
                client.chat.completions.create(model="vertex", messages=[{"role": "user", "content": "hi"}])
                time.sleep(0.2)
    finally:
        gw.stop()
        fake.behave(token_lifetime_s=3600)
    run = fake.requests()[seen:]
    calls = [r for r in run if r["api"] == "gemini"]
    used = {r["headers"]["Authorization"] for r in calls}
    assert len(calls) >= 20 and len(used) >= 3, used  # renewed over the run, and every call passed
    minted = [r for r in run if r["api"] == "oauth2"]
    assert len(minted) >= 3 and all(account.verify(r["body"]["assertion"]) for r in minted)
