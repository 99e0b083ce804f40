"""Real Envoy + the Signalbox ext_proc + fake providers, driven with the official OpenAI SDK."""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections import Counter

import anthropic
import httpx
import openai
import pytest

from tests.factories import backend, dump, model, policy, provider

from .conftest import log_entries, logged, logs, start_gateway

pytestmark = pytest.mark.dataplane

# Bound but never listening: every connection to it is refused, and no other process can take
# its port while the tests run (a port merely found free could be).
REFUSING = socket.socket()
REFUSING.bind(("127.0.0.1", 0))
BETA_KEY = "sk-beta-secret-7f3a9c"
KEYED_KEY = "sk-keyed-secret-41d2e8"
CLIENT_TOKEN = "client-gateway-token"
TWIN = {"inputPricePer1M": 1, "outputPricePer1M": 2, "contextWindow": 16000, "capabilities": ["streaming", "json"]}


def resources(fakes) -> str:
    dead_url = f"http://127.0.0.1:{REFUSING.getsockname()[1]}/v1"  # connection refused
    return dump(
        provider(
            "alpha",
            fakes["alpha"].url + "/v1",
            [
                model(
                    "a1",
                    upstreamName="alpha-small",
                    quality=0.5,
                    inputPricePer1M=0.1,
                    outputPricePer1M=0.4,
                    contextWindow=8000,
                    capabilities=["streaming", "json"],
                ),
                model("a2", upstreamName="alpha-twin", **TWIN),
                model("e1", upstreamName="alpha-embed", inputPricePer1M=0.02, capabilities=["embeddings"]),
            ],
        ),
        provider(
            "beta",
            fakes["beta"].url + "/v1",
            [
                model(
                    "b1",
                    upstreamName="beta-large",
                    quality=0.9,
                    inputPricePer1M=3,
                    outputPricePer1M=15,
                    contextWindow=128000,
                    capabilities=["streaming", "tools", "vision", "json"],
                )
            ],
            auth={"env": "BETA_KEY"},
        ),
        provider(
            "gamma",
            fakes["gamma"].url + "/v1",
            [
                model(
                    "g1",
                    upstreamName="gamma-mid",
                    quality=0.75,
                    inputPricePer1M=1,
                    outputPricePer1M=2,
                    contextWindow=32000,
                    capabilities=["streaming", "tools", "json"],
                ),
                model("g2", upstreamName="gamma-twin", **TWIN),
                model("e2", upstreamName="gamma-embed", inputPricePer1M=0.13, capabilities=["embeddings"]),
            ],
        ),
        # Another provider behind flaky1's fake, under a deeper base path than everyone else's.
        provider("nested", fakes["flaky1"].url + "/openai/v1", [model("n1", upstreamName="nested-model", **TWIN)]),
        provider("flaky1", fakes["flaky1"].url + "/v1", [model("f1", upstreamName="flaky-one")]),
        provider("flaky2", fakes["flaky2"].url + "/v1", [model("f2", upstreamName="flaky-two")]),
        # A keyed provider on flaky1's fake: a failing first choice whose key must stay its own.
        provider(
            "keyed", fakes["flaky1"].url + "/v1", [model("k1", upstreamName="keyed-model")], auth={"env": "KEYED_KEY"}
        ),
        provider("dead", dead_url, [model("d1")]),
        provider("sick", fakes["delta"].url + "/v1", [model("s1")], healthy=False),
        policy("split", ["split"], [backend("alpha", "a1", weight=3), backend("gamma", "g1", weight=1)]),
        policy("embed", ["embed"], [backend("alpha", "e1"), backend("gamma", "e2")], strategy="cost"),
        # Equally capable backends: Envoy routes these alone (the compiled path).
        policy("split-compiled", ["split-compiled"], [backend("alpha", "a2", weight=3), backend("gamma", "g2")]),
        policy(
            "compiled-failover",
            ["compiled-failover"],
            [backend("nested", "n1"), backend("gamma", "g2", priority=1)],
            strategy="failover",
        ),
        # The same chain, decided by the ext_proc (cost reads the prompt).
        policy(
            "decided-failover", ["decided-failover"], [backend("nested", "n1"), backend("gamma", "g2")], strategy="cost"
        ),
        policy(
            "failover", ["failover"], [backend("flaky1", "f1"), backend("beta", "b1", priority=1)], strategy="failover"
        ),
        policy(
            "failover-429",
            ["failover-429"],
            [backend("flaky2", "f2"), backend("beta", "b1", priority=1)],
            strategy="failover",
        ),
        policy(
            "keyed-first",
            ["keyed-first"],
            [backend("keyed", "k1"), backend("gamma", "g1", priority=1)],
            strategy="failover",
        ),
        policy("refused", ["refused"], [backend("dead", "d1"), backend("beta", "b1", priority=1)], strategy="failover"),
        policy(
            "cheap", ["cheap"], [backend("alpha", "a1"), backend("gamma", "g1"), backend("beta", "b1")], strategy="cost"
        ),
        policy(
            "bytask",
            ["bytask"],
            [backend("alpha", "a1"), backend("beta", "b1")],
            strategy="classified",
            routes=[{"taskTypes": ["code"], "backends": ["beta/b1"]}, {"backends": ["alpha/a1"]}],
        ),
        policy("nothing", ["nothing"], [backend("sick", "s1")]),
        policy(
            "sticky",
            ["sticky"],
            [backend("alpha", "a1"), backend("gamma", "g1"), backend("beta", "b1")],
            strategy="hash",
            hash={"header": "x-user"},
        ),
        policy(
            "fastest",
            ["fastest"],
            [backend("alpha", "a1"), backend("gamma", "g1", priority=1)],
            strategy="fastest",
            hedge={"delayMs": 200},
        ),
    )


