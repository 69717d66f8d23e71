"""`deepspec prepare`: materialise each benchmark task as a JSONL file the evaluate stage reads."""

from __future__ import annotations

from pathlib import Path

from deepspec import io, tracking
from deepspec.config import Config
from deepspec.layout import task_file
from deepspec.data.tasks import load_task


def prepare_tasks(cfg: Config, tasks: list[str] | None = None) -> list[Path]:
    written = []
    for name in tasks or list(cfg.tasks):
        if name not in cfg.tasks:
            raise ValueError(f"task {name!r} is not in the config (tasks: {', '.join(cfg.tasks)})")
        with tracking.stage_run(cfg, "prepare", f"prepare {name}", task=name) as run:
            data = load_task(name, cfg.tasks[name], cfg.eval.seed)
            meta = {"task": name, "source": data.source, "sha256": data.sha256, "available": data.total,
                    "selected": len(data.samples), "config_hash": cfg.hash()}
            path = io.write_jsonl(task_file(cfg, name), [dict(s, config_hash=cfg.hash()) for s in data.samples])
            io.write_json(path.with_suffix(".meta.json"), meta)
            run.params({"task": name, "source": data.source, "source_sha256": data.sha256, "kind": cfg.tasks[name].kind,
                        "max_samples": cfg.tasks[name].max_samples})
            run.metrics({"samples": len(data.samples), "available": data.total})
            run.artifact(path.with_suffix(".meta.json"))
            print(f"[prepare] {name}: {len(data.samples)} of {data.total} samples from {data.source}")
            written.append(path)
    return written
