"""A new config builds only what changed; what it takes from the table in force is still right.

`RuntimeTable.from_config(reuse=...)` keeps each provider, backend and policy whose message, key
and named backends are unchanged. Each test here is a way a kept object could go stale: a key
rotated or gone under an unchanged config, backends moved to other indices under an unchanged
policy.
"""

from __future__ import annotations

from signalbox.api.v1alpha1 import config_pb2 as pb
from signalbox.extproc.runtime import RuntimeTable
from tests.unit.test_table_memory import compiled, keys, policies, providers


def test_a_change_to_one_policy_builds_that_policy_and_keeps_the_rest():
    before = RuntimeTable.from_config(compiled(providers(), policies()), keys("k"))
    after = RuntimeTable.from_config(compiled(providers(), policies(weight_of_p1=3)), keys("k"), reuse=before)

    assert [c.weight for c in after.by_id["default/p1"].choices] == [3, 1]
    assert after.by_id["default/p1"] is not before.by_id["default/p1"]
    assert after.by_id["default/p2"] is before.by_id["default/p2"]
    assert after.by_id["default/p3"] is before.by_id["default/p3"]
    assert all(after.backends[i] is before.backends[i] for i in before.backends)
    # The kept policy's choices are the very backends of the new table.
    assert all(c.backend is after.backends[c.backend.id] for c in after.by_id["default/p2"].choices)


def test_a_rotated_key_under_an_unchanged_config_is_sent_at_once():
    cfg = compiled(providers(), policies())
    before = RuntimeTable.from_config(cfg, keys("old-key"))
    after = RuntimeTable.from_config(cfg, keys("new-key"), reuse=before)

    for table, key in ((before, "old-key"), (after, "new-key")):
        for pol in table.policies:
            for choice in pol.choices:
                if choice.backend.provider.name == "a":
                    assert choice.backend.provider.auth_value is not None
                    assert choice.backend.provider.auth_value.reveal() == f"Bearer {key}"
    # The provider without a key is unchanged, and so are its backends.
    b_before = [b for b in before.backends.values() if b.provider.name == "b"]
    assert all(after.backends[b.id] is b for b in b_before)


def test_a_key_that_went_missing_takes_its_backends_out_of_every_policy():
    cfg = compiled(providers(), policies())
    before = RuntimeTable.from_config(cfg, keys("k"))
    after = RuntimeTable.from_config(cfg, lambda auth: None, reuse=before)

    assert all(c.backend.provider.name == "b" for p in after.policies for c in p.choices)
    assert any(c.backend.provider.name == "a" for p in before.policies for c in p.choices)


def test_an_unchanged_policy_whose_backends_moved_names_the_backends_now_at_its_indices():
    cfg = compiled(providers(), policies())
    before = RuntimeTable.from_config(cfg, keys("k"))
    # The same messages, the backends in another order: each policy's indices now name others.
    moved = pb.RoutingConfig()
    moved.CopyFrom(cfg)
    del moved.backends[:]
    moved.backends.extend(reversed(cfg.backends))
    after = RuntimeTable.from_config(moved, keys("k"), reuse=before)

    for source, pol in zip(moved.policies, after.policies, strict=True):
        assert [b.id for b in pol.all_backends] == [moved.backends[b.backend].id for b in source.backends]
