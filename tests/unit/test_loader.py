"""The loader's document cache reads what PyYAML reads, and parses only documents that changed."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from signalbox.core import loader
from signalbox.core.errors import ConfigError
from signalbox.core.loader import SAFE_LOADER, DocumentCache
from signalbox.core.models import API_VERSION

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# What a YAML file is made of: dumped documents (block scalars with "---" inside among them),
# document markers of each form, comments, blank lines and text that may not parse at all.
pieces = st.one_of(
    values.map(lambda v: yaml.safe_dump(v)),
    st.sampled_from(
        [
            "---\n",
            "--- \n",
            "--- # next\n",
            "---\r\n",
            "...\n",
            "%YAML 1.1\n",
            "# a comment\n",
            "\n",
            "text: |\n  one\n  --- not a marker\n",
            "---a: 1\n",
            "key: [1,\n",
            "  - indented\n",
        ]
    ),
    st.text(max_size=12),
)


def count_parses(monkeypatch) -> list[str]:
    """The texts PyYAML is asked to parse from now on, in order."""
    parsed: list[str] = []
    real_load_all = yaml.load_all

    def counting(text, Loader):
        parsed.append(text)
        return real_load_all(text, Loader=Loader)

    monkeypatch.setattr(loader.yaml, "load_all", counting)
    return parsed


def load_all(text: str) -> list | type:
    try:
        return list(yaml.load_all(text, Loader=SAFE_LOADER))
    except yaml.YAMLError:
        return yaml.YAMLError


def cached(cache: DocumentCache, text: str) -> list | type:
    try:
        return cache.documents(text)
    except yaml.YAMLError:
        return yaml.YAMLError


@settings(max_examples=400, deadline=None)
@given(st.lists(pieces, max_size=8), st.lists(pieces, max_size=8))
def test_documents_are_what_pyyaml_reads_however_the_text_changes(first, second):
    cache = DocumentCache()
    for text in ("".join(first), "".join(second), "".join(first)):
        assert cached(cache, text) == load_all(text)
        cache.loaded()


def test_a_document_whose_text_did_not_change_is_not_parsed_again(tmp_path, monkeypatch):
    def provider(name: str) -> str:
        return f"apiVersion: {loader.API_VERSION}\nkind: AIProvider\nmetadata: {{name: {name}}}\nspec: {{}}\n"

    file = tmp_path / "providers.yaml"
    file.write_text("---\n".join(provider(f"p{i}") for i in range(3)))
    cache = DocumentCache()
    first = loader.load([file], cache)
    parsed = count_parses(monkeypatch)
    file.write_text("---\n".join(provider(f"p{i}") for i in (0, 1, 2, 3)))
    second = loader.load([file], cache)
    assert len(parsed) == 1 and "p3" in parsed[0] and "p0" not in parsed[0]  # the new document alone
    assert second.providers[:3] == first.providers and second.providers[0] is first.providers[0]
    assert [p["metadata"]["name"] for p in second.providers] == ["p0", "p1", "p2", "p3"]


def test_a_compile_with_the_cache_validates_only_new_documents_and_still_reports_old_problems(tmp_path, monkeypatch):
    from signalbox.core import compiler
    from signalbox.local import CompileCache, compile_files
    from tests.factories import backend, dump, model, policy, provider

    good = dump(provider("a", "http://127.0.0.1:9/v1", [model("m")]), policy("p", ["x"], [backend("a", "m")]))
    bad = dump(policy("q", ["y"], [backend("a", "m")], strategy="no-such-strategy"))
    (tmp_path / "good.yaml").write_text(good)
    cache = CompileCache()
    first = compile_files([tmp_path], cache=cache)
    assert first.config is not None
    validated: list[str] = []
    real = compiler._parse

    def counting(cls, obj, problems):
        validated.append(obj["metadata"]["name"])
        return real(cls, obj, problems)

    monkeypatch.setattr(compiler, "_parse", counting)
    (tmp_path / "bad.yaml").write_text(bad)
    second = compile_files([tmp_path], cache=cache)
    assert validated == ["q"]  # a and p were validated by the first compile
    assert second.config is None and any(p.name == "q" for p in second.problems)
    third = compile_files([tmp_path], cache=cache)
    assert validated == ["q"]  # nothing new: the bad policy's problems come from the cache
    assert third.config is None and [str(p) for p in third.problems] == [str(p) for p in second.problems]
    (tmp_path / "bad.yaml").unlink()
    assert compile_files([tmp_path], cache=cache).config.content_hash == first.config.content_hash


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "aa"]),  # which provider file changes ("aa" sorts first)
            st.sampled_from(["m1", "m2"]),  # its second model
            st.booleans(),  # healthy, as its status says
            st.sampled_from(["http://127.0.0.1:9/v1", "https://api.example.com/v1"]),
            st.sampled_from(["failover", "cost", "weighted"]),  # the first policy's strategy
        ),
        min_size=1,
        max_size=5,
    )
)
def test_a_cached_compile_is_the_compile_from_scratch_whatever_changes(tmp_path_factory, edits):
    """Providers' and policies' messages are kept per model between compiles
    (`ModelCache.provider`, `ModelCache.built_policy`): after any sequence of edits the config
    is the one a compile from scratch gives (a backend's health, place and fields reach the
    policies that name it), and a change to the config one compile returned never reaches the
    next."""
    from signalbox.local import CompileCache, compile_files
    from tests.factories import backend, dump, model, policy, provider

    folder = tmp_path_factory.mktemp("fleet")
    for name in "abc":
        (folder / f"{name}.yaml").write_text(dump(provider(name, "http://127.0.0.1:9/v1", [model("m"), model("m1")])))
    chain = [backend("a", "m"), backend("b", "m", priority=1), backend("c", "m", priority=2)]
    mirrored = policy("q", ["y"], [backend("c", "m")])
    mirrored["spec"]["mirror"] = {"provider": "b", "model": "m", "percent": 10}
    (folder / "mirrored.yaml").write_text(dump(mirrored))
    cache = CompileCache()
    for name, second, healthy, url, strategy in edits:
        resource = provider(name, url, [model("m"), model(second)])
        resource["status"] = {"health": {"healthy": healthy}}
        (folder / f"{name}.yaml").write_text(dump(resource))
        (folder / "policy.yaml").write_text(dump(policy("p", ["x"], chain, strategy=strategy)))
        cached = compile_files([folder], cache=cache).config
        fresh = compile_files([folder]).config
        assert cached is not None and fresh is not None
        assert cached.SerializeToString(deterministic=True) == fresh.SerializeToString(deterministic=True)
        cached.backends[0].healthy = not cached.backends[0].healthy
        cached.providers[0].host = "changed.example"
        cached.policies[0].backends[0].target = "changed"
    assert compile_files([folder], cache=cache).config.content_hash == fresh.content_hash


def _policy_doc(name: str, namespace: str | None = None) -> str:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return yaml.safe_dump({"apiVersion": API_VERSION, "kind": "RoutingPolicy", "metadata": meta, "spec": {}})


def test_an_object_defined_in_two_files_is_one_problem_naming_both(tmp_path):
    """Two objects of one kind, namespace and name are one object in a cluster (the second
    apply replaces the first): locally they are refused, saying where each is."""
    (tmp_path / "a.yaml").write_text(_policy_doc("auto"))
    (tmp_path / "b.yaml").write_text(_policy_doc("other") + "---\n" + _policy_doc("auto", "default"))
    with pytest.raises(ConfigError) as err:
        loader.load([tmp_path])
    (problem,) = err.value.problems
    assert (problem.kind, problem.namespace, problem.name) == ("RoutingPolicy", "default", "auto")
    assert "a.yaml (document 1)" in problem.message and "b.yaml (document 2)" in problem.message


def test_the_same_name_in_another_namespace_or_a_file_named_twice_is_no_duplicate(tmp_path):
    (tmp_path / "a.yaml").write_text(_policy_doc("auto") + "---\n" + _policy_doc("auto", "team-b"))
    docs = loader.load([tmp_path, tmp_path / "a.yaml", str(tmp_path / "a.yaml")])
    assert [(d["metadata"]["name"], d["metadata"].get("namespace")) for d in docs.policies] == [
        ("auto", None),
        ("auto", "team-b"),
    ]
