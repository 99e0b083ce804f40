"""`signalbox replay`: recorded requests through a candidate config, offline (issue 17).

Input: the capture a gateway writes with `--capture-prompts` (extproc/capture.py), one line
per routed request with what was decided for it (or the request log beside it: `load`). Each
request is decided again by the router phase's own function (`decide.decide`) under the
candidate config; the report says, per live policy and class, how many decisions change and
what the chosen backends would cost (the same estimate budgets hold: prompt estimate plus
max_tokens at each backend's prices). Requests whose body was cut by the capture's size cap
are counted and skipped.

With scores (`--scores`: the JSONL `signalbox eval-routing` reads, `{"prompt", "scores":
{model: 0..1}}`), requests whose prompt (the last user message) has scores also get the quality
trade-off: the mean score of the recorded and the replayed choices, and of each backend of
the policy chosen always, with their estimated costs, so a candidate is judged as
eval-routing judges a policy: quality kept against cost saved.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signalbox.core.errors import RequestError
from signalbox.extproc import body as body_codec
from signalbox.extproc import decide, rollout
from signalbox.extproc.capture import CAPTURE_FILE
from signalbox.extproc.classify import features
from signalbox.extproc.runtime import BackendRuntime, RuntimeTable
from signalbox.extproc.strategies import SelectionState, expected_cost_usd


@dataclass
class Row:
    requests: int = 0
    changed: int = 0
    cost_before: float = 0.0
    cost_after: float = 0.0
    by_class: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    # Requests with scores: their count, the score and cost sums of the recorded and replayed
    # choices, and per backend of the policy the sums had it been chosen every time.
    scored: int = 0
    score_before: float = 0.0
    score_after: float = 0.0
    scored_cost_before: float = 0.0
    scored_cost_after: float = 0.0
    always: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0, 0.0]))


Scores = dict[str, dict[str, float]]  # prompt -> model -> score


def load_scores(path: str | Path) -> Scores:
    """Prompt -> model -> score from eval-routing's JSONL (later lines win on a repeated prompt)."""
    out: Scores = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            out[record["prompt"].strip()] = {str(m): float(v) for m, v in record["scores"].items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{path}:{n}: needs a string 'prompt' and an object 'scores' ({exc})") from None
    return out


def prompt_of(body: Any) -> str:
    """The prompt a score is about: the last user message's text (chat, messages) or the input
    (responses); "" when there is none."""
    if not isinstance(body, dict):
        return ""
    if isinstance(body.get("input"), str):
        return body["input"].strip()
    messages = body.get("messages")
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                parts = (p.get("text") for p in content if isinstance(p, dict))
                content = " ".join(t for t in parts if isinstance(t, str))
            return content.strip() if isinstance(content, str) else ""
    return ""


def score_of(scores: dict[str, float], backend: BackendRuntime | None) -> float | None:
    """A backend's score: by its model name, its upstream name, or its id."""
    if backend is None:
        return None
    for name in (backend.model, backend.upstream_model, backend.id):
        if name in scores:
            return scores[name]
    return None


def load(path: str | Path) -> list[dict[str, Any]]:
    """The captured requests to replay. `path` is the capture (`--capture-prompts`), or the
    gateway's request log (`requests.log`), whose lines carry no bodies: then the capture
    beside it (CAPTURE_FILE, where `signalbox up --capture-prompts` writes it), for the
    requests the log names, so a log cut to some requests replays those."""
    lines = _json_lines(path)
    if lines and all("event" in record for _, record in lines):
        return _captured_for_log(Path(path), {str(r.get("request_id")) for _, r in lines if r["event"] == "request"})
    out = []
    for n, record in lines:
        if not isinstance(record.get("body"), str):
            raise ValueError(f"{path}:{n}: not a captured request (see --capture-prompts)")
        out.append(record)
    return out


def _json_lines(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: not a JSON line: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: not a captured request (see --capture-prompts)")
        out.append((n, record))
    return out


def _captured_for_log(log: Path, request_ids: set[str]) -> list[dict[str, Any]]:
    capture = log.with_name(CAPTURE_FILE)
    if not capture.exists():
        raise ValueError(
            f"{log} is a request log, which holds no request bodies; start the gateway with "
            f"--capture-prompts and replay its capture ({CAPTURE_FILE}, or this log beside it)"
        )
    records = [r for r in load(capture) if str(r.get("request_id")) in request_ids]
    if not records:
        raise ValueError(f"none of the requests in {log} is in {capture} (captured by another run?)")
    return records


def _cost(raw: bytes, backend: BackendRuntime | None) -> float:
    if backend is None:
        return 0.0
    try:
        return expected_cost_usd(features(body_codec.parse(raw)), backend)
    except RequestError:
        return 0.0


def run(
    records: list[dict[str, Any]],
    after: RuntimeTable,
    before: RuntimeTable | None = None,
    decisions: list[dict[str, Any]] | None = None,
    scores: Scores | None = None,
) -> dict[str, Any]:
    """Replay `records` under `after`; the "before" side is what was recorded (its prices from
    `before` when given, else from `after` where the backend still exists). A policy's rollout
    in `after` applies as live: a canary's callers (by their recorded sticky header or address)
    are decided by the candidate, a shadow's decision is reported beside the live one. Each
    request's outcome is appended to `decisions` when given."""
    state = SelectionState()
    rows: dict[str, Row] = defaultdict(Row)
    skipped = 0
    for record in records:
        if record.get("truncated"):
            skipped += 1
            continue
        raw = record["body"].encode()
        old = record.get("decision") or {}
        row = rows[str(old.get("policy", "?"))]
        row.requests += 1
        backends = (before or after).backends
        row.cost_before += _cost(raw, backends.get(str(old.get("backend", ""))))
        headers = {str(k): str(v) for k, v in (record.get("headers") or {}).items()}
        path = str(record.get("path", "/v1/chat/completions"))
        served_by, note, shadow_backend = "", "", None
        try:
            address = decide.client_address(headers)
            prepared = decide.prepare(after, path, headers, raw, address)
            serve, shadow, note = rollout.sides(after, prepared, headers, raw, address)
            served_by = serve.policy.name
            outcome = decide.finish(serve, state)
            new_backend, new_class = outcome.selection.choice.backend, outcome.classification.class_key
            new = new_backend.id
            if shadow is not None:
                shadow_backend = _shadow(shadow, state)
        except RequestError as err:
            new_backend, new_class, new = None, str(old.get("class", "")), f"refused:{err.code}"
        row.cost_after += _cost(raw, new_backend)
        if scores:
            _score(row, scores, raw, backends.get(str(old.get("backend", ""))), new_backend, after, served_by)
        changed = new != old.get("backend")
        row.changed += changed
        counts = row.by_class[str(old.get("class") or new_class)]
        counts[0] += 1
        counts[1] += changed
        if decisions is not None:
            entry = {
                "request_id": record.get("request_id", ""),
                "policy": str(old.get("policy", "?")),
                "before": old.get("backend"),
                "after": new,
                "served_by": served_by,
                "rollout": note,
            }
            if shadow_backend is not None:
                entry["shadow"] = shadow_backend
            decisions.append(entry)
    return {
        "requests": sum(r.requests for r in rows.values()),
        "skipped_truncated": skipped,
        "policies": {
            name: {
                "requests": r.requests,
                "changed": r.changed,
                "changed_share": round(r.changed / r.requests, 4) if r.requests else 0.0,
                "estimated_cost_before_usd": round(r.cost_before, 6),
                "estimated_cost_after_usd": round(r.cost_after, 6),
                "by_class": {k: {"requests": v[0], "changed": v[1]} for k, v in sorted(r.by_class.items())},
                **({"quality": _quality(r)} if r.scored else {}),
            }
            for name, r in sorted(rows.items())
        },
    }


def _score(
    row: Row,
    scores: Scores,
    raw: bytes,
    old: BackendRuntime | None,
    new: BackendRuntime | None,
    after: RuntimeTable,
    policy_name: str,
) -> None:
    try:
        prompt = prompt_of(json.loads(raw))
    except ValueError:
        return
    known = scores.get(prompt)
    if not known:
        return
    before, replayed = score_of(known, old), score_of(known, new)
    if before is None or replayed is None:
        return
    row.scored += 1
    row.score_before += before
    row.score_after += replayed
    row.scored_cost_before += _cost(raw, old)
    row.scored_cost_after += _cost(raw, new)
    policy = next((p for p in after.policies if p.name == policy_name), None)
    for backend in policy.all_backends if policy is not None else ():
        alone = score_of(known, backend)
        if alone is not None:
            sums = row.always[backend.id]  # score, cost, requests scored for it
            sums[0] += alone
            sums[1] += _cost(raw, backend)
            sums[2] += 1


def _quality(r: Row) -> dict[str, Any]:
    """The trade-off over the scored requests: mean score and estimated cost of the recorded
    and replayed choices, and of the best single backend (highest mean score, cheaper on a tie;
    only backends with a score for every scored request compete)."""
    n = r.scored
    complete = {b: sums for b, sums in r.always.items() if sums[2] == n}
    best = max(complete.items(), key=lambda kv: (kv[1][0], -kv[1][1]), default=None)
    out: dict[str, Any] = {
        "scored_requests": n,
        "mean_score_before": round(r.score_before / n, 4),
        "mean_score_after": round(r.score_after / n, 4),
        "estimated_cost_before_usd": round(r.scored_cost_before, 6),
        "estimated_cost_after_usd": round(r.scored_cost_after, 6),
    }
    if best is not None:
        name, (score, usd, _) = best
        out["best_single"] = {"backend": name, "mean_score": round(score / n, 4), "estimated_cost_usd": round(usd, 6)}
        if score:
            out["after_share_of_best_score"] = round(r.score_after / score, 4)
        if usd:
            out["after_cost_saving_vs_best"] = round(1 - r.scored_cost_after / usd, 4)
    return out


def _shadow(shadow: decide.Prepared, state: SelectionState) -> str:
    try:
        return decide.choose(shadow, state)[0].choice.backend.id
    except RequestError as err:
        return f"refused:{err.code}"


def table(report: dict[str, Any]) -> str:
    lines = [f"{'policy':24} {'class':24} {'requests':>8} {'changed':>8} {'cost before':>12} {'cost after':>12}"]
    for name, p in report["policies"].items():
        lines.append(
            f"{name:24} {'(all)':24} {p['requests']:>8} {p['changed']:>8} "
            f"{p['estimated_cost_before_usd']:>12.6f} {p['estimated_cost_after_usd']:>12.6f}"
        )
        for cls, c in p["by_class"].items():
            lines.append(f"{'':24} {cls:24} {c['requests']:>8} {c['changed']:>8}")
        if q := p.get("quality"):
            line = (
                f"{'':24} quality over {q['scored_requests']} scored: {q['mean_score_before']:.3f} -> "
                f"{q['mean_score_after']:.3f}"
            )
            if best := q.get("best_single"):
                line += f"; best single {best['backend']} {best['mean_score']:.3f}"
                if "after_cost_saving_vs_best" in q and "after_share_of_best_score" in q:
                    share, saving = q["after_share_of_best_score"], q["after_cost_saving_vs_best"]
                    line += f", {share:.1%} of its score at {saving:.1%} lower cost"
            lines.append(line)
    if report["skipped_truncated"]:
        lines.append(f"skipped {report['skipped_truncated']} request(s) whose body the capture cut")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["policies"])
    before = [report["policies"][n]["estimated_cost_before_usd"] for n in names]
    after = [report["policies"][n]["estimated_cost_after_usd"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], before, width=0.4, label="recorded")
    ax.bar([x + 0.2 for x in xs], after, width=0.4, label="candidate config")
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_ylabel("estimated cost (USD)")
    ax.set_title("Replay: cost by policy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
