from pathlib import Path

import pytest

from signalbox.core import loader
from signalbox.core.compiler import SCHEMA_VERSION, chain, compile_config
from signalbox.core.errors import ConfigError
from tests.factories import backend, model, policy, provider

ROOT = Path(__file__).resolve().parents[2]


def two_providers(**kw):
    return [
        provider("a", "http://127.0.0.1:1/v1", [model("m1", quality=0.6), model("m2")], **kw),
        provider(
            "b",
            "https://api.example.com/v1",
            [model("big", upstreamName="big-2025")],
            auth={"secretRef": {"name": "b-key", "key": "apiKey"}},
        ),
    ]


def test_quickstart_compiles_to_versioned_config():
    docs = loader.load([ROOT / "examples" / "quickstart"])
    result = compile_config(docs.providers, docs.policies, generation=7)
    assert result.ok, result.problems
    cfg = result.config
    assert cfg.schema_version == SCHEMA_VERSION and cfg.generation == 7
    assert len(cfg.content_hash) == 64
    assert {p.name for p in cfg.policies} == {"auto", "balanced", "by-task", "claude-first"}
    # Backends of two API families: the prompt decides which can take it (decided path).
    assert not next(p for p in cfg.policies if p.name == "claude-first").compiled


def test_every_problem_is_reported_with_its_json_path():
    providers = [provider("a", "ftp://nowhere", [model("m1", quality=1.5), model("m1")])]
    policies = [
        policy("p", ["x"], [backend("a", "m1"), backend("ghost", "m9")], strategy="teleport"),
        policy("q", ["y"], [backend("missing", "m1")]),
    ]
    result = compile_config(providers, policies)
    assert not result.ok
    paths = {(p.name, p.path) for p in result.problems}
    assert ("a", "spec.baseUrl") in paths
    assert ("a", "spec.models[0].quality") in paths
    assert ("p", "spec.strategy") in paths
    assert ("q", "spec.backends[0].provider") in paths
    ref = next(p for p in result.problems if p.name == "q")
    assert ref.reason == "RefNotFound" and "AIProvider default/missing not found" in ref.message


def test_a_reference_to_a_resource_that_did_not_validate_says_so_not_that_it_is_missing():
    """A policy naming a provider (as a backend or its mirror) or a rollout candidate that is
    there but invalid is told that, where "not found" sent its author looking for it."""
    providers = [provider("a", "ftp://nowhere", [model("m")]), provider("b", "http://127.0.0.1:1/v1", [model("m")])]
    policies = [
        policy("p", ["x"], [backend("a", "m")]),
        policy("q", ["y"], [backend("b", "m")], mirror={"provider": "a", "model": "m", "percent": 5}),
        policy("r", ["z"], [backend("b", "m")], rollout={"candidate": "broken"}),
        policy("broken", ["w"], [backend("b", "m")], strategy="teleport"),
        policy("s", ["v"], [backend("ghost", "m")]),
    ]
    problems = {(p.name, p.path): p for p in compile_config(providers, policies).problems}
    for name, path, named in (
        ("p", "spec.backends[0].provider", "AIProvider default/a"),
        ("q", "spec.mirror", "AIProvider default/a"),
        ("r", "spec.rollout.candidate", "RoutingPolicy default/broken"),
    ):
        assert problems[(name, path)].message == f"{named} is invalid (its own problems say why)"
        assert problems[(name, path)].reason == "RefNotFound"  # (the operator's ResolvedRefs condition)
    assert problems[("s", "spec.backends[0].provider")].message == "AIProvider default/ghost not found"


def test_unknown_model_names_what_the_provider_has():
    result = compile_config(two_providers(), [policy("p", ["x"], [backend("a", "nope")])])
    (problem,) = result.problems
    assert problem.path == "spec.backends[0].model"
    assert "has: m1, m2" in problem.message


def test_duplicate_alias_is_a_problem_but_header_variants_are_not():
    backends = [backend("a", "m1")]
    same = compile_config(two_providers(), [policy("p1", ["auto"], backends), policy("p2", ["auto"], backends)])
    assert [p.path for p in same.problems] == ["spec.match.models[0]"]
    variant = policy("p2", ["auto"], backends)
    variant["spec"]["match"]["headers"] = [{"name": "X-Team", "value": "search"}]
    assert compile_config(two_providers(), [policy("p1", ["auto"], backends), variant]).ok


def test_missing_secret_is_reported_only_when_secrets_are_known():
    pol = [policy("p", ["x"], [backend("b", "big")])]
    assert compile_config(two_providers(), pol).ok
    result = compile_config(two_providers(), pol, secrets_present=set())
    (problem,) = result.problems
    assert problem.path == "spec.auth.secretRef" and problem.reason == "RefNotFound"
    assert compile_config(two_providers(), pol, secrets_present={("default", "b-key", "apiKey")}).ok


