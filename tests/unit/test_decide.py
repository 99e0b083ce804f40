import gzip
import json

import pytest

from signalbox.core.compiler import compile_config
from signalbox.core.envoygen import modelsapi
from signalbox.core.errors import MalformedRequest, PayloadTooLarge, UnknownModel, UnsupportedPath
from signalbox.extproc import decide
from signalbox.extproc.runtime import RuntimeTable, SecretValue, default_key_resolver
from signalbox.extproc.strategies import SelectionState, UnsatisfiableRequest
from tests.factories import backend, model, policy, provider

KEY = "sk-test-123456789"


@pytest.fixture
def table(monkeypatch, tmp_path):
    monkeypatch.setenv("OAI_KEY", KEY)
    (tmp_path / "az").write_text("az-key-987\n")
    providers = [
        provider(
            "oai",
            "https://api.openai.com/v1",
            [model("gpt", upstreamName="gpt-4o-mini")],
            type="openai",
            auth={"env": "OAI_KEY"},
        ),
        provider(
            "az",
            "https://res.openai.azure.com",
            [model("dep", upstreamName="prod-deploy")],
            type="azure-openai",
            auth={"file": str(tmp_path / "az")},
            azure={"apiVersion": "2024-06-01"},
        ),
        provider("vllm", "http://vllm.llm.svc:8000/v1", [model("llama")]),
    ]
    general = policy(
        "general",
        ["auto"],
        [backend("oai", "gpt"), backend("az", "dep"), backend("vllm", "llama")],
        strategy="failover",
    )
    team = policy("team", ["auto"], [backend("vllm", "llama")])
    team["spec"]["match"]["headers"] = [{"name": "x-team", "value": "ml"}]
    result = compile_config(providers, [general, team])
    assert result.ok, result.problems
    return RuntimeTable.from_config(result.config, default_key_resolver())


