"""The cost-quality curve of a router, and how sure we are of it (`eval-routing`, issue 16).

Every router is judged on the same held-out prompts, each with the score and cost of the model
it picked. Cost and score are normalised by the best single model's (x = cost ÷ its cost,
y = score ÷ its score). A router's *curve* is the best score reachable at each cost with its
operating points, the always-cheapest and always-best-single points, and random mixtures of
them (choosing between two operating points per request at random reaches every point of the
segment between them): the upper concave envelope, non-decreasing in cost. From it:

- `auc`: the mean height of the curve over x from the cheapest model's cost to the best single
  model's (1.0: as good as the best single model at every budget; higher is better);
- `saving_at_95` / `saving_at_100`: 1 - the lowest x at which the curve reaches 95 % / 100 % of
  the best single model's score (None: it never does).

Confidence intervals (95 %) come from a bootstrap over prompts: resample the held-out prompts
with replacement, recompute every figure, take the 2.5th and 97.5th percentiles. The same for
random routing (its one operating point) and the oracle (the best model per prompt, cheapest
among ties).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

BOOTSTRAP = 1000
GRID = 201


@dataclass
class Points:
    """One operating point's per-prompt scores and costs (held-out prompts, in one order)."""

    scores: list[float]
    costs: list[float]


def envelope(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The upper concave hull of the points, made non-decreasing (more budget never hurts: the
    cheaper point stays available)."""
    order = np.lexsort((-ys, xs))
    hull: list[tuple[float, float]] = []
    for x, y in zip(xs[order], ys[order], strict=True):
        if hull and x == hull[-1][0]:
            continue
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) >= 0:  # hull[-1] is not above the chord
                hull.pop()
            else:
                break
        hull.append((float(x), float(y)))
    hx, hy = np.array([h[0] for h in hull]), np.maximum.accumulate(np.array([h[1] for h in hull]))
    return hx, hy


def figures(xs: np.ndarray, ys: np.ndarray, x_min: float) -> dict[str, float | None]:
    hx, hy = envelope(xs, ys)
    grid = np.linspace(x_min, 1.0, GRID)
    heights = np.interp(grid, hx, hy, left=0.0, right=hy[-1])
    out: dict[str, float | None] = {"auc": float(heights.mean())}
    for name, target in (("saving_at_95", 0.95), ("saving_at_100", 1.0)):
        reached = np.flatnonzero(hy >= target - 1e-12)
        if len(reached) == 0:
            out[name] = None
            continue
        j = int(reached[0])
        # Where the segment into the first point at or above the target crosses it.
        x = hx[0] if j == 0 else hx[j - 1] + (target - hy[j - 1]) * (hx[j] - hx[j - 1]) / (hy[j] - hy[j - 1])
        out[name] = float(1.0 - x)
    return out


def _curves(means_s: np.ndarray, means_c: np.ndarray, index: dict[str, int], sweep: list[int]) -> dict[str, Any]:
    """Figures of each router from the mean score and cost of every operating point."""
    best, cheap = index["best_single"], index["cheapest"]
    xs, ys = means_c / means_c[best], means_s / means_s[best]
    anchors = [cheap, best]
    out = {}
    for name, own in (("signalbox", sweep), ("random", [index["random"]]), ("oracle", [index["oracle"]])):
        chosen = anchors + own
        out[name] = figures(xs[chosen], ys[chosen], float(xs[cheap]))
    return out


def summarize(baselines: dict[str, Points], sweep: dict[float, Points], seed: int = 0) -> dict[str, Any]:
    names = list(baselines)
    tolerances = list(sweep)
    rows = [baselines[n] for n in names] + [sweep[t] for t in tolerances]
    scores = np.array([r.scores for r in rows], dtype=np.float64)
    costs = np.array([r.costs for r in rows], dtype=np.float64)
    index = {n: i for i, n in enumerate(names)}
    sweep_rows = list(range(len(names), len(rows)))
    means_s, means_c = scores.mean(axis=1), costs.mean(axis=1)
    best = index["best_single"]
    report: dict[str, Any] = {
        "prompts": int(scores.shape[1]),
        "baselines": {n: {"score": float(means_s[i]), "cost": float(means_c[i])} for n, i in index.items()},
        "sweep": [
            {
                "tolerance": t,
                "score": float(means_s[i]),
                "cost": float(means_c[i]),
                "score_ratio": float(means_s[i] / means_s[best]),
                "cost_saving": float(1 - means_c[i] / means_c[best]),
            }
            for t, i in zip(tolerances, sweep_rows, strict=True)
        ],
    }
    point = _curves(means_s, means_c, index, sweep_rows)
    rng = np.random.default_rng(seed)
    samples: dict[str, dict[str, list[float]]] = {r: {k: [] for k in point[r]} for r in point}
    n = scores.shape[1]
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, n, n)
        drawn = _curves(scores[:, pick].mean(axis=1), costs[:, pick].mean(axis=1), index, sweep_rows)
        for router, values in drawn.items():
            for key, value in values.items():
                # A resample where the curve never reaches the target counts as no saving.
                samples[router][key].append(0.0 if value is None else value)
    report["curve"] = {
        router: {
            key: {
                "value": value,
                "ci95": [
                    float(np.percentile(samples[router][key], 2.5)),
                    float(np.percentile(samples[router][key], 97.5)),
                ],
            }
            for key, value in values.items()
        }
        for router, values in point.items()
    }
    # The sweep point these figures came from (kept for the README's headline and older readers).
    eligible = [p for p in report["sweep"] if p["score_ratio"] >= 0.95]
    chosen = max(eligible, key=lambda p: p["cost_saving"]) if eligible else None
    report["cost_saving_at_95"] = chosen["cost_saving"] if chosen else None
    report["score_ratio"] = chosen["score_ratio"] if chosen else None
    report["tolerance_at_95"] = chosen["tolerance"] if chosen else None
    report["bootstrap"] = {"resamples": BOOTSTRAP, "seed": seed, "over": "held-out prompts"}
    return report
