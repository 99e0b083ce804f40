"""The active probe, against a fake provider that checks its key: a rejected key is named as such
in AIProvider status (what a revoked key looks like to an operator)."""

from __future__ import annotations

import httpx

from signalbox.core.models import AIProviderSpec
from signalbox.core.secrets import SecretValue
from signalbox.fakeprovider import serving
from signalbox.operator.health import probe
from tests.unit.test_googleauth import service_account


async def test_a_rejected_key_is_named_in_the_probe_message():
    async with serving("keyed") as fake, httpx.AsyncClient() as client:
        fake.behaviour.api_key = "sk-right"
        spec = AIProviderSpec.model_validate(
            {"type": "openai-compatible", "baseUrl": fake.url + "/v1", "models": [{"name": "m"}], "auth": {"env": "K"}}
        )
        good = await probe(spec, SecretValue("sk-right"), client)
        revoked = await probe(spec, SecretValue("sk-revoked"), client)
    assert good.ok and good.message == "HTTP 200"
    assert not revoked.ok
    assert revoked.message == "HTTP 401 from /models: the provider rejected the API key (revoked, expired or wrong)"
    assert "sk-revoked" not in revoked.message


async def test_an_anthropic_provider_is_probed_with_its_own_key_header_and_version():
    async with serving("claude") as fake, httpx.AsyncClient() as client:
        fake.behaviour.api_key = "sk-ant-right"
        spec = AIProviderSpec.model_validate(
            {"type": "anthropic", "baseUrl": fake.url + "/v1", "models": [{"name": "m"}], "auth": {"env": "K"}}
        )
        good = await probe(spec, SecretValue("sk-ant-right"), client)
        wrong = await probe(spec, SecretValue("sk-ant-wrong"), client)
    # The fake reads a key from x-api-key only when anthropic-version comes with it.
    assert good.ok and good.message == "HTTP 200"
    assert not wrong.ok and "rejected the API key" in wrong.message


async def test_a_gemini_provider_is_probed_with_its_own_key_header():
    async with serving("gem") as fake, httpx.AsyncClient() as client:
        fake.behaviour.api_key = "AIza-right"
        spec = AIProviderSpec.model_validate(
            {"type": "gemini", "baseUrl": fake.url + "/v1beta", "models": [{"name": "m"}], "auth": {"env": "K"}}
        )
        good = await probe(spec, SecretValue("AIza-right"), client)
        wrong = await probe(spec, SecretValue("AIza-wrong"), client)
    # The fake reads a Gemini key from x-goog-api-key only.
    assert good.ok and good.message == "HTTP 200"
    assert not wrong.ok and "rejected the API key" in wrong.message


async def test_a_vertex_provider_is_probed_at_its_url_with_a_minted_token():
    async with serving("vertex") as fake, httpx.AsyncClient() as client:
        raw, _ = service_account(fake.url + "/token")
        spec = AIProviderSpec.model_validate(
            {
                "type": "gemini",
                "baseUrl": fake.url + "/v1/projects/p/locations/us-central1/publishers/google",
                "models": [{"name": "m"}],
                "auth": {"secretRef": {"name": "sa", "key": "credentials.json"}, "format": "google-credentials"},
                "healthCheck": {"url": fake.url + "/v1/publishers/google/models/gemini-2.5-flash"},
            }
        )
        good = await probe(spec, SecretValue(raw), client)
        fake.tokens.clear()  # every token it issued is now unknown to it: revoked
        revoked = await probe(spec, SecretValue(raw), client)
        unusable = await probe(spec, SecretValue('{"type": "authorized_user"}'), client)
    assert good.ok and good.message == "HTTP 200", good
    assert [r["path"] for r in fake.requests if r["api"] == "oauth2"] == ["/token"]  # minted once, reused
    assert not revoked.ok and "rejected the API key" in revoked.message
    assert not unusable.ok and "Google credentials" in unusable.message


async def test_a_bedrock_provider_is_probed_with_a_sigv4_signature():
    async with serving("bedrock") as fake, httpx.AsyncClient() as client:
        fake.behaviour.aws_keys = {"AKIAPROBE": "probe-secret"}
        spec = AIProviderSpec.model_validate(
            {
                "type": "bedrock",
                "baseUrl": fake.url,
                "aws": {"region": "us-east-1"},
                "models": [{"name": "m"}],
                "auth": {"env": "K", "format": "aws-credentials"},
                "healthCheck": {"url": fake.url + "/foundation-models"},
            }
        )
        good = "[default]\naws_access_key_id = AKIAPROBE\naws_secret_access_key = probe-secret\n"
        ok = await probe(spec, SecretValue(good), client)
        wrong = await probe(spec, SecretValue(good.replace("probe-secret", "old-secret")), client)
        unusable = await probe(spec, SecretValue("not an ini file"), client)
    assert ok.ok, ok.message
    assert not wrong.ok and "HTTP 403" in wrong.message
    assert not unusable.ok and "aws_access_key_id" in unusable.message
    assert "probe-secret" not in wrong.message + unusable.message


def test_a_bedrock_probe_defaults_to_listing_the_regions_models():
    from signalbox.operator.health import probe_url

    spec = AIProviderSpec.model_validate(
        {"type": "bedrock", "baseUrl": "https://bedrock-runtime.eu-west-3.amazonaws.com", "models": [{"name": "m"}]}
    )
    assert probe_url(spec) == "https://bedrock.eu-west-3.amazonaws.com/foundation-models"
