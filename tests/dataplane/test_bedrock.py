"""AWS Bedrock behind the gateway (issue 14): the official OpenAI and Anthropic SDKs against a
real Envoy and ext_proc, and a fake Bedrock runtime that verifies each request's SigV4
signature with botocore's own signer and checks its body against botocore's model of the
Converse operation (a wrong signature is the fake's 403, a body Bedrock would refuse its 400;
either fails these tests)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.factories import backend, dump, model, policy, provider

from .conftest import CLIENT_TOKEN, logs, start_gateway

pytestmark = pytest.mark.dataplane

ACCESS_KEY = "AKIAFAKEBEDROCK0001"
SECRET_KEY = "bedrock-secret-key-2f8e1c"
# The gateway's own AWS credentials (its environment): what a provider without `auth` signs with.
ENV_ACCESS_KEY = "AKIAGATEWAYENV0002"
ENV_SECRET_KEY = "gateway-env-secret-9d3a"
# A real Bedrock model ID: its `:` is percent-encoded in the path (and twice in the signature).
MODEL_ID = "anthropic.claude-3-haiku-20240307-v1:0"
CAPS = {"capabilities": ["streaming", "tools"], "contextWindow": 100000}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def resources(fakes, credentials: Path) -> str:
    return dump(
        provider(
            "bedrock",
            fakes["gamma"].url,
            [model("haiku", upstreamName=MODEL_ID, inputPricePer1M=0.25, outputPricePer1M=1.25, **CAPS)],
            type="bedrock",
            aws={"region": "us-west-2"},
            auth={"file": str(credentials), "format": "aws-credentials"},
        ),
        provider(
            "bedrock-chain",
            fakes["delta"].url,
            [model("nova", upstreamName="us.amazon.nova-lite-v1:0", **CAPS)],
            type="bedrock",
            aws={"region": "eu-west-1"},
        ),
        provider("gpt", fakes["beta"].url + "/v1", [model("o1", upstreamName="gpt-fake", **CAPS)]),
        policy("haiku", ["haiku"], [backend("bedrock", "haiku")]),
        policy("nova", ["nova"], [backend("bedrock-chain", "nova")]),
        # Only the accounting test sends here: its spend is what that test counts.
        policy("haiku-billed", ["haiku-billed"], [backend("bedrock", "haiku")]),
        policy(
            "haiku-then-gpt",
            ["haiku-then-gpt"],
            [backend("bedrock", "haiku"), backend("gpt", "o1", priority=1)],
            strategy="failover",
        ),
        policy(
            "gpt-then-haiku",
            ["gpt-then-haiku"],
            [backend("gpt", "o1"), backend("bedrock", "haiku", priority=1)],
            strategy="failover",
        ),
    )


@pytest.fixture(scope="module")
def gateway(fakes, tmp_path_factory):
    home = tmp_path_factory.mktemp("bedrock")
    credentials = home / "aws-credentials"
    credentials.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    env = {"AWS_ACCESS_KEY_ID": ENV_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": ENV_SECRET_KEY}
    gw = start_gateway(home, resources(fakes, credentials), env=env)
    yield gw
    gw.stop()


@pytest.fixture(autouse=True)
def _signed(fakes):
    """gamma is Bedrock and wants a signature made with the test's keys."""
    fakes["gamma"].behave(aws_keys={ACCESS_KEY: SECRET_KEY})
    fakes["delta"].behave(aws_keys={ENV_ACCESS_KEY: ENV_SECRET_KEY})
    fakes["beta"].behave(strict=True)


def only(fake) -> dict:
    got = fake.requests()
    assert len(got) == 1, got
    return got[0]


def signed_by_envoy(request: dict) -> None:
    headers = {k.lower(): v for k, v in request["headers"].items()}
    assert headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/")
    assert "/us-west-2/bedrock/aws4_request" in headers["authorization"]
    assert CLIENT_TOKEN not in json.dumps(request["headers"])
    assert not any(k.startswith("x-signalbox-") for k in headers), headers


def test_openai_sdk_gets_a_signed_converse_answer_with_tools(oai, fakes):
    answer = oai.chat.completions.create(
        model="haiku",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "weather?"}],
        max_tokens=40,
        temperature=0.2,
        tools=[TOOL],
        extra_headers={"x-fake-tool-call": "get_weather"},
    )
    assert answer.model == MODEL_ID
    assert answer.choices[0].message.content == f"[gamma] answer from {MODEL_ID}"
    call = answer.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert answer.choices[0].finish_reason == "tool_calls"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (10, 7)
    got = only(fakes["gamma"])
    assert got["path"] == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
    signed_by_envoy(got)
    assert got["body"]["system"] == [{"text": "be brief"}]
    assert got["body"]["messages"] == [{"role": "user", "content": [{"text": "weather?"}]}]
    assert got["body"]["inferenceConfig"] == {"maxTokens": 40, "temperature": 0.2}
    assert got["body"]["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"]["json"] == TOOL["function"]["parameters"]


