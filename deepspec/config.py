"""Typed experiment config: YAML + `key.path=value` overrides, validated before any work, hashed for lineage.

One pydantic model is the single source of truth; `workflow/schemas/config.schema.json` is generated
from it (`deepspec schema`) so that Snakemake validates the same shape.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A bad config; its message is one line naming the key and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TargetConfig(_Strict):
    model: str = Field("packaged:smollm2-135m-instruct", description="local path, hub id, or packaged:<name>")
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    backend: Literal["auto", "lean", "hf"] = "auto"
    max_len: Annotated[int, Field(gt=16)] = 4096


class TaskConfig(_Strict):
    kind: Literal["mt_bench", "humaneval", "jsonl", "hf"]
    source: str | None = Field(None, description="jsonl path or HF dataset id; packaged data when omitted")
    max_samples: Annotated[int, Field(ge=1)] | None = None
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    max_turns: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _source_needed(self) -> "TaskConfig":
        if self.kind in ("jsonl", "hf") and not self.source:
            raise ValueError(f"kind {self.kind!r} needs a 'source'")
        return self


class AutoregressiveMethod(_Strict):
    kind: Literal["autoregressive"]


class NgramMethod(_Strict):
    """Prompt lookup: continuations of earlier occurrences of the context's last n-gram."""

    kind: Literal["ngram"]
    ngram_max: Annotated[int, Field(ge=1)] = 3
    ngram_min: Annotated[int, Field(ge=1)] = 1
    num_draft: Annotated[int, Field(ge=1)] = 8
    branches: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _order(self) -> "NgramMethod":
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) must not exceed ngram_max ({self.ngram_max})")
        return self


class DraftLMMethod(_Strict):
    """An independent causal LM sharing the target's tokenizer, with its own KV cache.

    `model` null drafts with the target's own weights, cut to `layers` and/or read as int8."""

    kind: Literal["draft_lm"]
    model: str | None = None
    layers: Annotated[int, Field(ge=1)] | None = None
    quantize: Literal["none", "int8"] = "none"
    depth: Annotated[int, Field(ge=1)] = 4
    top_k: Annotated[int, Field(ge=1)] = 1
    total_tokens: Annotated[int, Field(ge=1)] = 8


MethodConfig = Annotated[Union[AutoregressiveMethod, NgramMethod, DraftLMMethod], Field(discriminator="kind")]


class EvalConfig(_Strict):
    max_new_tokens: Annotated[int, Field(ge=1)] = 128
    temperature: Annotated[float, Field(ge=0)] = 0.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    seed: int = 0
    threads: Annotated[int, Field(ge=0)] = 0


class TrackingConfig(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; MLFLOW_TRACKING_URI wins, else sqlite under results")


class Config(_Strict):
    experiment: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "default"
    results_dir: str = "results"
    target: TargetConfig = TargetConfig()
    tasks: dict[str, TaskConfig]
    methods: dict[str, MethodConfig]
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("tasks", "methods")
    @classmethod
    def _non_empty_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("must name at least one entry")
        for name in value:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"name {name!r} may hold only letters, digits, '_' and '-'")
        return value

    @model_validator(mode="after")
    def _baseline_present(self) -> "Config":
        if not any(m.kind == "autoregressive" for m in self.methods.values()):
            raise ValueError("methods: one method of kind 'autoregressive' is needed as the speedup baseline")
        return self

    # ---- derived -------------------------------------------------------------------------------
    @property
    def out_dir(self) -> Path:
        return Path(self.results_dir) / self.experiment

    def baseline_method(self) -> str:
        return next(name for name, m in self.methods.items() if m.kind == "autoregressive")

    def hash(self) -> str:
        """Stable short hash of the effective config (key order and formatting do not matter)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    parts = [str(p) for p in first["loc"] if not str(p).startswith(("function-", "tagged-union"))]
    if len(parts) >= 3 and parts[0] == "methods":  # drop the union's tag that pydantic puts in the path
        parts.pop(2)
    loc = ".".join(parts)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], (dict, list)):
        msg = f"{msg} (got {first['input']!r})"
    return f"config error: {loc or '<root>'}: {msg}"


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"config error: override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"config error: override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw else None


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `update` wins. Used for CLI and `snakemake --config` overrides alike."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def validate(raw: dict[str, Any]) -> Config:
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    for name, task in cfg.tasks.items():
        if task.kind == "jsonl" and not Path(task.source).is_file():
            raise ConfigError(f"config error: tasks.{name}.source: file not found: {task.source}")
    return cfg


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config error: config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config error: {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: {path}: top level must be a mapping")
    for text in overrides or []:
        keys, value = parse_override(text)
        nested: dict[str, Any] = {keys[-1]: value}
        for key in reversed(keys[:-1]):
            nested = {key: nested}
        raw = merge(raw, nested)
    return validate(raw)


def json_schema() -> dict[str, Any]:
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **Config.model_json_schema()}
