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
        assert set(categories.values()) - {None} <= classes, name
    assert set(outside_task_types.CATEGORIES) == set(outside_task_types.BENCHMARKS)


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


def test_wizardlm_instructions_are_read_by_skill_and_skills_of_no_one_type_are_left_out(tmp_path):
    benchmark = outside_task_types.BENCHMARKS["wizardlm_testset"]
    path = tmp_path / benchmark.path
    path.parent.mkdir(parents=True)
    rows = [
        {"idx": 1, "Skill": "Code Debug", "Difficulty": 4, "Instruction": "Why does this loop never end?"},
        {"idx": 2, "Skill": "Multilingual", "Difficulty": 2, "Instruction": "Wie spät ist es?"},
        {"idx": 3, "Skill": "History", "Difficulty": 5, "Instruction": "Who built the first lighthouse?"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = outside_task_types.benchmark_questions({"wizardlm": tmp_path})
    assert got == {
        "wizardlm_testset": [("Why does this loop never end?", "code"), ("Who built the first lighthouse?", "qa")]
    }
    # Only the benchmarks of the checkouts given; a named file that is not there is reported.
    assert outside_task_types.missing_files({"wizardlm": tmp_path, "fastchat": tmp_path}) == [
        str(tmp_path / b.path) for b in outside_task_types.BENCHMARKS.values() if b.checkout == "fastchat"
    ]
