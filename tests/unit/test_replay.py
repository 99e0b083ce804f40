"""`signalbox replay --scores` (issue 17): the quality trade-off of a candidate over recorded
requests, as eval-routing judges a policy; prompts read from any body without failing."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from signalbox import replay
from signalbox.core.compiler import compile_config
from signalbox.extproc.runtime import RuntimeTable
from tests.factories import backend, model, policy, provider

CODE = "write a python function that merges two sorted lists"
CHAT = "tell me a joke about cats"


def table(strategy: str, **spec) -> RuntimeTable:
    result = compile_config(
        [
            provider("weak", "http://127.0.0.1:9001/v1", [model("small", inputPricePer1M=0.1, outputPricePer1M=0.1)]),
            provider("strong", "http://127.0.0.1:9002/v1", [model("large", inputPricePer1M=5, outputPricePer1M=15)]),
        ],
        [policy("live", ["auto"], [backend("weak", "small"), backend("strong", "large")], strategy=strategy, **spec)],
    )
    assert result.ok, result.problems
    return RuntimeTable.from_config(result.config)


def captured(text: str, n: int) -> dict:
    body = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 100}
    return {
        "request_id": f"r{n}",
        "path": "/v1/chat/completions",
        "headers": {},
        "body": json.dumps(body),
        "decision": {"policy": "live", "backend": "default/strong/large", "class": "x"},
    }


def test_scored_requests_give_the_quality_kept_and_the_cost_saved_against_the_best_single_backend():
    candidate = table(
        "classified", routes=[{"taskTypes": ["code"], "backends": ["strong/large"]}, {"backends": ["weak/small"]}]
    )
    records = [captured(CODE, n) for n in range(3)] + [captured(CHAT, n) for n in range(3, 6)]
    records.append(captured("a prompt nobody scored", 6))
    scores = {CODE: {"small": 0.0, "large": 1.0}, CHAT: {"small": 1.0, "large": 1.0}}
    decisions: list[dict] = []
    report = replay.run(records, candidate, decisions=decisions, scores=scores)
    quality = report["policies"]["live"]["quality"]
    assert quality["scored_requests"] == 6  # the unscored prompt counts for cost only
    assert quality["mean_score_before"] == quality["mean_score_after"] == 1.0
    assert quality["best_single"]["backend"] == "default/strong/large"
    assert quality["after_share_of_best_score"] == 1.0
    assert 0.4 < quality["after_cost_saving_vs_best"] < 0.6  # half the requests moved to a model 1/50 the price
    assert {d["after"] for d in decisions} == {"default/strong/large", "default/weak/small"}
    assert "of its score at" in replay.table(report)

    # A candidate that sends everything to the weak model keeps half the score.
    cheap = replay.run(records, table("cost", learning={"enabled": False}), scores=scores)["policies"]["live"]
    assert cheap["quality"]["mean_score_after"] == 0.5


def test_no_scores_no_quality_and_bad_score_files_are_refused(tmp_path):
    report = replay.run([captured(CHAT, 0)], table("cost"))
    assert "quality" not in report["policies"]["live"]
    bad = tmp_path / "scores.jsonl"
    bad.write_text('{"prompt": "x", "scores": {"m": 1}}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=":2:"):
        replay.load_scores(bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
@example({"messages": 5})
@example({"messages": [{"role": "user", "content": [{"text": 3}, {"text": "hi"}]}]})
def test_a_prompt_is_read_from_any_body_without_failing(body):
    assert isinstance(replay.prompt_of(body), str)


@given(st.lists(json_values, max_size=4))
def test_a_prompt_is_read_from_any_messages(messages):
    assert isinstance(replay.prompt_of({"messages": messages}), str)


def test_a_request_log_replays_the_captured_requests_it_names_and_says_when_there_are_none(tmp_path):
    log = tmp_path / "requests.log"
    events = [{"event": "request", "request_id": "r1"}, {"event": "attempt", "request_id": "r1"}]
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    with pytest.raises(ValueError, match="holds no request bodies; start the gateway with --capture-prompts"):
        replay.load(log)
    records = [{**captured(CHAT, 1), "request_id": rid} for rid in ("r1", "r2")]
    (tmp_path / "captured.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [r["request_id"] for r in replay.load(log)] == ["r1"]  # r2 is not in this log
    log.write_text(json.dumps({"event": "request", "request_id": "elsewhere"}) + "\n")
    with pytest.raises(ValueError, match="none of the requests"):
        replay.load(log)
