"""Prompt capture (extproc/capture.py): anything a client sends is recorded without keys, within
its caps, and never fails the request."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from signalbox.extproc import capture

KEYS = ["sk-" + "Ab3" * 10, "sbx-" + "x9_" * 12, "AKIA" + "ABCDEFGHIJKLMNOP", "Bearer " + "t0ken" * 5]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=500), st.sampled_from(KEYS), st.text(max_size=50))
def test_keys_anywhere_in_a_body_are_redacted(before, key, after):
    out = capture.redact(before + " " + key + " " + after)
    assert key not in out and "[redacted]" in out


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=2000))
def test_any_body_is_recorded_as_one_json_line(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("capture") / "captured.jsonl"
    capture.Capture(path).record("r1", "/v1/chat/completions", {"x-user": "u", "authorization": "Bearer k"}, body, {})
    (line,) = path.read_text().splitlines()
    record = json.loads(line)
    assert record["request_id"] == "r1" and "authorization" not in record["headers"]


def test_bodies_are_capped_and_the_file_stops_at_its_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(capture, "MAX_FILE_BYTES", 200_000)
    sink = capture.Capture(tmp_path / "captured.jsonl")
    big = b"x" * (capture.MAX_BODY_CHARS + 10)
    for _ in range(20):
        sink.record("r", "/v1/chat/completions", {}, big, {})
    lines = (tmp_path / "captured.jsonl").read_text().splitlines()
    assert all(json.loads(x)["truncated"] and len(json.loads(x)["body"]) == capture.MAX_BODY_CHARS for x in lines)
    assert len(lines) < 20 and (tmp_path / "captured.jsonl").stat().st_size < 200_000 + 40_000
