"""OpenAI's Responses API passed through to providers that serve it (issue 14: a request whose
ingress API is the backend's own pays nothing extra). The official openai SDK against a real
Envoy: an `openai` provider gets the client's /v1/responses request as it is (only the model
rewritten), stateful features included, while an openai-compatible one without the Responses
API is still translated to chat, also within one failover chain."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.factories import backend, dump, model, policy, provider

from .conftest import start_gateway
from .test_lifecycle import wait_for

pytestmark = pytest.mark.dataplane
KEY = "sk-native-secret-0b7d"


@pytest.fixture(scope="module")
def gateway(fakes, tmp_path_factory):
    resources = dump(
        # alpha: OpenAI itself (type openai serves /responses); beta: a chat-only compatible server.
        provider(
            "native",
            fakes["alpha"].url + "/v1",
            [model("n", upstreamName="gpt-native", inputPricePer1M=1, outputPricePer1M=1)],
            type="openai",
            auth={"env": "NATIVE_KEY"},
        ),
        provider("compat", fakes["beta"].url + "/v1", [model("c", upstreamName="chat-only")]),
        policy("native", ["native"], [backend("native", "n")]),
        policy("compat", ["compat"], [backend("compat", "c")]),
        policy("chain", ["chain"], [backend("native", "n"), backend("compat", "c", priority=1)], strategy="failover"),
    )
    gw = start_gateway(tmp_path_factory.mktemp("responses"), resources, env={"NATIVE_KEY": KEY})
    yield gw
    gw.stop()


def test_a_responses_request_reaches_a_provider_that_serves_it_as_it_was_sent(oai, fakes, gateway):
    response = oai.responses.create(model="native", input="hello", instructions="be brief", max_output_tokens=20)
    assert response.output_text == "[alpha] answer from gpt-native" and response.id.startswith("resp_alpha")
    (got,) = fakes["alpha"].requests()
    assert got["path"] == "/v1/responses" and got["headers"]["Authorization"] == f"Bearer {KEY}"
    # Untranslated: the client's own fields, only the model is the backend's.
    assert got["body"] == {"model": "gpt-native", "input": "hello", "instructions": "be brief", "max_output_tokens": 20}

    def counted() -> bool:
        text = httpx.get(f"{gateway.admin_url}/metrics").text
        found = re.search(
            r'gen_ai_client_token_usage_total\{[^}]*gen_ai_token_type="input"[^}]*policy="native"[^}]*\} (\S+)', text
        )
        return bool(found) and float(found.group(1)) == 10

    assert wait_for(counted)  # the Responses usage counted as any other


def test_a_streamed_responses_request_passes_through_event_by_event(oai, fakes):
    text = ""
    with oai.responses.stream(model="native", input="hello") as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
        final = stream.get_final_response()
    assert text == "chunk0 chunk1 chunk2 chunk3 chunk4 " and final.usage.output_tokens == 5
    (got,) = fakes["alpha"].requests()
    assert got["path"] == "/v1/responses" and got["stream"] and "stream_options" not in got["body"]


def test_state_a_provider_keeps_is_passed_on_and_refused_only_where_it_would_be_translated(oai, fakes):
    oai.responses.create(model="native", input="and then?", previous_response_id="resp_123")
    assert fakes["alpha"].requests()[0]["body"]["previous_response_id"] == "resp_123"
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model="compat", input="and then?", previous_response_id="resp_123")
    assert caught.value.code == "unsupported_feature"
    assert fakes["beta"].requests() == []


def test_a_chain_fails_over_from_the_native_api_to_a_translated_one(oai, fakes):
    response = oai.responses.create(
        model="chain", input="hello", extra_headers={"x-fake-status": "503", "x-fake-only": "alpha"}
    )
    assert response.output_text == "[beta] answer from chat-only"  # in the Responses shape the client called
    assert [r["path"] for r in fakes["alpha"].requests()] == ["/v1/responses"]
    assert [r["path"] for r in fakes["beta"].requests()] == ["/v1/chat/completions"]
