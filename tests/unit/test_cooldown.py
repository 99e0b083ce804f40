"""Cooldowns: what a provider's answer says about when to come back, read defensively."""

from __future__ import annotations

import random
import time
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signalbox.extproc.cooldown import (
    BACKOFF_MAX_S,
    KEY_REJECTED_S,
    MAX_COOLDOWN_S,
    Cooldowns,
    cooldown_for,
    reset_in,
    retry_after,
)
from signalbox.extproc.strategies import SelectionState, select
from tests.factories import backend

from .test_strategies import ALL, ctx, table

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    "headers,seconds",
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": " 2.5 "}, 2.5),
        ({"retry-after": formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"retry-after": formatdate(NOW - 30, usegmt=True)}, 0.0),  # a date already past: now
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the finer one wins
        ({"retry-after": "86400"}, MAX_COOLDOWN_S),  # "tomorrow" is clamped
        ({"retry-after": "-3"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "nan"}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_seconds_dates_and_milliseconds(headers, seconds):
    assert retry_after(headers, NOW) == seconds


@pytest.mark.parametrize(
    "value,seconds",
    [
        ("1s", 1.0),
        ("6m0s", MAX_COOLDOWN_S),
        ("4m0s", 240.0),
        ("20ms", 0.02),
        ("1h2m3.5s", MAX_COOLDOWN_S),
        ("2m", 120.0),
        ("3", 3.0),
    ],
)
def test_rate_limit_resets_read_openai_durations(value, seconds):
    assert reset_in(value, NOW) == pytest.approx(seconds)


def test_rate_limit_resets_read_anthropic_timestamps():
    assert reset_in("2027-01-15T08:00:05Z", 1_800_000_000.0) is not None
    assert reset_in("2027-01-15T08:00:05Z", time.time() + 10**9) == 0.0  # already reset
    assert reset_in("later", NOW) is None and reset_in("", NOW) is None


def test_what_each_answer_means_for_its_backend():
    rng = random.Random(3)
    assert cooldown_for(429, {"retry-after": "4"}, NOW).seconds == 4.0
    first = cooldown_for(429, {}, NOW, streak=0, rng=rng)
    assert first.reason == "rate_limited" and 0.5 <= first.seconds <= 1.0  # jittered backoff
    assert 0.5 * BACKOFF_MAX_S <= cooldown_for(429, {}, NOW, streak=30, rng=rng).seconds <= BACKOFF_MAX_S
    assert cooldown_for(401, {}, NOW).seconds == KEY_REJECTED_S
    assert cooldown_for(403, {}, NOW).reason == "key_rejected"
    assert cooldown_for(503, {"retry-after": "2"}, NOW).reason == "unavailable"
    assert cooldown_for(503, {}, NOW) is None  # a plain 5xx is Envoy's outlier detection's to judge
    assert cooldown_for(500, {"retry-after": "2"}, NOW) is None
    low = cooldown_for(200, {"x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "3s"}, NOW)
    assert (low.seconds, low.reason) == (3.0, "low_remaining")
    assert cooldown_for(200, {"anthropic-ratelimit-tokens-remaining": "20"}, NOW).seconds == 1.0  # no reset named
    assert cooldown_for(200, {"x-ratelimit-remaining-requests": "40"}, NOW) is None
    assert cooldown_for(200, {}, NOW) is None


@settings(max_examples=500, deadline=None)
@given(
    status=st.integers(0, 999),
    headers=st.dictionaries(
        st.sampled_from(
            [
                "retry-after",
                "retry-after-ms",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
                "anthropic-ratelimit-tokens-remaining",
                "anthropic-ratelimit-tokens-reset",
            ]
        ),
        st.text(max_size=40),
    ),
    streak=st.integers(0, 10**6),
)
def test_any_provider_answer_gives_a_bounded_cooldown_or_none(status, headers, streak):
    """Provider headers are untrusted: nothing they say raises or rests a backend for long."""
    rest = cooldown_for(status, headers, NOW, streak, random.Random(0))
    assert rest is None or 0 <= rest.seconds <= MAX_COOLDOWN_S


def test_the_store_is_shared_keeps_the_longer_rest_and_counts_429s_in_a_row(tmp_path):
    one, two = Cooldowns(tmp_path / "c.db", random.Random(1)), Cooldowns(tmp_path / "c.db", random.Random(2))
    assert one.observe("a", 429, {"retry-after": "10"}, NOW).seconds == 10
    assert two.active(NOW) == {"a": (NOW + 10, "rate_limited")}  # another worker sees it
    assert one.observe("a", 429, {"retry-after": "2"}, NOW + 1) is None  # already resting longer
    assert two.active(NOW + 11) == {}  # over
    # 429s without Retry-After in a row back off further each time.
    rests = [one.observe("b", 429, {}, NOW + 100 + i * 0.01).seconds for i in range(6)]
    assert rests[-1] > 4 * max(rests[:2])
    assert one.observe("c", 200, {}, NOW) is None and "c" not in one.active(NOW)


def test_a_cooling_backend_is_not_a_first_choice_unless_every_one_is(tmp_path):
    t = table("failover", [backend("cheap", "mini", priority=0), *ALL[1:]])
    state = SelectionState(rng=random.Random(1), cooldowns=Cooldowns(tmp_path / "c.db"))
    now = time.time()
    assert select(t.policies[0], ctx(), state).choice.backend.id == "default/cheap/mini"
    state.cooldowns.observe("default/cheap/mini", 429, {"retry-after": "30"}, now)
    explained = select(t.policies[0], ctx(), state, explain=True)
    assert explained.choice.backend.id == "default/mid/med"
    assert any(
        b == "default/cheap/mini" and not ok and "cooling down (rate_limited)" in why
        for b, ok, why in explained.candidates
    )
    for b in ("default/mid/med", "default/top/max"):
        state.cooldowns.observe(b, 401, {}, now)
    # All resting: still the policy's own choice rather than a refusal (Envoy fails over from it).
    assert select(t.policies[0], ctx(), state).choice.backend.id == "default/cheap/mini"
