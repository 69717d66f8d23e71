"""Atomic file writes: a reader (or a resumed run) never sees a half-written output."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def temp_sibling(path: str | Path) -> Path:
    """The hidden name next to `path` that a write goes to before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def write_model_folder(directory: str | Path, tensors: dict[str, Any], config: dict[str, Any],
                       metadata: dict[str, str] | None = None, weights_file: str = "model.safetensors") -> Path:
    """An HF-style folder (`weights_file` + config.json, no pickle), built aside then swapped in."""
    directory = Path(directory)
    tmp = temp_sibling(directory)
    tmp.mkdir(parents=True, exist_ok=True)
    write_safetensors(tmp / weights_file, tensors, metadata)
    write_json(tmp / "config.json", config)
    replace_dir(tmp, directory)
    return directory


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    return write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_jsonl_prefix(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an append-only JSONL file up to the first line a kill cut short (resume support)."""
    rows: list[dict[str, Any]] = []
    if not Path(path).is_file():
        return rows
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def replace_dir(tmp: Path, directory: Path) -> None:
    """Swap a finished folder into place: the old one is moved aside first, so a reader never sees half."""
    old = directory.with_name(f".{directory.name}.old{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)