@pytest.fixture(scope="module")
def gateway(fakes, tmp_path_factory):
    gw = start_gateway(
        tmp_path_factory.mktemp("gw"),
        resources(fakes),
        env={"BETA_KEY": BETA_KEY, "KEYED_KEY": KEYED_KEY},
        log_level="debug",
    )
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(gateway):
    with openai.OpenAI(base_url=gateway.url, api_key=CLIENT_TOKEN, max_retries=0, timeout=20) as c:
        yield c


def ask(client, alias, text="hello", **kw):
    raw = client.chat.completions.with_raw_response.create(
        model=alias, messages=[{"role": "user", "content": text}], **kw
    )
    return raw.parse(), raw.headers


def served_by(headers) -> str:
    return headers["x-signalbox-provider"]


def test_weighted_three_to_one_split_over_2000_requests(client):
    counts = Counter(served_by(ask(client, "split")[1]) for _ in range(2000))
    assert sum(counts.values()) == 2000
    assert abs(counts["alpha"] / 2000 - 0.75) <= 0.05, counts
    assert abs(counts["gamma"] / 2000 - 0.25) <= 0.05, counts


def router_decisions(gateway) -> float:
    """How many requests the ext_proc has decided (its router-phase timer's count)."""
    for line in httpx.get(f"{gateway.admin_url}/metrics").text.splitlines():
        if line.startswith('signalbox_extproc_phase_duration_seconds_count{phase="router"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_compiled_split_is_three_to_one_with_no_ext_proc_message(gateway, client, fakes):
    before = router_decisions(gateway)
    counts = Counter()
    for _ in range(2000):
        _, headers = ask(client, "split-compiled")
        counts[served_by(headers)] += 1
        assert headers["x-signalbox-policy"] == "split-compiled" and headers["x-signalbox-reason"] == "weighted"
    assert abs(counts["alpha"] / 2000 - 0.75) <= 0.05, counts
    assert abs(counts["gamma"] / 2000 - 0.25) <= 0.05, counts
    assert router_decisions(gateway) == before  # Envoy alone: not one message to Python
    # Each backend got its own model name, written by Envoy (attempt.lua).
    assert {r["model"] for r in fakes["alpha"].requests()} == {"alpha-twin"}
    assert {r["model"] for r in fakes["gamma"].requests()} == {"gamma-twin"}
    ask(client, "split")  # a decided alias still reaches the ext_proc: the counter can move
    assert router_decisions(gateway) == before + 1
    explained = httpx.post(f"{gateway.admin_url}/v1/route", json={"model": "split-compiled"}).json()
    assert explained["compiled"] is True
    assert explained["shares"] == {"default/alpha/a2": 0.75, "default/gamma/g2": 0.25}


@pytest.mark.parametrize("alias", ["compiled-failover", "decided-failover"])
def test_failover_to_a_provider_with_another_base_path_sends_it_the_clients_path(client, fakes, alias):
    """Envoy's request headers are shared by every attempt: a failover attempt built from
    `:path` would carry the first provider's base path (/v1/openai/v1/chat/completions)."""
    fakes["flaky1"].behave(status=500)
    for _ in range(3):
        completion, headers = ask(client, alias)
        assert served_by(headers) == "gamma" and completion.model == "gamma-twin"
        assert headers["x-signalbox-policy"] == alias
    tried = fakes["flaky1"].requests()
    assert tried and {(r["path"], r["model"]) for r in tried} == {("/openai/v1/chat/completions", "nested-model")}
    arrived = fakes["gamma"].requests()
    assert {(r["path"], r["model"]) for r in arrived} == {("/v1/chat/completions", "gamma-twin")}


def test_a_compiled_stream_is_accounted_from_the_access_log(gateway, client):
    def tokens() -> float:
        text = httpx.get(f"{gateway.admin_url}/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("gen_ai_client_token_usage_total") and 'policy="split-compiled"' in line
        )

    before = tokens()
    stream = client.chat.completions.create(
        model="split-compiled", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = list(stream)
    assert chunks and chunks[-1].usage is not None  # Envoy asked the provider for usage
    deadline = time.monotonic() + 10
    while tokens() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tokens() > before


def test_crafted_bodies_on_a_compiled_alias_reach_only_what_the_alias_allows(gateway, fakes):
    url = gateway.url + "/chat/completions"
    msgs = '"messages":[{"role":"user","content":"hi"}]'
    # Duplicate model members: whichever Envoy routes on, every one of them is rewritten.
    for raw in (
        '{"model":"split-compiled",' + msgs + ',"model":"failover"}',
        '{"model":"failover",' + msgs + ',"model":"split-compiled"}',
    ):
        answer = httpx.post(url, content=raw, headers={"content-type": "application/json"})
        assert answer.status_code == 200, answer.text
        provider = answer.headers["x-signalbox-provider"]
        allowed = {"split-compiled": {"alpha", "gamma"}, "failover": {"flaky1", "beta"}}
        assert provider in allowed[answer.headers["x-signalbox-policy"]]
    for fake in fakes.values():
        assert all(r["model"] not in ("split-compiled", "failover") for r in fake.requests())
    # A member name spelled with escapes: Envoy decodes it to route, the rewrite refuses it.
    answer = httpx.post(url, content='{"mo\\u0064el":"split-compiled",' + msgs + "}")
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"
    # Not JSON at all: no alias is read, and the ext_proc answers as for any alias.
    answer = httpx.post(url, content='{"model":"split-compiled",', headers={"content-type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"


# Each failure kind gets its own primary: after a run of 5xx Envoy's outlier detection ejects
# the primary for a while (requests then go straight to the fallback), which would hide the
# next case's failover.
@pytest.mark.parametrize(
    ("status", "alias", "primary", "primary_model"),
    [
        (500, "failover", "flaky1", "flaky-one"),
        (429, "failover-429", "flaky2", "flaky-two"),
    ],
)
def test_failing_primary_loses_no_request(client, fakes, status, alias, primary, primary_model):
    fakes[primary].behave(status=status)
    fakes["beta"].behave(api_key=BETA_KEY)
    for _ in range(20):
        completion, headers = ask(client, alias)
        assert completion.system_fingerprint == "beta"
        assert completion.model == "beta-large"
        assert headers["x-signalbox-provider"] == "beta" and headers["x-signalbox-model"] == "b1"
    tried = fakes[primary].requests()
    assert tried and all(r["model"] == primary_model for r in tried)
    arrived = fakes["beta"].requests()
    assert len(arrived) == 20
    assert all(r["model"] == "beta-large" for r in arrived)  # its own model name, not alpha's
    assert all(r["headers"]["Authorization"] == f"Bearer {BETA_KEY}" for r in arrived)  # its own key


@pytest.mark.parametrize("alias", ["failover", "split-compiled"])
def test_who_answered_is_said_by_the_gateway_never_by_the_provider(client, fakes, alias):
    """The provider and model headers name the backend whose answer the client got (its host's
    name, read on the answer's way back: after a failover, the one that answered), decided or
    compiled; a provider's own headers of those names, or of the attempt marker, never reach
    the client."""
    spoof = {"x-signalbox-provider": "spoofed", "x-signalbox-model": "spoofed", "x-signalbox-attempt": "default/x/y"}
    for name in ("alpha", "gamma", "flaky1"):
        fakes[name].behave(headers=spoof, status=500 if name == "flaky1" else 200)
    fakes["beta"].behave(api_key=BETA_KEY, headers=spoof)
    answered = {("beta", "b1"), ("alpha", "a2"), ("gamma", "g2")}
    for _ in range(4):
        _, headers = ask(client, alias)
        assert (headers["x-signalbox-provider"], headers["x-signalbox-model"]) in answered, dict(headers)
        assert "x-signalbox-attempt" not in headers


def test_failover_never_carries_the_first_choices_key(client, fakes):
    """The router phase prepares the first attempt with the first choice's key; the failover
    attempt to a keyless provider must arrive without it (and with its own model)."""
    fakes["flaky1"].behave(status=500)
    for _ in range(5):
        _, headers = ask(client, "keyed-first")
        assert headers["x-signalbox-provider"] == "gamma"
    first = fakes["flaky1"].requests()
    assert first and all(r["headers"]["Authorization"] == f"Bearer {KEYED_KEY}" for r in first)
    arrived = fakes["gamma"].requests()
    assert len(arrived) == 5 and all(r["model"] == "gamma-mid" for r in arrived)
    for r in arrived:
        assert KEYED_KEY not in str(r["headers"]) and "Authorization" not in r["headers"], r["headers"]


def test_refused_connection_fails_over(client, fakes):
    fakes["beta"].behave(api_key=BETA_KEY)
    for _ in range(10):
        completion, headers = ask(client, "refused")
        assert completion.system_fingerprint == "beta" and headers["x-signalbox-policy"] == "refused"
    assert len(fakes["beta"].requests()) == 10


def test_client_token_never_reaches_a_provider(client, fakes):
    ask(client, "split")
    for fake in fakes.values():
        for r in fake.requests():
            assert CLIENT_TOKEN not in str(r["headers"])
            assert not any(k.lower().startswith("x-signalbox") for k in r["headers"])


def test_cost_routing_picks_cheapest_eligible(client):
    _, headers = ask(client, "cheap", "hi there")
    assert served_by(headers) == "alpha" and headers["x-signalbox-reason"].startswith("cost:")
    # Needs tools: alpha lacks them, gamma is the cheapest that has them.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    assert served_by(ask(client, "cheap", "hi", tools=tools)[1]) == "gamma"
    # Needs vision: only beta.
    raw = client.chat.completions.with_raw_response.create(
        model="cheap",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            }
        ],
    )
    assert served_by(raw.headers) == "beta"
    # ~15k tokens: over alpha's 8k context, within gamma's 32k.
    assert served_by(ask(client, "cheap", "word " * 12000)[1]) == "gamma"
    # Complex request: quality >= 0.7 rules alpha out.
    assert served_by(ask(client, "cheap", "Explain step by step the design of a distributed cache")[1]) == "gamma"


def test_classified_sends_code_and_chit_chat_to_different_backends(client):
    code, code_headers = ask(client, "bytask", "Write a Python function that merges two sorted lists")
    chat, chat_headers = ask(client, "bytask", "Good morning! How was your weekend?")
    assert code.system_fingerprint == "beta" and chat.system_fingerprint == "alpha"
    assert served_by(code_headers) == "beta" and code_headers["x-signalbox-reason"] == "classified:code/moderate"
    assert code_headers["x-signalbox-class"].startswith("class=code/moderate; task=code; complexity=moderate; tier=")
    assert "confidence=0." in code_headers["x-signalbox-class"]
    assert served_by(chat_headers) == "alpha" and chat_headers["x-signalbox-reason"].startswith("classified:chat")


def test_hash_keeps_a_user_on_one_backend_and_spreads_users_over_all(client):
    by_user = {}
    for user in (f"user-{n}" for n in range(24)):
        seen = {served_by(ask(client, "sticky", extra_headers={"x-user": user})[1]) for _ in range(4)}
        assert len(seen) == 1, (user, seen)  # sticky
        by_user[user] = seen.pop()
    # ... and not by sending everyone to one backend: each of the three serves its share.
    spread = Counter(by_user.values())
    assert set(spread) == {"alpha", "gamma", "beta"} and min(spread.values()) >= 3, spread


def test_fastest_races_the_next_backend_when_the_first_is_slow(client, fakes):
    fakes["alpha"].behave(delay_ms=3000)
    completion, headers = ask(client, "fastest")
    assert completion.system_fingerprint == "gamma" and served_by(headers) == "gamma"


def test_streaming_arrives_chunk_by_chunk(client):
    arrivals, parts = [], []
    stream = client.chat.completions.create(
        model="split",
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        extra_headers={"x-fake-chunks": "5", "x-fake-chunk-delay-ms": "150"},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            parts.append(chunk.choices[0].delta.content)
    assert parts == [f"chunk{i} " for i in range(5)]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Buffered delivery would put all chunks within a few ms of each other.
    assert min(gaps) > 0.08, gaps


def test_bad_inputs_get_status_and_openai_error(gateway, client):
    base = gateway.url
    r = httpx.post(f"{base}/chat/completions", content=b"{broken", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert r.headers["x-signalbox-reason"] == "invalid_json"

    with pytest.raises(openai.NotFoundError) as exc:
        ask(client, "no-such-model")
    assert exc.value.status_code == 404
    assert (
        "available: bytask, cheap, compiled-failover, decided-failover, embed, failover, failover-429, fastest, "
        "keyed-first, nothing, refused, split, split-compiled, sticky" in exc.value.message
    )

    big = b'{"model":"split","messages":[{"role":"user","content":"' + b"a" * (9 * 1024 * 1024) + b'"}]}'
    r = httpx.post(f"{base}/chat/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    r = httpx.post(f"{base}/chat/completions", content=iter([big]), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"  # chunked, no length

    with pytest.raises(openai.InternalServerError) as exc503:
        ask(client, "nothing")
    assert exc503.value.status_code == 503 and exc503.value.code == "no_healthy_backend"

    r = httpx.get(f"{base.removesuffix('/v1')}/admin/secret")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"


def test_models_endpoint_lists_aliases_for_sdk(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [
        "bytask",
        "cheap",
        "compiled-failover",
        "decided-failover",
        "embed",
        "failover",
        "failover-429",
        "fastest",
        "keyed-first",
        "nothing",
        "refused",
        "split",
        "split-compiled",
        "sticky",
    ]


def test_each_sdk_retrieves_and_pages_models_in_its_own_shape(gateway, client):
    """`GET /v1/models/<id>` for both SDKs and Anthropic's paginated list, answered by Envoy
    (core/models_api.lua)."""
    claude = anthropic.Anthropic(base_url=gateway.url.removesuffix("/v1"), api_key="unused", max_retries=0)
    model = client.models.retrieve("split")
    assert (model.id, model.object, model.owned_by) == ("split", "model", "signalbox")
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-9/turbo")  # percent-encoded by the SDK, "/" too
    assert missing.value.code == "model_not_found" and "'gpt-9/turbo'" in missing.value.message
    info = claude.models.retrieve("split")
    assert (info.id, info.type, info.display_name, info.created_at.year) == ("split", "model", "split", 1970)
    with pytest.raises(anthropic.NotFoundError) as gone:
        claude.models.retrieve("claude-9")
    assert gone.value.body["error"]["type"] == "not_found_error"
    # The SDK follows the pages by itself: three models a page, every alias once, in order.
    every = [m.id for m in client.models.list()]
    assert [m.id for m in claude.models.list(limit=3)] == every
    first = claude.models.list(limit=3)
    assert first.has_more and [m.id for m in first.data] == every[:3] and first.last_id == every[2]
    with pytest.raises(anthropic.BadRequestError):
        claude.models.list(limit=0)
    refused = httpx.delete(f"{gateway.url}/models/split")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "unknown_url"


def test_code_written_for_azure_openai_works_by_changing_its_endpoint(gateway, fakes):
    """Azure's SDK (deployment paths, `api-version`, the `api-key` header) and Azure's v1 API
    (`/openai/v1/...` with the plain SDK) on compiled and decided aliases: the provider gets the
    request on its own path, and never the client's key."""
    root = gateway.url.removesuffix("/v1")
    azure = openai.AzureOpenAI(azure_endpoint=root, api_key=CLIENT_TOKEN, api_version="2024-10-21", max_retries=0)
    v1 = openai.OpenAI(base_url=f"{root}/openai/v1", api_key=CLIENT_TOKEN, max_retries=0)
    for fake in fakes.values():
        fake.reset()
    for alias in ("split", "decided-failover"):
        raw = azure.chat.completions.with_raw_response.create(model=alias, messages=[{"role": "user", "content": "hi"}])
        assert raw.http_request.url.path == f"/openai/deployments/{alias}/chat/completions"
        assert raw.headers["x-signalbox-policy"] == alias and raw.parse().choices[0].message.content
        streamed = azure.chat.completions.create(model=alias, messages=[{"role": "user", "content": "hi"}], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).startswith("chunk0")
        assert v1.chat.completions.create(model=alias, messages=[{"role": "user", "content": "hi"}]).choices
    assert [m.id for m in v1.models.list()] == [m.id for m in azure.models.list()]
    assert v1.models.retrieve("split").id == "split"
    sent = [r for fake in fakes.values() for r in fake.requests()]
    assert len(sent) == 6 and all(r["path"].endswith("/chat/completions") for r in sent)
    # (nested's own base path is /openai/v1: the provider's path, not the client's.)
    assert not any("/deployments/" in r["path"] or "api-version" in r["path"] for r in sent)
    assert CLIENT_TOKEN not in json.dumps([r["headers"] for r in sent])
    with pytest.raises(openai.NotFoundError):
        azure.images.generate(model="split", prompt="a lighthouse")


def test_anthropic_endpoints_the_gateway_lacks_are_refused_in_anthropics_shape(gateway):
    """Message batches and files, asked with a body (the ext_proc refuses it) and without
    (Envoy does): the Anthropic SDK gets its own error shape, not OpenAI's."""
    claude = anthropic.Anthropic(base_url=gateway.url.removesuffix("/v1"), api_key="unused", max_retries=0)
    batch = [
        {
            "custom_id": "a",
            "params": {"model": "split", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        }
    ]
    for call in (
        lambda: claude.messages.batches.create(requests=batch),
        lambda: claude.messages.batches.list(),
        lambda: claude.beta.files.list(),
    ):
        with pytest.raises(anthropic.NotFoundError) as refused:
            call()
        assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "not_found_error"


def test_embeddings_reach_the_sdk_one_vector_per_input_as_it_asked_for_them(client, fakes):
    """OpenAI's embeddings through a decided alias: the SDK's default (base64, which it decodes)
    and floats, several inputs, `dimensions`; the cheaper embedding model is picked."""
    raw = client.embeddings.with_raw_response.create(model="embed", input=["hello", "world", "again"])
    answer = raw.parse()
    assert raw.headers["x-signalbox-provider"] == "alpha" and answer.model == "alpha-embed"
    assert [d.index for d in answer.data] == [0, 1, 2] and len(answer.data[0].embedding) == 3
    assert answer.data[1].embedding == pytest.approx([0.11, 0.21, 0.31])  # decoded from base64
    floats = client.embeddings.create(model="embed", input="x", encoding_format="float", dimensions=5)
    assert len(floats.data) == 1 and len(floats.data[0].embedding) == 5
    assert fakes["alpha"].requests()[-1]["body"]["model"] == "alpha-embed"


def test_an_embeddings_answer_larger_than_any_request_may_be_is_served_and_counted(gateway, client):
    """Envoy has one buffer limit per stream, and the request's limit was the answer's too: an
    embeddings answer over 8 MB (400 inputs at 3,072 dimensions, as floats; LangChain sends
    1,000 at a time) was Envoy's plain-text 500. Requests stay held to max_body_bytes."""
    inputs = [f"passage {i}" for i in range(400)]
    raw = client.embeddings.with_raw_response.create(
        model="embed", input=inputs, dimensions=3072, encoding_format="float"
    )
    assert len(raw.http_response.content) > 8 * 1024 * 1024  # larger than any request may be
    answer = raw.parse()
    assert len(answer.data) == 400 and len(answer.data[-1].embedding) == 3072
    line = logged(gateway, [raw.headers["x-request-id"]])[raw.headers["x-request-id"]]
    assert line["prompt_tokens"] == answer.usage.prompt_tokens == 3 * len(inputs)


def test_an_answer_over_the_gateways_limit_is_a_502_each_sdk_reads(fakes, tmp_path):
    """An answer larger than the gateway reads whole (`max_answer_bytes`) never reaches the
    client as Envoy's plain-text 500: it is a 502 `answer_too_large` in the client's API. (A
    translated answer comes from the translation in one piece, which Envoy reads without
    holding it: it is served.)"""
    gw = start_gateway(
        tmp_path,
        dump(
            provider("beta", fakes["beta"].url + "/v1", [model("c")]),
            provider("beta-claude", fakes["beta"].url + "/v1", [model("c")], type="anthropic"),
            policy("chat", ["chat"], [backend("beta", "c")], strategy="failover"),
            policy("claude", ["claude"], [backend("beta-claude", "c")], strategy="failover"),
        ),
        max_body_bytes=1 << 19,
        max_answer_bytes=1 << 20,
    )
    try:
        fakes["beta"].behave(content="word " * 300_000)  # a 1.5 MB answer
        with (
            openai.OpenAI(base_url=gw.url, api_key=CLIENT_TOKEN, max_retries=0) as c,
            pytest.raises(openai.APIStatusError) as refused,
        ):
            c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
        assert refused.value.status_code == 502 and refused.value.code == "answer_too_large"
        with (
            anthropic.Anthropic(base_url=gw.url.removesuffix("/v1"), api_key=CLIENT_TOKEN, max_retries=0) as claude,
            pytest.raises(anthropic.APIStatusError) as refused_messages,
        ):
            claude.messages.create(model="claude", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        assert refused_messages.value.status_code == 502
        assert refused_messages.value.response.json()["error"]["type"] == "api_error"
    finally:
        gw.stop()


@pytest.mark.parametrize("alias", ["split", "decided-failover"])
def test_legacy_completions_answer_and_stream_through_the_gateway(client, alias):
    """OpenAI's legacy `/v1/completions` (code-completion clients still call it): the answer and
    the stream reach the SDK in that API's own shape, on a compiled and a decided alias."""
    done = client.completions.with_raw_response.create(model=alias, prompt="def add(a, b):", max_tokens=16)
    answer = done.parse()
    assert answer.object == "text_completion" and answer.choices[0].text.startswith("[")
    assert done.headers["x-signalbox-policy"] and answer.usage.completion_tokens == 7
    stream = client.completions.create(
        model=alias, prompt="def add(a, b):", max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "".join(f"chunk{i} " for i in range(5))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_every_response_carries_the_signalbox_headers(gateway, client):
    _, ok = ask(client, "split")
    err = httpx.post(f"{gateway.url}/chat/completions", json={"model": "nope"})
    for headers in (ok, err.headers):
        for name in ("x-signalbox-provider", "x-signalbox-model", "x-signalbox-policy", "x-signalbox-reason"):
            assert headers.get(name), (name, dict(headers))


def test_each_request_has_a_line_in_the_request_log_that_its_request_id_finds(gateway, client):
    _, routed_headers = ask(client, "split")
    refused = httpx.post(f"{gateway.url}/chat/completions", json={"model": "nope", "messages": []})
    assert gateway.workdir

    def line(request_id: str) -> dict | None:
        log = gateway.workdir / "requests.log"
        entries = log_entries(log)
        return next((e for e in entries if e["request_id"] == request_id and e["event"] == "request"), None)

    deadline = time.monotonic() + 10  # Envoy flushes the file every second
    while not (line(routed_headers["x-request-id"]) and line(refused.headers["x-request-id"])):
        assert time.monotonic() < deadline, "no request log lines"
        time.sleep(0.1)
    routed = line(routed_headers["x-request-id"])
    assert routed is not None
    assert (routed["status"], routed["method"], routed["policy"]) == (200, "POST", "split")
    assert (routed["provider"], routed["model"]) == (
        routed_headers["x-signalbox-provider"],
        routed_headers["x-signalbox-model"],
    )
    assert routed["reason"] == routed_headers["x-signalbox-reason"] and routed["attempts"] == 1
    assert (routed["prompt_tokens"], routed["completion_tokens"]) == (10, 7)  # the fake's usage, as numbers
    assert routed["duration_ms"] >= 0
    error = line(refused.headers["x-request-id"])
    assert error is not None
    assert (error["status"], error["provider"], error["reason"]) == (404, "none", refused.json()["error"]["code"])


def test_models_api_answers_are_logged_with_the_path_the_client_called(gateway):
    """The models API answered inside Envoy (a model by id, Anthropic's paged list: the Lua
    filter answers before the listener keeps the client's path) is logged with that path, as
    every other request is; the log once said `null`."""
    paths = {
        "/v1/models": {},
        "/v1/models/split": {},
        "/v1/models/gpt-9": {},
        "/v1/models?limit=2": {"anthropic-version": "2023-06-01"},
    }
    answers = {path: httpx.get(gateway.url.removesuffix("/v1") + path, headers=h) for path, h in paths.items()}
    assert [a.status_code for a in answers.values()] == [200, 200, 404, 200]
    lines = logged(gateway, [a.headers["x-request-id"] for a in answers.values()])
    assert {path: lines[a.headers["x-request-id"]]["path"] for path, a in answers.items()} == {p: p for p in paths}


def test_no_api_key_in_any_log_or_generated_file(gateway, client, fakes):
    fakes["flaky1"].behave(status=500)
    fakes["beta"].behave(api_key=BETA_KEY)
    ask(client, "failover")
    text = logs(gateway)
    assert "generation 1 loaded" in text  # the logs were written, at debug level
    assert BETA_KEY not in text
    key_store = gateway.workdir / "credentials"  # where Envoy reads keys from (as a pod's Secret volume)
    for path in gateway.workdir.rglob("*.json"):
        if path.parent == key_store:
            assert path.stat().st_mode & 0o077 == 0, path  # owner-only
            continue
        assert BETA_KEY not in path.read_text(), path
    assert any(BETA_KEY in p.read_text() for p in key_store.iterdir())
    # Envoy itself never shows it: attempt.lua reads it from the file, it is in no config.
    dump = httpx.get(f"http://127.0.0.1:{gateway.admin_port}/config_dump?include_eds").text
    assert BETA_KEY not in dump and KEYED_KEY not in dump
    # The admin API must never show it either.
    request = {"model": "keyed-first", "messages": [{"role": "user", "content": "hi"}]}
    for endpoint in ("/v1/route", "/v1/classify"):
        answer = httpx.post(f"{gateway.admin_url}{endpoint}", json=request).text
        assert KEYED_KEY not in answer and BETA_KEY not in answer
    for endpoint in ("/v1/models", "/v1/budget", "/metrics"):
        answer = httpx.get(f"{gateway.admin_url}{endpoint}").text
        assert KEYED_KEY not in answer and BETA_KEY not in answer
