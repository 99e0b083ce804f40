"""What a worker's table holds: no part of the config message, one embedder for all policies."""

from __future__ import annotations

import gc
from pathlib import Path

from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.core.compiler import compile_config
from signalbox.core.secrets import SecretValue
from signalbox.extproc import reload
from signalbox.extproc.memtrim import release_free_memory
from signalbox.extproc.runtime import RuntimeTable
from signalbox.extproc.semantic import shared_embedder
from tests.factories import backend, model, policy, provider

ROUTES = [
    {"name": "code", "threshold": 0.2, "taskType": "code", "utterances": ["write a function", "fix this bug"]},
    {"name": "chat", "threshold": 0.2, "taskType": "chat", "utterances": ["hello there", "how are you"]},
]


def providers() -> list[dict]:
    return [
        provider("a", "http://127.0.0.1:1/v1", [model("m1"), model("m2")], auth={"env": "A_KEY"}),
        provider("b", "http://127.0.0.1:2/v1", [model("m1")]),
    ]


def policies(weight_of_p1: int = 1) -> list[dict]:
    return [
        policy("p1", ["one"], [backend("a", "m1", weight=weight_of_p1), backend("b", "m1", weight=1)]),
        policy("p2", ["two"], [backend("a", "m2"), backend("b", "m1")], strategy="failover"),
        policy(
            "p3",
            ["three"],
            [backend("a", "m1"), backend("b", "m1")],
            strategy="cost",
            classification={"semantic": {"routes": ROUTES, "defaultRoute": "chat"}},
            rollout={"candidate": "p2"},
        ),
    ]


def compiled(provs: list[dict], pols: list[dict]) -> pb.RoutingConfig:
    result = compile_config(provs, pols)
    assert result.ok, result.problems
    assert result.config is not None
    return result.config


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def keys(value: str):
    return lambda auth: SecretValue(value) if auth.env == "A_KEY" else None


def test_a_table_keeps_none_of_its_config_message_in_memory():
    # A part of a parsed config (a policy's rollout, its semantic routes) keeps all of it in
    # memory (upb's arena: 7 MB at the 2,000-provider fleet), and a kept policy outlives the
    # config it was built from. Here the config carries 32 MB the table never reads (an
    # unknown field), which the config's arena holds until nothing holds any part of it.
    padding = 32 * 1024 * 1024
    unknown = bytes([0xBA, 0x3E]) + _varint(padding) + b"x" * padding  # field 999, length-delimited
    cfg = pb.RoutingConfig.FromString(compiled(providers(), policies()).SerializeToString() + unknown)
    del unknown
    table = RuntimeTable.from_config(cfg, keys("k"))
    gc.collect()
    release_free_memory()
    before = _rss_mb()
    del cfg
    gc.collect()
    release_free_memory()
    freed = before - _rss_mb()
    assert table.by_id["default/p3"].rollout is not None and table.by_id["default/p3"].semantic is not None
    assert freed > 24, f"dropping the config freed {freed:.0f} MB of its 32"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_policies_with_routes_of_their_own_share_the_processs_embedder():
    # Each embedder loads wordllama's tokenizer (about 10 MB and 60 ms): twelve classified
    # policies made a worker 125 MB larger.
    many = [
        policy(
            f"c{i}",
            [f"c{i}"],
            [backend("b", "m1")],
            strategy="cost",
            classification={"semantic": {"routes": ROUTES}},
        )
        for i in range(12)
    ]
    table = RuntimeTable.from_config(compiled(providers(), many), keys("k"))
    assert {id(p.semantic.embed) for p in table.policies if p.semantic} == {id(shared_embedder())}


def test_twelve_classified_policies_cost_a_worker_little_memory():
    def classified(count: int) -> pb.RoutingConfig:
        pols = [
            policy(f"c{i}", [f"c{i}"], [backend("b", "m1")], classification={"semantic": {"routes": ROUTES}})
            for i in range(count)
        ]
        return compiled(providers(), pols)

    RuntimeTable.from_config(classified(1), keys("k"))  # the one embedder is loaded
    cfg = classified(12)
    before = _rss_mb()
    table = RuntimeTable.from_config(cfg, keys("k"))
    grown = _rss_mb() - before
    assert len(table.policies) == 12
    # An embedder per policy grew it by about 125 MB.
    assert grown < 20, f"twelve classified policies took {grown:.0f} MB"


def test_values_many_backends_and_policies_repeat_are_one_object_each():
    # Every read of a message field is a new object: at the 2,000-provider fleet one per backend
    # for its model name, prices, quality and context window, and a minimum-quality dict per
    # policy, were 2.6 MB of every worker, for a handful of distinct values.
    provs = [
        provider(
            n, f"http://127.0.0.1:{i + 1}/v1", [model("m1", inputPricePer1M=0.5, outputPricePer1M=1.5, quality=0.7)]
        )
        for i, n in enumerate("abc")
    ]
    pols = [policy(f"p{i}", [f"alias{i}"], [backend(n, "m1") for n in "abc"], strategy="cost") for i in range(3)]
    table = RuntimeTable.from_config(compiled(provs, pols), keys("k"))
    backends = list(table.backends.values())
    for name in ("model", "upstream_model", "input_price", "output_price", "quality", "context_window"):
        assert len({id(getattr(b, name)) for b in backends}) == 1, name
    assert len({id(p.min_quality) for p in table.policies}) == 1
    assert len({id(p.classifier_key) for p in table.policies}) == 1
    shared = table.policies[0].min_quality
    assert dict(shared) == dict(compiled(provs, pols).policies[0].min_quality)
    try:
        shared["simple"] = 1.0  # type: ignore[index]
    except TypeError:
        pass
    else:
        raise AssertionError("a mapping every policy shares must be read-only")
    # Values of other types that compare equal keep their own type.
    assert type(backends[0].context_window) is int and type(backends[0].quality) is float
    # The endpoint Envoy is given is made from the provider's address when asked for.
    endpoint = backends[1].endpoint
    assert (endpoint.cluster, endpoint.backend, endpoint.port) == (backends[1].cluster, backends[1].id, 2)


def _configs_alive() -> int:
    return sum(isinstance(o, pb.RoutingConfig) for o in gc.get_objects())


async def test_a_reload_lets_its_parsed_config_go_before_giving_the_memory_back(tmp_path, monkeypatch):
    # A reload gives back what its build freed (memtrim); the parsed config was still referenced
    # then (returned from the build's thread), so its upb arena (about 5 MB at the 2,000-provider
    # fleet) was freed after, and stayed in glibc's heap after every change.
    path = tmp_path / "config.pb"
    path.write_bytes(compiled(providers(), policies()).SerializeToString())
    gc.collect()
    before = _configs_alive()
    alive_when_trimmed: list[int] = []
    monkeypatch.setattr(reload, "release_free_memory", lambda: alive_when_trimmed.append(_configs_alive()))
    holder = reload.TableHolder(resolve_key=keys("k"))
    assert await holder.load_file_async(path)
    assert holder.current.by_alias.keys() == {"one", "two", "three"}
    assert alive_when_trimmed == [before]