def test_failover_chains_follow_priority_and_skip_unhealthy():
    providers = [
        provider("a", "http://127.0.0.1:1/v1", [model("m1")]),
        provider("b", "http://127.0.0.1:2/v1", [model("m1")]),
        provider("c", "http://127.0.0.1:3/v1", [model("m1")], healthy=False),
    ]
    backends = [backend("a", "m1", priority=2), backend("b", "m1", priority=1), backend("c", "m1", priority=0)]
    cfg = compile_config(providers, [policy("p", ["x"], backends, strategy="failover")]).config
    pol = cfg.policies[0]
    assert pol.backends[2].target == ""  # unhealthy: never a first choice
    assert [b.id for b in chain(cfg, pol, 0)] == ["default/a/m1", "default/b/m1"]
    assert [b.id for b in chain(cfg, pol, 1)] == ["default/b/m1", "default/a/m1"]
    assert pol.max_attempts == 2


def test_content_hash_is_stable_and_tracks_content():
    pol = [policy("p", ["x"], [backend("a", "m1")])]
    h1 = compile_config(two_providers(), pol, generation=1).config.content_hash
    h2 = compile_config(list(reversed(two_providers())), pol, generation=2).config.content_hash
    pol[0]["spec"]["backends"][0]["weight"] = 5
    h3 = compile_config(two_providers(), pol).config.content_hash
    assert h1 == h2 != h3


def test_classified_routes_must_name_declared_backends():
    pol = policy(
        "p", ["x"], [backend("a", "m1")], strategy="classified", routes=[{"taskTypes": ["code"], "backends": ["a/m2"]}]
    )
    (problem,) = compile_config(two_providers(), [pol]).problems
    assert "a/m2" in problem.message


def test_invalid_rule_regex_is_reported():
    pol = policy(
        "p",
        ["x"],
        [backend("a", "m1")],
        classification={"rules": [{"name": "r", "patterns": ["(unclosed"], "taskType": "code"}]},
    )
    (problem,) = compile_config(two_providers(), [pol]).problems
    assert problem.path == "spec.classification.rules[0].patterns[0]"


def test_compiled_config_names_secrets_never_values(monkeypatch):
    monkeypatch.setenv("SECRET_ENV", "sk-live-should-not-appear")
    prov = provider("a", "http://127.0.0.1:1/v1", [model("m1")], auth={"env": "SECRET_ENV"})
    cfg = compile_config([prov], [policy("p", ["x"], [backend("a", "m1")])]).config
    raw = cfg.SerializeToString()
    assert b"SECRET_ENV" in raw and b"sk-live" not in raw


def test_loader_reports_bad_yaml_and_wrong_api_version(tmp_path):
    (tmp_path / "a.yaml").write_text("kind: AIProvider\napiVersion: signalbox.io/v9\nmetadata: {name: x}\n")
    (tmp_path / "b.yaml").write_text("key: [unclosed\n")
    with pytest.raises(ConfigError) as exc:
        loader.load([tmp_path])
    messages = " ".join(p.message for p in exc.value.problems)
    assert "must be signalbox.io/v1alpha1" in messages and "cannot read YAML" in messages


def test_the_data_planes_strategy_names_are_the_crds():
    from signalbox.api.v1alpha1 import config_pb2 as pb
    from signalbox.core.models import Strategy
    from signalbox.core.schema import STRATEGY_NAMES

    assert {pb.Strategy.Value(s.name): s.value for s in Strategy} == STRATEGY_NAMES


def test_the_ext_proc_does_not_load_the_compiler_or_pydantic():
    """Each ext_proc worker would carry them (about 20 MB); it reads compiled configs only. Nor
    google-auth with its HTTP and crypto stack (13.5 MB) unless a provider mints tokens, nor
    botocore (3.2 MB) unless a Bedrock stream is translated, nor aiohttp (9 MB) in a worker
    that serves no admin API and sends no copies or LLM-tier questions."""
    import subprocess
    import sys

    heavy = {"pydantic", "signalbox.core.compiler", "google.auth", "requests", "cryptography", "botocore", "aiohttp"}
    code = f"import sys, signalbox.extproc.main; print(sorted({heavy!r} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_streams_are_sanitized_by_default_only_for_openai_compatible_servers():
    providers = [
        provider("selfhosted", "http://vllm:8000/v1", [model("m")]),
        provider("first-party", "https://api.openai.com/v1", [model("m")], type="openai"),
        provider("opted-in", "https://api.openai.com/v1", [model("m")], type="openai", sanitizeStreams=True),
        provider("opted-out", "http://vllm:8000/v1", [model("m")], sanitizeStreams=False),
    ]
    result = compile_config(providers, [policy("p", ["x"], [backend(p["metadata"]["name"], "m") for p in providers])])
    assert result.ok, result.problems
    sanitized = {p.name: p.sanitize_streams for p in result.config.providers}
    assert sanitized == {"selfhosted": True, "first-party": False, "opted-in": True, "opted-out": False}


def test_a_bedrock_backend_cannot_be_a_mirror_or_an_llm_tier():
    providers = [
        provider("br", "https://bedrock-runtime.us-east-1.amazonaws.com", [model("haiku")], type="bedrock"),
        provider("a", "http://127.0.0.1:9001/v1", [model("m")]),
    ]
    ok = compile_config(providers, [policy("p", ["x"], [backend("br", "haiku")])])
    assert ok.ok, ok.problems
    mirrored = compile_config(
        providers, [policy("p", ["x"], [backend("a", "m")], mirror={"provider": "br", "model": "haiku", "percent": 5})]
    )
    assert not mirrored.ok
    assert [p.path for p in mirrored.problems] == ["spec.mirror"]
    assert "bedrock" in mirrored.problems[0].message
