"""eval/outside_task_types.py: benchmark categories map onto task types the model predicts, and
a question file with a category nobody mapped is refused by file and line, not scored."""

from __future__ import annotations

import json

import pytest

from eval import outside_task_types
from signalbox.extproc import task_model


def test_every_benchmark_category_maps_to_a_task_type_the_model_predicts():
    classes = set(task_model.load().classes)
    for name, categories in outside_task_types.CATEGORIES.items():
        assert set(categories.values()) <= classes, name


def test_questions_are_read_by_their_first_turn(tmp_path):
    path = tmp_path / "question.jsonl"
    rows = [
        {"question_id": 1, "category": "coding", "turns": ["Write a function that adds two numbers.", "Now in Go."]},
        {"question_id": 2, "category": "stem", "turns": ["Why is the sky blue?"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = outside_task_types.questions(path, outside_task_types.CATEGORIES["mt_bench"])
    assert got == [("Write a function that adds two numbers.", "code"), ("Why is the sky blue?", "qa")]


def test_a_category_with_no_task_type_is_refused_by_file_and_line(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text(json.dumps({"question_id": 1, "category": "stem", "turns": ["?"]}) + "\n")
    path.write_text(path.read_text() + json.dumps({"question_id": 2, "category": "poetry", "turns": ["?"]}) + "\n")
    with pytest.raises(ValueError, match=r"question.jsonl:2: category 'poetry'"):
        outside_task_types.questions(path, outside_task_types.CATEGORIES["mt_bench"])
