"""Offline probe (issue 16): would another per-prompt estimator save more strong-model calls on
the single-domain pairs than the neighbours Signalbox ships? Not part of `make eval`; its figures
are in eval/README.md ("Other estimators, measured offline").

Each estimator orders a pair's held-out prompts by how much the strong model is expected to add
over the weak one; the strong model takes the top share, swept from none to all, and the saving
at 95 % of the strong model's score is read off that curve with `signalbox.curve.figures` (no
bootstrap: the same orderings for every estimator, 5 folds over 4 seeds, means). It is a
harness of its own, not `eval-routing` (which routes through `decide()`), so its figures compare
estimators with each other, not with `latest.json`.

    python -m eval.difficulty_probe --data ../shared/data
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from signalbox.curve import figures
from signalbox.extproc.semantic import default_embedder

from .convert import PAIRS, benchmark_records

FOLDS = 5
SEEDS = 4
K = 16  # as extproc/neighbours.py
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def surface(prompt: str) -> list[float]:
    """What an embedding of averaged word vectors does not carry: length, numbers, notation."""
    numbers = _NUMBER.findall(prompt)
    return [
        float(np.log1p(len(prompt))),
        float(np.log1p(len(prompt.split()))),
        float(np.log1p(len(numbers))),
        float("$" in prompt),
        100 * prompt.count("\\") / (1 + len(prompt)),
        float(np.log1p(prompt.count("\n"))),
        len(set(numbers)) / (1 + len(numbers)),
        float(np.log1p(sum(len(n) for n in numbers))),
    ]


def saving_at_95(gain: np.ndarray, strong: np.ndarray, weak: np.ndarray) -> float:
    """The share of strong-model calls saved at 95 % of its score, sending the prompts with the
    largest expected `gain` to it."""
    order = np.argsort(-gain)
    xs, ys = [], []
    for share in np.linspace(0, 1, 41):
        to_strong = np.zeros(len(gain), dtype=bool)
        to_strong[order[: round(share * len(gain))]] = True
        xs.append(to_strong.mean())
        ys.append(np.where(to_strong, strong, weak).mean() / strong.mean())
    return float(figures(np.array(xs), np.array(ys), 0.0)["saving_at_95"] or 0.0)


# (embeddings of the training prompts, of the held-out ones, their features likewise, the
# strong and the weak model's training scores, every model's mean training score) -> the
# expected gain of the strong model on each held-out prompt
Estimator = Callable[..., np.ndarray]


def _neighbours(e_tr, e_te, x_tr, x_te, s, w, everyone):
    nearest = np.argsort(-(e_te @ e_tr.T), axis=1)[:, :K]
    return (s[nearest] - w[nearest]).mean(axis=1)


def _ridge_gap(e_tr, e_te, x_tr, x_te, s, w, everyone):
    from sklearn.linear_model import Ridge

    return Ridge(alpha=3.0).fit(x_tr, s - w).predict(x_te)


def _logistic(e_tr, e_te, x_tr, x_te, s, w, everyone):
    from sklearn.linear_model import LogisticRegression

    def p(y):
        if len(set(y >= 0.5)) < 2:
            return np.full(len(x_te), float(y.mean()))
        return LogisticRegression(C=1.0, max_iter=3000).fit(x_tr, y >= 0.5).predict_proba(x_te)[:, 1]

    return p(s) - p(w)


def _blend(*args):
    return 0.5 * _neighbours(*args) + 0.5 * _logistic(*args)


def _hardness(e_tr, e_te, x_tr, x_te, s, w, everyone):
    """How hard a prompt is for every model (the mean of all nine's scores: less noisy than
    one model's 0 or 1), hardest first."""
    from sklearn.linear_model import Ridge

    return -Ridge(alpha=3.0).fit(x_tr, everyone).predict(x_te)


ESTIMATORS: dict[str, Estimator] = {
    "neighbours k=16 (embedding)": _neighbours,
    "ridge on the gap (embedding + surface)": _ridge_gap,
    "logistic per model (embedding + surface)": _logistic,
    "half neighbours + half logistic": _blend,
    "hardness for all nine models (ridge)": _hardness,
}


def probe(data: Path) -> dict[str, dict[str, float]]:
    source = data / "routing" / "llmrouter_dcrouter"
    embed = default_embedder()
    out: dict[str, dict[str, float]] = {}
    for task, strong_model, weak_model in PAIRS:
        rows = benchmark_records(source, task)
        prompts = [r["question"] for r in rows]
        strong = np.array([r["scores"][strong_model] for r in rows], dtype=float)
        weak = np.array([r["scores"][weak_model] for r in rows], dtype=float)
        everyone = np.array([np.mean(list(r["scores"].values())) for r in rows], dtype=float)
        emb = np.asarray(embed(prompts))
        surf = np.array([surface(p) for p in prompts])
        features = np.hstack([emb, (surf - surf.mean(0)) / (surf.std(0) + 1e-9)])
        savings: dict[str, list[float]] = {name: [] for name in ESTIMATORS}
        for seed in range(SEEDS):
            fold = np.random.default_rng(seed).integers(0, FOLDS, len(prompts))
            gains = {name: np.zeros(len(prompts)) for name in ESTIMATORS}
            for k in range(FOLDS):
                tr, te = fold != k, fold == k
                args = (emb[tr], emb[te], features[tr], features[te], strong[tr], weak[tr], everyone[tr])
                for name, estimate in ESTIMATORS.items():
                    gains[name][te] = estimate(*args)
            for name, gain in gains.items():
                savings[name].append(saving_at_95(gain, strong, weak))
        out[task] = {name: round(float(np.mean(v)), 3) for name, v in savings.items()}
    out["mean of the pairs"] = {
        name: round(float(np.mean([out[task][name] for task, _, _ in PAIRS])), 3) for name in ESTIMATORS
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    args = parser.parse_args(argv)
    for task, figures_ in probe(args.data).items():
        print(f"{task}: " + "; ".join(f"{name} {value:.3f}" for name, value in figures_.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
