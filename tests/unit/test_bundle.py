"""The routing config's transport (core.bundle): what fits rides inline, what does not is cut
into parts, and a reader never applies a config that is not whole and of one version."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.fleet import fleet
from signalbox.core import bundle
from signalbox.core.compiler import compile_config
from signalbox.core.errors import BundleError
from tests.factories import backend, model, policy, provider


def small(alias: str = "auto"):
    return compile_config(
        [provider("p", "http://127.0.0.1:1/v1", [model("m")])], [policy("x", [alias], [backend("p", "m")])]
    ).config


def test_a_small_config_is_inline_and_a_large_one_is_cut_into_parts_under_the_object_limit():
    packed = bundle.pack(small(), "cm")
    assert packed.inline and not packed.parts and bundle.unpack(packed.manifest, packed.inline, []) == small()

    cfg = compile_config(*fleet(200, 5, 200, 5)).config
    packed = bundle.pack(cfg, "cm", max_chars=4_000)
    assert packed.inline is None and len(packed.parts) > 2
    assert all(len(p) <= 4_000 for p in packed.parts)
    assert packed.part_names()[0].startswith("cm-" + packed.manifest["sha256"][:12])
    assert bundle.unpack(packed.manifest, None, list(packed.parts)) == cfg
    # The manifest itself stays small whatever the config's size.
    assert len(json.dumps(packed.configmap_data())) < 4_000 + 100 * len(packed.parts)


def test_a_missing_part_or_parts_of_two_versions_are_refused():
    one = compile_config(*fleet(100, 5, 100, 5)).config
    two = compile_config(*fleet(100, 5, 101, 5)).config
    a, b = bundle.pack(one, "cm", max_chars=2_000), bundle.pack(two, "cm", max_chars=2_000)
    with pytest.raises(BundleError, match="missing"):
        bundle.unpack(a.manifest, None, [*a.parts[:-1], None])
    with pytest.raises(BundleError, match="missing"):
        bundle.unpack(a.manifest, None, a.parts[:-1])
    mixed = [*a.parts[:1], *b.parts[1 : len(a.parts)]]
    with pytest.raises(BundleError):
        bundle.unpack(a.manifest, None, mixed)
    inline = bundle.pack(small(), "cm")
    with pytest.raises(BundleError, match="digest"):
        bundle.unpack(bundle.pack(small("other"), "cm").manifest, inline.inline, [])


def test_unreadable_manifests_and_payloads_are_refused():
    packed = bundle.pack(small(), "cm")
    with pytest.raises(BundleError, match="no routing config manifest"):
        bundle.read_manifest({})
    with pytest.raises(BundleError, match="not JSON"):
        bundle.read_manifest({bundle.MANIFEST_KEY: "{"})
    with pytest.raises(BundleError, match="encoding"):
        bundle.read_manifest({bundle.MANIFEST_KEY: json.dumps({**packed.manifest, "encoding": "json"})})
    with pytest.raises(BundleError, match="base64"):
        bundle.unpack(packed.manifest, "%%%%", [])
    with pytest.raises(BundleError, match="no inline"):
        bundle.unpack(packed.manifest, None, [])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    fields=st.dictionaries(st.sampled_from(["parts", "sha256", "bytes", "encoding", "generation"]), json_values),
    inline=st.none() | st.text(max_size=40),
    parts=st.lists(st.none() | st.text(max_size=20), max_size=4),
)
def test_whatever_a_configmap_holds_the_reader_gets_a_config_or_a_bundle_error(fields, inline, parts):
    """A ConfigMap someone edited by hand, or truncated, must never break config-sync: it keeps
    the config in force (it catches BundleError only)."""
    good = bundle.pack(small(), "cm")
    data = {bundle.MANIFEST_KEY: json.dumps({**good.manifest, **fields})}
    try:
        manifest = bundle.read_manifest(data)
        bundle.unpack(manifest, inline, parts)
    except BundleError:
        pass