def test_a_client_cannot_put_its_own_signing_headers_into_a_signed_request(oai, fakes):
    """A session token or date sent by a client would be signed with the gateway's credentials:
    Envoy's signer replaces the date and drops a token it has none of (held here, not assumed)."""
    oai.chat.completions.create(
        model="haiku",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-amz-security-token": "client-token-forged", "x-amz-date": "20200101T000000Z"},
    )
    headers = {k.lower(): v for k, v in only(fakes["gamma"])["headers"].items()}
    assert "x-amz-security-token" not in headers
    assert headers["x-amz-date"] != "20200101T000000Z"
    signed_by_envoy(only(fakes["gamma"]))


def test_a_tool_result_goes_back_to_bedrock_as_a_tool_result_block(oai, fakes):
    oai.chat.completions.create(
        model="haiku",
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "tooluse_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "tooluse_1", "content": "sunny"},
        ],
        tools=[TOOL],
    )
    turns = only(fakes["gamma"])["body"]["messages"]
    assert turns[1] == {
        "role": "assistant",
        "content": [{"toolUse": {"toolUseId": "tooluse_1", "name": "get_weather", "input": {}}}],
    }
    assert turns[2] == {
        "role": "user",
        "content": [{"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "sunny"}]}}],
    }


@pytest.mark.parametrize("client", ["openai", "anthropic"])
def test_a_bedrock_event_stream_reaches_either_sdk_as_it_arrives(oai, ant, fakes, client):
    headers = {"x-fake-chunks": "4", "x-fake-chunk-delay-ms": "150"}
    arrivals, text = [], ""
    if client == "openai":
        for _ in oai.chat.completions.create(model="haiku", messages=[{"role": "user", "content": "x"}], stream=True):
            pass  # the SDK's first stream builds its models: not what is timed
        stream = oai.chat.completions.create(
            model="haiku",
            messages=[{"role": "user", "content": "count"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
        usage = None
        for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                if choice.delta.content:
                    arrivals.append(time.monotonic())
                    text += choice.delta.content
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (10, 4)
    else:
        with ant.messages.stream(model="haiku", max_tokens=8, messages=[{"role": "user", "content": "x"}]) as warm:
            warm.get_final_message()
        with ant.messages.stream(
            model="haiku", max_tokens=64, messages=[{"role": "user", "content": "count"}], extra_headers=headers
        ) as stream:
            for piece in stream.text_stream:
                arrivals.append(time.monotonic())
                text += piece
            assert stream.get_final_message().usage.output_tokens == 4
    assert text == "chunk0 chunk1 chunk2 chunk3 "
    assert arrivals[-1] - arrivals[0] >= 0.3, arrivals
    last = fakes["gamma"].requests()[-1]
    assert last["path"] == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse-stream"
    signed_by_envoy(last)


def test_a_streamed_tool_call_arrives_in_pieces(oai, fakes):
    stream = oai.chat.completions.create(
        model="haiku",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[TOOL],
        stream=True,
        extra_headers={"x-fake-tool-call": "get_weather", "x-fake-chunks": "1"},
    )
    arguments, names, finish = "", [], None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                names += [call.function.name] if call.function.name else []
                arguments += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert names == ["get_weather"] and json.loads(arguments) == {"city": "Paris"} and finish == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_openai_sdk_responses_from_bedrock(oai, fakes, stream):
    """The Responses API, translated through chat to Converse (and back, events included)."""
    if stream:
        with oai.responses.stream(model="haiku", input="count", extra_headers={"x-fake-chunks": "3"}) as events:
            text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            final = events.get_final_response()
        assert text == "chunk0 chunk1 chunk2 " and final.usage.output_tokens == 3
    else:
        response = oai.responses.create(model="haiku", input="hello", instructions="be brief", max_output_tokens=20)
        assert response.output_text == f"[gamma] answer from {MODEL_ID}"
        sent = only(fakes["gamma"])["body"]
        assert sent["system"] == [{"text": "be brief"}] and sent["inferenceConfig"] == {"maxTokens": 20}
    signed_by_envoy(fakes["gamma"].requests()[-1])


def test_anthropic_sdk_gets_a_message_from_bedrock(ant, fakes):
    message = ant.messages.create(model="haiku", max_tokens=32, messages=[{"role": "user", "content": "hello"}])
    assert message.content[0].text == f"[gamma] answer from {MODEL_ID}"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (10, 7)
    assert only(fakes["gamma"])["body"]["inferenceConfig"] == {"maxTokens": 32}


@pytest.mark.parametrize("stream", [False, True])
def test_a_bedrock_primary_that_fails_is_retried_on_an_openai_backend(oai, fakes, stream):
    raw = oai.chat.completions.with_raw_response.create(
        model="haiku-then-gpt",
        messages=[{"role": "user", "content": "hi"}],
        stream=stream,
        extra_headers={"x-fake-status": "503", "x-fake-only": "gamma"},
    )
    assert raw.headers["x-signalbox-provider"] == "gpt"
    if stream:
        assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert len(fakes["gamma"].requests()) == 1 and len(fakes["beta"].requests()) == 1


def test_an_openai_primary_that_fails_is_retried_on_bedrock(ant, fakes):
    raw = ant.messages.with_raw_response.create(
        model="gpt-then-haiku",
        max_tokens=16,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-status": "503", "x-fake-only": "beta"},
    )
    assert raw.headers["x-signalbox-provider"] == "bedrock"
    assert raw.parse().content[0].text == f"[gamma] answer from {MODEL_ID}"
    signed_by_envoy(only(fakes["gamma"]))


def test_a_bedrock_refusal_reaches_the_client_in_its_own_shape(oai, ant, fakes):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(
            model="haiku",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-fault": json.dumps({"kind": "content_filter"})},
        )
    assert "content management policy" in caught.value.body["message"]
    with pytest.raises(anthropic.BadRequestError) as refused:
        ant.messages.create(
            model="haiku",
            max_tokens=8,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-fault": json.dumps({"kind": "content_filter"})},
        )
    assert refused.value.body["type"] == "error"
    assert "content management policy" in refused.value.body["error"]["message"]


def test_a_provider_without_auth_is_signed_with_the_gateways_aws_credential_chain(oai, fakes):
    answer = oai.chat.completions.create(model="nova", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "[delta] answer from us.amazon.nova-lite-v1:0"
    got = only(fakes["delta"])
    assert got["path"] == "/model/us.amazon.nova-lite-v1%3A0/converse"
    assert f"Credential={ENV_ACCESS_KEY}/" in got["headers"]["Authorization"]
    assert "/eu-west-1/bedrock/aws4_request" in got["headers"]["Authorization"]
    assert fakes["gamma"].requests() == []


def test_aws_secret_key_is_in_no_config_log_or_answer(oai, gateway):
    oai.chat.completions.create(model="haiku", messages=[{"role": "user", "content": "hi"}])
    work = Path(gateway.workdir)
    for path in work.rglob("*"):
        if path.is_file() and "credentials" not in path.parts and path.suffix in (".json", ".pb", ".log", ".yaml"):
            assert SECRET_KEY.encode() not in path.read_bytes(), path
    assert SECRET_KEY not in logs(gateway)


def _metric(gateway, name: str, **labels: str) -> float:
    for line in httpx.get(f"{gateway.admin_url}/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_bedrocks_usage_is_billed_at_the_models_prices(oai, gateway):
    """What budgets and metrics read: the provider's token counts (its JSON answer's and its
    stream's metadata event), priced at the model's prices, under the GenAI name aws.bedrock."""
    oai.chat.completions.create(model="haiku-billed", messages=[{"role": "user", "content": "hi"}])
    for _ in oai.chat.completions.create(
        model="haiku-billed",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-fake-chunks": "4"},
    ):
        pass
    expected = (10 * 0.25 + 7 * 1.25 + 10 * 0.25 + 4 * 1.25) / 1e6
    deadline = time.monotonic() + 10
    while _metric(gateway, "signalbox_cost_usd_total", policy="haiku-billed") < expected - 1e-12:
        assert time.monotonic() < deadline, _metric(gateway, "signalbox_cost_usd_total", policy="haiku-billed")
        time.sleep(0.05)
    assert abs(_metric(gateway, "signalbox_cost_usd_total", policy="haiku-billed") - expected) < 1e-12
    tokens = {"policy": "haiku-billed", "gen_ai_provider_name": "aws.bedrock"}
    assert _metric(gateway, "gen_ai_client_token_usage_total", gen_ai_token_type="output", **tokens) == 11
