"""Envoy's outlier ejections made visible (issue 13): its event log read incrementally, each
enforced ejection of a backend a rest with reason `ejected` until Envoy puts it back."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from signalbox.core.compiler import compile_config
from signalbox.extproc import outliers
from signalbox.extproc.cooldown import EJECTED, Cooldowns
from signalbox.extproc.metrics import Metrics
from signalbox.extproc.reload import TableHolder
from tests.factories import backend, model, policy, provider

NOW = 1_800_000_000.0


def holder() -> TableHolder:
    result = compile_config(
        [
            provider("a", "http://127.0.0.1:9001/v1", [model("m")]),
            provider("b", "http://127.0.0.1:9002/v1", [model("m")]),
        ],
        [policy("p", ["auto"], [backend("a", "m"), backend("b", "m", priority=1)], strategy="failover")],
    )
    assert result.ok
    tables = TableHolder()
    tables.install(result.config)
    return tables


def event(cluster: str, action: str = "EJECT", at: float = NOW, n: int = 1, enforced: bool = True) -> bytes:
    stamp = datetime.fromtimestamp(at, UTC).isoformat()
    return json.dumps(
        {
            "type": "CONSECUTIVE_5XX",
            "cluster_name": cluster,
            "upstream_url": "127.0.0.1:9001",
            "action": action,
            "num_ejections": n,
            "enforced": enforced,
            "timestamp": stamp.replace("+00:00", "Z"),
            "eject_consecutive_event": {},
        }
    ).encode()


def test_an_ejection_rests_the_backend_until_envoy_puts_it_back(tmp_path):
    tables, cooldowns, metrics = holder(), Cooldowns(), Metrics()
    log = tmp_path / "outlier-events.log"
    reader = outliers.OutlierEvents(log, tables, cooldowns, metrics)
    assert reader.read_new(NOW) == 0  # no file until Envoy's first event
    cluster = tables.current.backends["default/a/m"].cluster
    line = event(cluster, n=2)
    # Envoy's own cluster and a half-written line are not read yet.
    log.write_bytes(event("signalbox_extproc") + b"\n" + line[:20])
    assert reader.read_new(NOW) == 0
    with log.open("ab") as f:
        f.write(line[20:] + b"\n")
    assert reader.read_new(NOW + 1) == 1
    assert cooldowns.active(NOW + 1) == {"default/a/m": (NOW + 30, EJECTED)}  # second ejection: 2 x 15 s
    assert metrics.registry.get_sample_value(
        "signalbox_backend_cooldowns_total", {"provider": "a", "model": "m", "reason": EJECTED}
    )
    with log.open("ab") as f:
        f.write(event(cluster, "UNEJECT", at=NOW + 30) + b"\n")
    assert reader.read_new(NOW + 30) == 1
    assert cooldowns.active(NOW + 30.5) == {}


def test_a_restarted_reader_rebuilds_running_ejections_and_skips_ended_or_unenforced_ones(tmp_path):
    tables, cooldowns = holder(), Cooldowns()
    a, b = (tables.current.backends[f"default/{x}/m"].cluster for x in "ab")
    log = tmp_path / "outlier-events.log"
    log.write_bytes(
        b"\n".join([event(a, at=NOW - 100), event(b, at=NOW - 5), event(a, at=NOW - 1, enforced=False), b""])
    )
    reader = outliers.OutlierEvents(log, tables, cooldowns, Metrics())
    assert reader.read_new(NOW) == 1
    assert cooldowns.active(NOW) == {"default/b/m": (NOW + 10, EJECTED)}


def test_an_ejection_never_lasts_longer_than_envoys_maximum():
    assert outliers.ejection_seconds(1) == 15 and outliers.ejection_seconds(1000) == 300


@given(st.binary(max_size=400))
def test_any_line_is_an_event_or_nothing(line):
    parsed = outliers.parse(line)
    assert parsed is None or parsed.cluster_name


def test_a_backend_that_keeps_failing_rests_longer_each_time_though_envoy_counts_from_one(tmp_path):
    # The rest sends the backend's cluster again, Envoy builds it anew and its detector forgets:
    # every ejection it logs says num_ejections 1 (seen in the fault tests). The reader counts.
    tables, cooldowns = holder(), Cooldowns()
    cluster = tables.current.backends["default/a/m"].cluster
    log = tmp_path / "outlier-events.log"
    reader = outliers.OutlierEvents(log, tables, cooldowns, Metrics())
    rests, at = [], NOW
    for _ in range(4):  # ejected again as soon as each rest ends
        with log.open("ab") as f:
            f.write(event(cluster, at=at, n=1) + b"\n")
        assert reader.read_new(at) == 1
        until, _reason = cooldowns.active(at)["default/a/m"]
        rests.append(until - at)
        at = until
    assert rests == [15, 30, 45, 60]
    # Back in service for eight detection intervals (40 s) takes eight off: the next is the first again.
    at += 8 * 5
    with log.open("ab") as f:
        f.write(event(cluster, at=at, n=1) + b"\n")
    assert reader.read_new(at) == 1
    assert cooldowns.active(at)["default/a/m"][0] - at == 15
    # An Envoy that did keep count is believed when it counts more.
    assert reader.count("default/b/m", said=3, when=at) == 3