def body(model_name="auto", **extra):
    return json.dumps({"model": model_name, "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


def test_router_phase_rewrites_model_and_names_target(table):
    out = decide.decide(table, SelectionState(), "/v1/chat/completions", {}, body(temperature=0.2))
    assert json.loads(out.body) == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.2,
    }
    assert out.target == out.selection.choice.target and out.target.startswith("t.")
    assert out.policy.name == "general"


def test_the_router_decision_holds_no_key_and_names_only_its_target(table):
    """Path, authority and key of the first attempt are the target route's, in Envoy: the
    decision is the target (dynamic metadata) and the body, nothing a key could leak from."""
    client = {"authorization": "Bearer client-gateway-token"}
    out = decide.decide(table, SelectionState(), "/v1/chat/completions?x=1", client, body())
    assert out.selection.choice.backend.id == "default/oai/gpt"
    assert KEY not in repr(out) and b"client-gateway-token" not in out.body


def test_provider_paths_for_the_llm_tier(table):
    backends = table.backends
    assert decide.upstream_path(backends["default/oai/gpt"], "/v1/chat/completions") == "/v1/chat/completions"
    assert (
        decide.upstream_path(backends["default/az/dep"], "/v1/chat/completions?x=1")
        == "/openai/deployments/prod-deploy/chat/completions?x=1&api-version=2024-06-01"
    )


def test_more_specific_header_match_wins(table):
    out = decide.decide(table, SelectionState(), "/v1/chat/completions", {"x-team": "ml"}, body())
    assert out.policy.name == "team"


def test_bad_requests_get_specific_errors(table):
    state = SelectionState()
    with pytest.raises(MalformedRequest, match="not valid JSON"):
        decide.decide(table, state, "/v1/chat/completions", {}, b"{nope")
    # A compressed body is named as such (what the client can fix), not as broken JSON.
    with pytest.raises(MalformedRequest, match="gzip-compressed"):
        decide.decide(table, state, "/v1/chat/completions", {}, gzip.compress(body()))
    with pytest.raises(MalformedRequest, match="'model'"):
        decide.decide(table, state, "/v1/chat/completions", {}, b'{"messages": []}')
    with pytest.raises(UnknownModel, match="available: auto"):
        decide.decide(table, state, "/v1/chat/completions", {}, body("gpt-5"))
    with pytest.raises(PayloadTooLarge, match="limit of 10 bytes"):
        decide.decide(table, state, "/v1/chat/completions", {}, body(), max_body_bytes=10)
    with pytest.raises(PayloadTooLarge):
        decide.check_length({"content-length": "11"}, 10)


def test_paths():
    assert decide.check_path("POST", "/v1/chat/completions?x=1") == "route"
    assert decide.check_path("POST", "/v1/feedback") == "feedback"
    with pytest.raises(UnsupportedPath, match="GET is not supported"):
        decide.check_path("GET", "/v1/chat/completions")
    with pytest.raises(UnsupportedPath, match="unknown path '/admin'"):
        decide.check_path("POST", "/admin")


def test_models_listing_is_openai_shaped(table):
    listing = json.loads(modelsapi.answer(table.aliases, "/v1/models", anthropic=False))
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == ["auto"]


def test_keys_never_show_in_reprs(table):
    rendered = repr(table)
    assert KEY not in rendered and "az-key-987" not in rendered
    assert str(SecretValue("abc")) == "SecretValue(<redacted>)"


def test_unknown_schema_version_is_refused(table):
    from signalbox.api.v1alpha1 import config_pb2 as pb
    from signalbox.core.errors import ConfigVersionError

    with pytest.raises(ConfigVersionError, match="schema version 99"):
        RuntimeTable.from_config(pb.RoutingConfig(schema_version=99))


def test_a_provider_whose_key_cannot_be_read_is_never_sent_keyless(monkeypatch, tmp_path, caplog):
    from signalbox.extproc.metrics import Metrics
    from signalbox.extproc.reload import TableHolder

    monkeypatch.delenv("MISSING_KEY", raising=False)
    providers = [
        provider("keyed", "https://api.example.com/v1", [model("m")], auth={"env": "MISSING_KEY"}),
        provider("open", "http://vllm.llm.svc:8000/v1", [model("m")]),
    ]
    pol = policy("p", ["auto"], [backend("keyed", "m"), backend("open", "m")], strategy="failover")
    holder = TableHolder(metrics=Metrics())
    table = holder.install(compile_config(providers, [pol]).config)
    # Reported once, by where the key should be, never sent without it:
    assert "environment variable MISSING_KEY" in caplog.text
    assert holder.metrics.providers_without_key._value.get() == 1
    out = decide.decide(table, SelectionState(), "/v1/chat/completions", {}, body(), explain=True)
    assert out.selection.choice.backend.id == "default/open/m"  # the next backend, not a keyless call
    assert ("default/keyed/m", False, "api key unavailable") in out.selection.candidates
    # A failover attempt Envoy still sends there is refused by its attempt.lua (test_attempt_lua).


def test_embeddings_requests_reach_only_embedding_models_and_skip_classification():
    from signalbox.core.compiler import chain

    providers = [
        provider("chat", "http://127.0.0.1:1/v1", [model("c", capabilities=["streaming"])]),
        provider("emb", "http://127.0.0.1:2/v1", [model("e", capabilities=["embeddings"])]),
    ]
    pol = policy("p", ["auto"], [backend("chat", "c"), backend("emb", "e")], strategy="failover")
    cfg = compile_config(providers, [pol]).config
    table = RuntimeTable.from_config(cfg)
    text = json.dumps({"model": "auto", "input": ["Write a Python function"]}).encode()
    out = decide.decide(table, SelectionState(), "/v1/embeddings", {}, text)
    assert out.selection.choice.backend.id == "default/emb/e"  # the chat model comes first in priority
    assert (out.classification.tier, out.classification.task_type) == ("path", "embeddings")
    chat = decide.decide(table, SelectionState(), "/v1/chat/completions", {}, body())
    assert chat.selection.choice.backend.id == "default/chat/c"
    # Envoy's failover chain from the embedding model never leads to a model that cannot embed.
    policy_pb = cfg.policies[0]
    first = next(i for i, b in enumerate(policy_pb.backends) if cfg.backends[b.backend].model == "e")
    assert [b.model for b in chain(cfg, policy_pb, first)] == ["e"]


@pytest.fixture
def mixed():
    """A failover chain of an OpenAI-compatible backend, then an Anthropic one."""
    providers = [
        provider("vllm", "http://vllm:8000/v1", [model("llama", capabilities=["streaming", "tools"])]),
        provider(
            "claude",
            "https://api.anthropic.com/v1",
            [model("sonnet", capabilities=["streaming", "tools"])],
            type="anthropic",
        ),
    ]
    chain = policy(
        "mixed", ["mixed"], [backend("vllm", "llama"), backend("claude", "sonnet", priority=1)], strategy="failover"
    )
    result = compile_config(providers, [chain])
    assert result.ok, result.problems
    assert not result.config.policies[0].compiled  # two API families: the prompt decides
    return RuntimeTable.from_config(result.config, default_key_resolver())


def test_a_backend_that_cannot_be_sent_the_request_is_not_eligible(mixed):
    # Two answers exist in chat only: the Anthropic backend is ruled out, the chat one serves.
    out = decide.decide(mixed, SelectionState(), "/v1/chat/completions", {}, body("mixed", n=2))
    assert out.selection.choice.backend.provider.name == "vllm"
    # An Anthropic body the chat translation cannot read rules out the chat backend only: the
    # Anthropic backend takes it as it is (here: a server tool, Anthropic's alone).
    anthropic_body = json.dumps(
        {
            "model": "mixed",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
        }
    ).encode()
    out = decide.decide(mixed, SelectionState(), "/v1/messages", {}, anthropic_body)
    assert out.selection.choice.backend.provider.name == "claude"
    assert json.loads(out.body)["model"] == "sonnet"
    assert "stream_options" not in json.loads(out.body)


def test_a_request_malformed_in_the_clients_api_is_its_400_not_a_missing_backend(mixed):
    """When every backend needs a translation and the request is malformed in the client's own
    API, the client hears its mistake (Anthropic: `max_tokens` is required), not "no backend can
    serve this request"."""
    vllm_only = RuntimeTable.from_config(
        compile_config(
            [provider("vllm", "http://vllm:8000/v1", [model("llama")])],
            [policy("chat", ["chat"], [backend("vllm", "llama")])],
        ).config,
        default_key_resolver(),
    )
    no_max_tokens = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).encode()
    with pytest.raises(MalformedRequest, match="max_tokens") as raised:
        decide.decide(vllm_only, SelectionState(), "/v1/messages", {}, no_max_tokens)
    assert raised.value.param == "max_tokens"
    assert json.loads(raised.value.body_for("anthropic"))["error"]["type"] == "invalid_request_error"
    # A backend of the client's own API takes the request as it is: its provider answers.
    out = decide.decide(mixed, SelectionState(), "/v1/messages", {}, no_max_tokens.replace(b'"chat"', b'"mixed"'))
    assert out.selection.choice.backend.provider.name == "claude"
    # What one API cannot express is still no backend's, not the client's mistake.
    server_tool = {
        "model": "chat",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}],
    }
    with pytest.raises(UnsatisfiableRequest, match="no backend of policy 'chat'"):
        decide.decide(vllm_only, SelectionState(), "/v1/messages", {}, json.dumps(server_tool).encode())
