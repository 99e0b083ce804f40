"""Offline routing evaluation with the live code: `signalbox eval-routing`.

Input: JSONL records `{"prompt": str, "scores": {model: 0..1}}` and a prices file
`{model: {"input": USD per 1M tokens, "output": USD per 1M tokens}}`.

For each of K folds:
1. Classes come from the training prompts: k-means over the same embeddings the semantic tier
   uses, each cluster becoming a semantic route whose utterances are its training prompts.
2. A RoutingPolicy is compiled like any other (one provider per model, strategy `cost` with
   learning on and a quality tolerance) into the same RuntimeTable the ext_proc uses.
3. Training: every training prompt is classified by the live tiers and each model's score is
   fed to `SelectionState.observe_quality`, the path live quality feedback takes.
4. Held-out prompts are routed by `decide()`, the router phase's own function; the chosen
   model's score and cost are recorded.
The tolerance is swept to trace a cost-quality curve, compared with always-best-single-model,
always-cheapest, random and the oracle.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signalbox.core.compiler import compile_config
from signalbox.extproc.classify import CHARS_PER_TOKEN
from signalbox.extproc.decide import decide
from signalbox.extproc.neighbours import Neighbours
from signalbox.extproc.runtime import RuntimeTable
from signalbox.extproc.semantic import default_embedder
from signalbox.extproc.strategies import SelectionState

OUTPUT_TOKENS = 256  # assumed answer length (datasets rarely carry it)
TOLERANCES = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 1.0)
POLICY = "eval"


@dataclass(frozen=True)
class Item:
    prompt: str
    scores: dict[str, float]


def load_items(path: str | Path) -> list[Item]:
    items = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("scores"), dict):
            raise ValueError(f"{path}:{n}: each line needs a string 'prompt' and an object 'scores'")
        items.append(Item(record["prompt"], {m: float(s) for m, s in record["scores"].items()}))
    return items


def load_prices(path: str | Path) -> dict[str, tuple[float, float]]:
    raw = json.loads(Path(path).read_text())
    return {m: (float(p["input"]), float(p["output"])) for m, p in raw.items()}


def cost(item: Item, model: str, prices: dict[str, tuple[float, float]]) -> float:
    """USD for one request: estimated prompt tokens plus an assumed answer length."""
    inp, out = prices[model]
    return (len(item.prompt) / CHARS_PER_TOKEN * inp + OUTPUT_TOKENS * out) / 1e6


def _slug(model: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in model.lower()).strip("-")


def build_resources(
    models: list[str],
    prices: dict[str, tuple[float, float]],
    routes: list[dict[str, Any]],
    tolerance: float,
    per_prompt: bool = True,
) -> tuple[list[dict], list[dict]]:
    providers = [
        {
            "apiVersion": "signalbox.io/v1alpha1",
            "kind": "AIProvider",
            "metadata": {"name": _slug(m)},
            "spec": {
                "baseUrl": f"http://{_slug(m)}.eval.invalid/v1",
                "models": [
                    {
                        "name": "m",
                        "upstreamName": m,
                        "inputPricePer1M": prices[m][0],
                        "outputPricePer1M": prices[m][1],
                        "quality": 0.5,
                        "contextWindow": 1_000_000,
                        "capabilities": ["tools", "vision", "json", "streaming"],
                    }
                ],
            },
        }
        for m in models
    ]
    policy = {
        "apiVersion": "signalbox.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": POLICY},
        "spec": {
            "match": {"models": ["auto"]},
            "strategy": "cost",
            "backends": [{"provider": _slug(m), "model": "m"} for m in models],
            "cost": {"qualityTolerance": tolerance},
            # Offline: no exploration, and the declared quality counts for a single observation.
            "learning": {"enabled": True, "explorationRate": 0.0, "priorWeight": 1, "perPrompt": per_prompt},
            "classification": {"useDefaultRules": True, "semantic": {"routes": routes, "minRulesConfidence": 1.0}},
        },
    }
    return providers, [policy]


def cluster_routes(prompts: list[str], k: int, seed: int) -> list[dict[str, Any]]:
    """k semantic routes from training prompts (k-means on the semantic tier's embeddings)."""
    from sklearn.cluster import KMeans

    vectors = default_embedder()(prompts)
    labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(vectors)
    routes = []
    for c in range(k):
        members = [p for p, label in zip(prompts, labels, strict=True) if label == c]
        if members:
            routes.append({"name": f"c{c}", "utterances": members, "threshold": -1.0})
    return routes


def _body(prompt: str) -> bytes:
    return json.dumps({"model": "auto", "messages": [{"role": "user", "content": prompt}]}).encode()


def evaluate(
    items: list[Item],
    prices: dict[str, tuple[float, float]],
    folds: int = 5,
    clusters: int = 24,
    seed: int = 0,
    tolerances: tuple[float, ...] = TOLERANCES,
    per_prompt: bool = True,
) -> dict[str, Any]:
    """`per_prompt`: learn per prompt too (neighbours), as a policy does by default."""
    models = sorted(prices)
    missing = {m for item in items for m in models if m not in item.scores}
    if missing:
        raise ValueError(f"records lack scores for priced models: {sorted(missing)[:5]}")
    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    parts = [order[i::folds] for i in range(folds)]
    per_fold: list[dict[str, Any]] = []
    for f, test_idx in enumerate(parts):
        train = [items[i] for p in parts if p is not test_idx for i in p]
        test = [items[i] for i in test_idx]
        per_fold.append(_fold(train, test, prices, models, clusters, seed + f, tolerances, per_prompt, rng, seed))
    return _summarize(per_fold, models, tolerances)


def evaluate_split(
    train: list[Item],
    test: list[Item],
    prices: dict[str, tuple[float, float]],
    clusters: int = 24,
    seed: int = 0,
    tolerances: tuple[float, ...] = TOLERANCES,
    per_prompt: bool = True,
) -> dict[str, Any]:
    """One fixed split (`eval-routing --train --test`): learn on `train`, route `test`."""
    models = sorted(prices)
    fold = _fold(train, test, prices, models, clusters, seed, tolerances, per_prompt, random.Random(seed))
    return _summarize([fold], models, tolerances)


def _fold(train, test, prices, models, clusters, cluster_seed, tolerances, per_prompt, rng, seed=0) -> dict[str, Any]:
    """Learn on `train` through the live feedback path, then route `test` with decide()."""
    from signalbox.extproc.classify import features
    from signalbox.extproc.tiers import classify_request

    routes = cluster_routes([it.prompt for it in train], clusters, cluster_seed)
    # Room for every training observation (a live policy keeps the newest CAPACITY).
    state = SelectionState(rng=random.Random(seed), neighbours=Neighbours(capacity=len(train) * len(models) + 1))
    vectors = default_embedder()([it.prompt for it in train]) if per_prompt else [None] * len(train)
    tables = {}
    for t in tolerances:
        result = compile_config(*build_resources(models, prices, routes, t, per_prompt))
        assert result.config is not None, result.problems
        tables[t] = RuntimeTable.from_config(result.config)
    policy = tables[tolerances[0]].policies[0]
    for it, vector in zip(train, vectors, strict=True):  # the live feedback path, every outcome known
        key = classify_request(policy, features({"messages": [{"role": "user", "content": it.prompt}]})).class_key
        for choice in policy.choices:
            state.observe_quality(POLICY, key, choice.backend.id, it.scores[choice.backend.upstream_model], vector)
    return _score_fold(train, test, tables, state, models, prices, rng)


def _score_fold(train, test, tables, state, models, prices, rng) -> dict[str, Any]:
    def mean_score(model: str, rows: list[Item]) -> float:
        return statistics.fmean(it.scores[model] for it in rows)

    best = max(models, key=lambda m: mean_score(m, train))
    cheapest = min(models, key=lambda m: (sum(prices[m]), -mean_score(m, train)))
    out: dict[str, Any] = {"best_single": best, "cheapest": cheapest, "baselines": {}, "sweep": {}}

    def record(name: str, picks: list[str]) -> dict[str, Any]:
        scores = [it.scores[m] for it, m in zip(test, picks, strict=True)]
        costs = [cost(it, m, prices) for it, m in zip(test, picks, strict=True)]
        # Per prompt too: the curve's confidence intervals resample prompts (curve.py).
        return {"score": statistics.fmean(scores), "cost": statistics.fmean(costs), "items": (scores, costs)}

    out["baselines"]["best_single"] = record("best", [best] * len(test))
    out["baselines"]["cheapest"] = record("cheapest", [cheapest] * len(test))
    out["baselines"]["random"] = record("random", [rng.choice(models) for _ in test])
    oracle = [
        min((m for m in models if it.scores[m] == max(it.scores.values())), key=lambda m: cost(it, m, prices))
        for it in test
    ]
    out["baselines"]["oracle"] = record("oracle", oracle)
    for t, table in tables.items():
        picks = [
            decide(table, state, "/v1/chat/completions", {}, _body(it.prompt)).selection.choice.backend.upstream_model
            for it in test
        ]
        out["sweep"][t] = record(f"t={t}", picks)
    return out


def _summarize(per_fold: list[dict[str, Any]], models: list[str], tolerances: tuple[float, ...]) -> dict[str, Any]:
    """Pool the folds' held-out prompts (each prompt is held out once), then the curve's figures
    with bootstrap confidence intervals (`curve.summarize`)."""
    from . import curve

    def pooled(getter) -> curve.Points:
        scores: list[float] = []
        costs: list[float] = []
        for f in per_fold:
            s, c = getter(f)["items"]
            scores += s
            costs += c
        return curve.Points(scores, costs)

    baselines = {name: pooled(lambda f, n=name: f["baselines"][n]) for name in per_fold[0]["baselines"]}
    sweep = {t: pooled(lambda f, t=t: f["sweep"][t]) for t in tolerances}
    report = curve.summarize(baselines, sweep)
    report["folds"] = len(per_fold)
    report["best_single_models"] = sorted({f["best_single"] for f in per_fold})
    return report


def describe(report: dict[str, Any]) -> str:
    """The report in a few lines: baselines, then each router's curve figures with their 95 %
    confidence intervals (bootstrap over prompts)."""
    best = report["baselines"]["best_single"]
    lines = [
        f"{report['prompts']} held-out prompts; best single model ({', '.join(report['best_single_models'])}): "
        f"score {best['score']:.3f}"
    ]
    for name, point in report["baselines"].items():
        lines.append(f"  {name:12s} score {point['score']:.3f}  cost/1M req ${point['cost'] * 1e6:,.0f}")

    def fmt(figure: dict[str, Any], percent: bool) -> str:
        value, (low, high) = figure["value"], figure["ci95"]
        if value is None:
            return "never reached"
        return f"{value:.1%} [{low:.1%}, {high:.1%}]" if percent else f"{value:.3f} [{low:.3f}, {high:.3f}]"

    for router, figures in report["curve"].items():
        lines.append(
            f"  {router:9s} AUC {fmt(figures['auc'], False)}; saving at 95% of the best single model "
            f"{fmt(figures['saving_at_95'], True)}, at 100% {fmt(figures['saving_at_100'], True)}"
        )
    saving = report["cost_saving_at_95"]
    if saving is None:
        lines.append("no tolerance kept 95% of the best single model's score")
    else:
        lines.append(
            f"cost saving at >=95% of its score: {saving:.1%} (score ratio {report['score_ratio']:.3f}, "
            f"tolerance {report['tolerance_at_95']})"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sweep = report["sweep"]
    ax.plot([p["cost"] * 1e6 for p in sweep], [p["score"] for p in sweep], "o-", label="Signalbox (tolerance sweep)")
    for name, point in report["baselines"].items():
        ax.scatter([point["cost"] * 1e6], [point["score"]], marker="s", label=name.replace("_", " "))
    best = report["baselines"]["best_single"]
    ax.axhline(0.95 * best["score"], linestyle=":", color="grey", label="95% of best single model")
    ax.set_xlabel("mean cost per request (USD per 1M requests)")
    ax.set_ylabel("mean score")
    ax.set_title("Cost-quality on held-out folds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
