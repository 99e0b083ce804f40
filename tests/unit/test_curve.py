"""The cost-quality curve's figures (signalbox.curve): envelope, AUC, savings, bootstrap CIs."""

from __future__ import annotations

import numpy as np
import pytest

from signalbox.curve import Points, envelope, figures, summarize


def test_the_envelope_is_the_upper_concave_hull_and_never_falls_with_cost():
    xs = np.array([0.1, 0.5, 0.4, 1.0, 1.2])
    ys = np.array([0.5, 0.6, 0.95, 1.0, 0.9])
    hx, hy = envelope(xs, ys)
    assert list(hx) == [0.1, 0.4, 1.0, 1.2]  # (0.5, 0.6) lies under the chord; mixtures beat it
    assert list(hy) == [0.5, 0.95, 1.0, 1.0]  # dearer and worse: the cheaper point stays available


def test_savings_and_auc_of_known_curves():
    # Cheapest at 0.1 cost scoring 0.5; a router reaching the best score at half its cost.
    xs, ys = np.array([0.1, 1.0, 0.5]), np.array([0.5, 1.0, 1.0])
    out = figures(xs, ys, x_min=0.1)
    assert out["saving_at_100"] == pytest.approx(0.5)
    assert out["saving_at_95"] == pytest.approx(1 - (0.1 + 0.45 * 0.4 / 0.5))  # on the segment into (0.5, 1)
    assert 0.85 < out["auc"] < 0.9
    # Only the two anchors: the saving at 100% is none, at 95% the mixture of both.
    plain = figures(np.array([0.1, 1.0]), np.array([0.5, 1.0]), x_min=0.1)
    assert plain["saving_at_100"] == pytest.approx(0.0) and plain["saving_at_95"] == pytest.approx(0.09)
    never = figures(np.array([0.1, 1.0]), np.array([0.5, 0.9]), x_min=0.1)
    assert never["saving_at_100"] is None


def test_summary_reports_each_router_with_bootstrap_intervals_around_its_value():
    rng = np.random.default_rng(3)
    n = 400
    strong = rng.uniform(0.6, 1.0, n)
    cheap_scores = np.where(rng.uniform(size=n) < 0.5, strong, 0.0)  # right half the time
    baselines = {
        "best_single": Points(list(strong), [1.0] * n),
        "cheapest": Points(list(cheap_scores), [0.1] * n),
        "random": Points(list(np.where(rng.uniform(size=n) < 0.5, strong, cheap_scores)), [0.55] * n),
        "oracle": Points(list(strong), [0.1 if c else 1.0 for c in cheap_scores]),
    }
    router = [0.1 if c else 1.0 for c in cheap_scores]  # knows when the cheap model suffices
    report = summarize(baselines, {0.0: Points(list(strong), router)}, seed=1)
    curve = report["curve"]
    assert set(curve) == {"signalbox", "random", "oracle"}
    saving = curve["signalbox"]["saving_at_100"]
    low, high = saving["ci95"]
    assert low <= saving["value"] <= high and high - low < 0.2
    assert saving["value"] == pytest.approx(1 - np.mean(router), abs=1e-9)
    assert curve["signalbox"]["auc"]["value"] > curve["random"]["auc"]["value"]
    assert report["prompts"] == n and report["bootstrap"]["resamples"] == 1000
    assert summarize(baselines, {0.0: Points(list(strong), router)}, seed=1)["curve"] == curve  # reproducible
