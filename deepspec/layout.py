"""Where everything lives under results/<experiment>/: the one module that spells out the folder layout.

The stages write there and the Snakemake rules name the same paths (with wildcards passed as names, e.g.
`eval_dir(cfg, "{method}", "{task}")`), so the layout changes here or nowhere.

  config.yaml                     the effective config every stage read
  data/tasks/<task>.jsonl         prepared benchmark prompts
  data/train/regenerated.jsonl    training conversations, answers written by the target
  features/<target>/              the feature cache: shard-NNNNN.safetensors + .json, manifest.json
  drafters/<name>/                model/ (the trained drafter), checkpoint/, train_log.jsonl, metrics.json
  eval/<method>/<task>/           records.jsonl, metrics.json
  export/<drafter>-<format>/      a drafter in a serving engine's layout
  engines/<engine>.json           the serving engine's environment this run used (pins, versions)
  deployed/<engine>/<method>/<task>/   records.jsonl, metrics.json of a method run in that engine
  bench/, tables/, plots/, report.md, logs/<stage>/
"""

from __future__ import annotations

import re
from pathlib import Path

from deepspec.config import Config


def effective_config(cfg: Config) -> Path:
    return cfg.out_dir / "config.yaml"


def task_file(cfg: Config, task: str) -> Path:
    return cfg.out_dir / "data" / "tasks" / f"{task}.jsonl"


def train_data_file(cfg: Config) -> Path:
    return cfg.out_dir / "data" / "train" / "regenerated.jsonl"


def target_slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_")


def features_dir(cfg: Config) -> Path:
    return cfg.out_dir / "features" / target_slug(cfg.target.model)


def shard_path(cfg: Config, shard: int | str) -> Path:
    """One feature shard (`shard` a number, or a wildcard such as "{shard}" for a rule)."""
    name = f"shard-{shard:05d}" if isinstance(shard, int) else f"shard-{shard}"
    return features_dir(cfg) / f"{name}.safetensors"


def drafters_root(cfg: Config) -> Path:
    return cfg.out_dir / "drafters"


def drafter_dir(cfg: Config, name: str) -> Path:
    return drafters_root(cfg) / name


def drafter_model(cfg: Config, name: str) -> Path:
    """The trained drafter's folder (config.json + model.safetensors)."""
    return drafter_dir(cfg, name) / "model"


def eval_dir(cfg: Config, method: str, task: str) -> Path:
    return cfg.out_dir / "eval" / method / task


def export_dir(cfg: Config, name: str, fmt: str) -> Path:
    return cfg.out_dir / "export" / f"{name}-{fmt}"


def engine_record(cfg: Config, engine: str) -> Path:
    return cfg.out_dir / "engines" / f"{engine}.json"


def deployed_dir(cfg: Config, engine: str, method: str, task: str) -> Path:
    return cfg.out_dir / "deployed" / engine / method / task


def bench_dir(cfg: Config) -> Path:
    return cfg.out_dir / "bench"


def report_file(cfg: Config) -> Path:
    return cfg.out_dir / "report.md"


def tables_dir(cfg: Config) -> Path:
    return cfg.out_dir / "tables"


def plots_dir(cfg: Config) -> Path:
    return cfg.out_dir / "plots"


def log_file(cfg: Config, stage: str, name: str | None = None) -> Path:
    """A job's log: logs/<stage>/<name>.log, or logs/<stage>.log for a stage that runs once."""
    if name is None:
        return cfg.out_dir / "logs" / f"{stage}.log"
    return cfg.out_dir / "logs" / stage / f"{name}.log"
