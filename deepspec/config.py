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
from pydantic import Field, ValidationError, field_validator, model_validator

from deepspec.config_base import LAUNCH_KEYS, Strict, TrainedMethod, hash_default, hashed
from deepspec.drafters.registry import DRAFTER_CONFIGS, TRAINED_METHODS


class ConfigError(ValueError):
    """A bad config; its message is one line naming the key and the problem."""


def _needs_source(section):
    """File-backed and hub-backed data kinds name their source; packaged ones may not."""
    if section.kind in ("jsonl", "hf") and not section.source:
        raise ValueError(f"kind {section.kind!r} needs a 'source'")
    return section


class TargetConfig(Strict):
    model: str = Field("packaged:smollm2-135m-instruct", description="local path, hub id, or packaged:<name>")
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    backend: Literal["auto", "lean", "hf"] = "auto"
    max_len: Annotated[int, Field(gt=16)] = 4096
    chat_template_kwargs: dict[str, Any] = Field(
        {}, description="passed to the chat template wherever a prompt is built, e.g. {enable_thinking: false} for Qwen3")


class TaskConfig(Strict):
    kind: Literal["mt_bench", "humaneval", "math500", "aime25", "arena_hard", "alpaca_eval", "jsonl", "hf"]
    source: str | None = Field(None, description="jsonl path or HF dataset id; packaged data when omitted")
    subset: str | None = Field(None, description="hf: the dataset's configuration name (e.g. gsm8k's 'main')")
    split: str | None = Field(None, description="hf: the split (default test)")
    prompt_field: str | None = Field(None, description="the column holding a single-turn prompt (default: a 'turns' list)")
    max_samples: Annotated[int, Field(ge=1)] | None = None
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    max_turns: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _source_needed(self) -> "TaskConfig":
        return _needs_source(self)


class AutoregressiveMethod(Strict):
    kind: Literal["autoregressive"]


class NgramMethod(Strict):
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


class SuffixMethod(Strict):
    """Suffix decoding: drafts from suffix tries over the conversation and over the target's earlier outputs in
    the run (bounded, oldest out first), as long as the matched suffix earns (`spec_factor` x match length +
    `spec_offset` nodes, at most `max_spec_tokens`), through continuations at least `min_token_prob` likely."""

    kind: Literal["suffix"]
    max_depth: Annotated[int, Field(ge=2)] = Field(24, description="longest substring a trie counts")
    max_spec_tokens: Annotated[int, Field(ge=1)] = 16
    spec_factor: Annotated[float, Field(gt=0)] = 1.0
    spec_offset: float = 0.0
    min_token_prob: Annotated[float, Field(ge=0, le=1)] = 0.1
    global_cache: bool = Field(True, description="also draft from the target's earlier outputs in this run")
    max_cached_outputs: Annotated[int, Field(ge=1)] = 1000


class DraftLMMethod(Strict):
    """An independent causal LM sharing the target's tokenizer, with its own KV cache.

    `model` null drafts with the target's own weights, cut to `layers` and/or read as int8."""

    kind: Literal["draft_lm"]
    model: str | None = None
    layers: Annotated[int, Field(ge=1)] | None = None
    quantize: Literal["none", "int8"] = "none"
    depth: Annotated[int, Field(ge=1)] = 4
    top_k: Annotated[int, Field(ge=1)] = 1
    total_tokens: Annotated[int, Field(ge=1)] = 8


class HybridMethod(Strict):
    """Several methods' proposers as one. `first`: each round the draft of the first of `methods` that has
    one (prompt lookup when it finds a match, else a trained drafter), lossless at any temperature;
    `merge`: every draft under one root, verified as one tree (greedy only)."""

    kind: Literal["hybrid"]
    methods: list[str] = Field(min_length=2, description="names of other methods (not autoregressive or hybrid), "
                                                         "tried in this order; at most one reads target features")
    mode: Literal["first", "merge"] = "first"


MethodConfig = Annotated[Union[(AutoregressiveMethod, NgramMethod, SuffixMethod, DraftLMMethod, HybridMethod,
                                *TRAINED_METHODS)],
                         Field(discriminator="kind")]
DrafterConfig = Annotated[Union[DRAFTER_CONFIGS], Field(discriminator="kind")]


class TrainDataConfig(Strict):
    """Training conversations; their answers are regenerated by the target (distillation data), and
    optionally more conversations keep the dataset's own answers (EAGLE-1's fixed data: the target only
    reads them, which costs a forward per token instead of a generation step)."""

    kind: Literal["sharegpt", "jsonl", "hf"] = "sharegpt"
    source: str | None = Field(None, description="file (sharegpt/jsonl) or HF dataset id; packaged ShareGPT when omitted")
    max_samples: Annotated[int, Field(ge=0)] | None = Field(400, description="conversations the target answers; null: all")
    dataset_samples: Annotated[int, Field(ge=0)] = Field(0, description="further conversations with the dataset's answers")
    backend: Literal["auto", "lean", "hf", "openai"] = Field(
        "auto", description="regeneration: our batched lean forward, HF generate, or OpenAI-compatible servers (vLLM, SGLang)")
    servers: list[str] = Field([], description="openai: base URLs, e.g. http://node1:30000/v1; requests spread over them")
    server_model: str | None = Field(None, description="openai: the model name the servers know (default: target.model)")
    concurrency: Annotated[int, Field(ge=1)] = Field(8, description="openai: requests in flight")
    retries: Annotated[int, Field(ge=0)] = Field(5, description="openai: attempts after a failed request, on the next server")
    timeout_s: Annotated[float, Field(gt=0)] = Field(300.0, description="openai: seconds one request may take")
    server_params: dict[str, Any] = Field({}, description="openai: more sampling fields per request (top_p, top_k, min_p)")
    max_turns: Annotated[int, Field(ge=1)] = 1
    max_prompt_tokens: Annotated[int, Field(ge=8)] = 256
    max_new_tokens: Annotated[int, Field(ge=1)] = 160
    temperature: Annotated[float, Field(ge=0)] = 0.0
    batch_size: Annotated[int, Field(ge=1)] = 32
    seed: int = 0

    @model_validator(mode="after")
    def _source_needed(self) -> "TrainDataConfig":
        if self.backend == "openai":
            if not self.servers:
                raise ValueError("servers: backend 'openai' needs at least one server base URL")
            for url in self.servers:
                if not url.startswith(("http://", "https://")):
                    raise ValueError(f"servers: {url!r} is not an http(s) URL")
        return _needs_source(self)


# Where a run executes does not change what it computes (see config_base.LAUNCH_KEYS); keys added after a
# reference was made stay out of hashes while unset, so old hashes hold.
LAUNCH_KEYS[TrainDataConfig] = ("servers", "server_model", "concurrency", "retries", "timeout_s")
hash_default(TrainDataConfig, server_params={})
hash_default(TargetConfig, chat_template_kwargs={})
hash_default(TaskConfig, subset=None, split=None, prompt_field=None)


class FeaturesConfig(Strict):
    """The target feature cache: sharded, one Snakemake job per shard."""

    shards: Annotated[int, Field(ge=1)] = 2
    dtype: Literal["float16", "bfloat16", "float32"] = "bfloat16"
    max_len: Annotated[int, Field(ge=8)] = 1024
    extract: Literal["cached", "online"] = Field(
        "cached", description="cached: extract jobs write the cache and training reads it; online: each training "
                              "job runs the target forward itself, per micro-batch, and no cache is written (the "
                              "extract jobs leave the DAG; `shards` still fixes the sequence order)")


hash_default(FeaturesConfig, extract="cached")


class EvalConfig(Strict):
    max_new_tokens: Annotated[int, Field(ge=1)] = 128
    temperature: Annotated[float, Field(ge=0)] = 0.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    seed: int = 0
    threads: Annotated[int, Field(ge=0)] = 0
    tie_margin: Annotated[float, Field(ge=0)] = Field(
        0.25, description="on a GPU or in reduced precision, a greedy output may leave the autoregressive one only "
                          "where the two tokens' logits differ by at most this (a near-tie; about two bf16 roundings "
                          "at logits of 16-32); float32 on the CPU must match token for token")
    rivals: dict[str, str] = Field(
        {}, description="method: rival. The method's evaluate job also runs the rival on every sample, in turn with it "
                        "and the baseline, so their head-to-head is timed in one process, free of the drift between "
                        "jobs (the report's head-to-head table lists it as 'same job')")


hash_default(EvalConfig, tie_margin=0.25, rivals={})


class EngineRunConfig(Strict):
    """Methods of this config run again in an external serving engine (`engines.<engine>`), each beside that
    engine's own autoregressive run in the same job: outputs, τ from the engine's counters, speedup, and a
    sweep over concurrent requests."""

    methods: list[str] = Field(min_length=1, description="names of drafting methods of this config; trained ones "
                                                         "decode from their drafter exported to the engine's layout, "
                                                         "trees as the chain of their depth")
    concurrency: list[Annotated[int, Field(ge=1)]] = Field(
        [1, 2, 4, 8], min_length=1, description="requests in flight at once: throughput and speedup per level")
    sweep_prompts: Annotated[int, Field(ge=1)] = Field(
        8, description="first-turn prompts of each task the concurrency sweep decodes at every level")


ENGINES = ("vllm",)
STAGES = ("prepare", "prepare_train", "extract", "feature_manifest", "train", "evaluate", "engine_env", "export",
          "deploy", "report")
_MEM_MB = {"prepare": 4000, "prepare_train": 16000, "extract": 32000, "feature_manifest": 4000, "train": 64000,
           "evaluate": 32000, "engine_env": 4000, "export": 8000, "deploy": 32000, "report": 4000}
_RUNTIME_MIN = {"prepare": 30, "prepare_train": 1440, "extract": 240, "feature_manifest": 30, "train": 2880,
                "evaluate": 720, "engine_env": 60, "export": 30, "deploy": 720, "report": 30}


class ResourcesConfig(Strict):
    """What each job asks its scheduler for (Snakemake `resources`: memory, run time, GPUs; the SLURM executor
    plugin turns them into its request). Where jobs run, not what they compute: left out of every hash."""

    gpus: Annotated[int, Field(ge=0)] = Field(
        0, description="GPUs per extract job (each claims a free device of its node); when this is > 0 a train "
                       "job asks for train.processes GPUs and an evaluate job for one")
    mem_mb: dict[str, Annotated[int, Field(ge=1)]] = Field(
        _MEM_MB, description="memory per job of each stage (MB); stages left out keep these defaults")
    runtime_min: dict[str, Annotated[int, Field(ge=1)]] = Field(
        _RUNTIME_MIN, description="wall-time limit per job of each stage (minutes); stages left out keep these defaults")

    @field_validator("mem_mb", "runtime_min")
    @classmethod
    def _stages(cls, value: dict[str, int], info) -> dict[str, int]:
        unknown = sorted(set(value) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r} (stages: {', '.join(STAGES)})")
        return {**(_MEM_MB if info.field_name == "mem_mb" else _RUNTIME_MIN), **value}

    def of(self, stage: str, gpus: int = 0) -> dict[str, int]:
        """Snakemake resources of one job of `stage`."""
        return {"mem_mb": self.mem_mb[stage], "runtime": self.runtime_min[stage], "gpu": gpus}


class TrackingConfig(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; MLFLOW_TRACKING_URI wins, else sqlite under results")


class ReproduceConfig(Strict):
    """Where the committed reference results live and how closely a fresh run must match them."""

    reference: str = Field("results/reference", description="folder holding one committed reference per experiment")
    tau_tolerance: Annotated[float, Field(ge=0)] = Field(
        0.03, description="largest relative |Δτ| / τ_reference that counts as a match: decoding is deterministic "
                          "(untrained methods match exactly), but drafter training on CPU is not bit-reproducible")


class Config(Strict):
    experiment: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "default"
    results_dir: str = "results"
    target: TargetConfig = TargetConfig()
    tasks: dict[str, TaskConfig]
    methods: dict[str, MethodConfig]
    eval: EvalConfig = EvalConfig()
    train_data: TrainDataConfig = TrainDataConfig()
    features: FeaturesConfig = FeaturesConfig()
    drafters: dict[str, DrafterConfig] = {}
    tracking: TrackingConfig = TrackingConfig()
    resources: ResourcesConfig = ResourcesConfig()
    reproduce: ReproduceConfig = ReproduceConfig()
    engines: dict[Literal[ENGINES], EngineRunConfig] = Field(
        {}, description="serving engines (vllm) that run some of the methods again, for the report's deployed table")

    @field_validator("tasks", "methods", "drafters")
    @classmethod
    def _non_empty_names(cls, value: dict[str, Any], info) -> dict[str, Any]:
        if not value and info.field_name != "drafters":
            raise ValueError("must name at least one entry")
        for name in value:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"name {name!r} may hold only letters, digits, '_' and '-'")
        return value

    @model_validator(mode="after")
    def _baseline_present(self) -> "Config":
        if not any(isinstance(m, AutoregressiveMethod) for m in self.methods.values()):
            raise ValueError("methods: one method of kind 'autoregressive' is needed as the speedup baseline")
        for name, m in self.methods.items():
            if isinstance(m, TrainedMethod) and m.drafter is not None:
                if m.drafter not in self.drafters:
                    known = ", ".join(self.drafters) or "none"
                    raise ValueError(f"methods.{name}.drafter: no drafter named {m.drafter!r} (drafters: {known})")
                m.check_drafter(f"methods.{name}.drafter", self.drafters[m.drafter])
            if isinstance(m, HybridMethod):
                for part in m.methods:
                    if part not in self.methods or isinstance(self.methods[part], (AutoregressiveMethod, HybridMethod)):
                        raise ValueError(f"methods.{name}.methods: {part!r} is not a drafting method of this config")
                readers = [p for p in m.methods if isinstance(self.methods[p], TrainedMethod)]
                if len(readers) > 1:
                    raise ValueError(f"methods.{name}.methods: {', '.join(readers)} both read target features; "
                                     f"a hybrid takes at most one")
                if m.mode == "merge" and self.eval.temperature > 0:
                    raise ValueError(f"methods.{name}.mode: merge verifies greedily only; use first at temperature > 0")
        baseline = self.baseline_method()
        for name, rival in self.eval.rivals.items():
            for role, m in (("", name), (f".{name}", rival)):
                if m not in self.methods:
                    raise ValueError(f"eval.rivals{role}: no method named {m!r} (methods: {', '.join(self.methods)})")
                if m == baseline:
                    raise ValueError(f"eval.rivals{role}: {m!r} is the baseline, which every evaluate job runs already")
            if rival == name:
                raise ValueError(f"eval.rivals.{name}: a method cannot be its own rival")
        for engine, run in self.engines.items():
            for name in run.methods:
                where = f"engines.{engine}.methods"
                if name not in self.methods:
                    raise ValueError(f"{where}: no method named {name!r} (methods: {', '.join(self.methods)})")
                if isinstance(self.methods[name], (AutoregressiveMethod, HybridMethod)):
                    raise ValueError(f"{where}: {name!r} is {self.methods[name].kind}; every engine job runs the "
                                     f"engine's own autoregressive baseline, and hybrids are ours alone")
                try:
                    self.engine_spec(engine, name, "export")
                except ValueError as err:
                    raise ValueError(f"{where}: {name!r}: {err}") from None
        if self.out_dir.resolve() == self.reference_dir.resolve():
            raise ValueError(f"results_dir: {self.results_dir!r} would write this run over its committed reference")
        return self

    # ---- derived -------------------------------------------------------------------------------
    @property
    def out_dir(self) -> Path:
        return Path(self.results_dir) / self.experiment

    @property
    def reference_dir(self) -> Path:
        """The committed reference this experiment's report compares against (apart from the DAG's outputs)."""
        return Path(self.reproduce.reference) / self.experiment

    def baseline_method(self) -> str:
        return next(name for name, m in self.methods.items() if isinstance(m, AutoregressiveMethod))

    def method_drafters(self, method: str) -> list[str]:
        """Names of the trained drafters a method decodes with (a hybrid: those of its methods)."""
        m = self.methods[method]
        if isinstance(m, HybridMethod):
            return sorted({d for part in m.methods for d in self.method_drafters(part)})
        return [m.drafter] if isinstance(m, TrainedMethod) and m.drafter is not None else []

    def method_section(self, method: str) -> Any:
        """What decoding with `method` depends on, as plain data: its section, and a hybrid's with its methods'
        sections under `parts`, so that changing a part reruns the hybrids built on it."""
        node = self.section("methods", method)
        m = self.methods[method]
        if isinstance(m, HybridMethod):
            return {**node, "parts": {part: self.method_section(part) for part in m.methods}}
        return node

    def eval_section(self, method: str | None = None) -> Any:
        """What an evaluate job of `method` reads of `eval`: the section without `rivals`, plus this method's rival
        with its method section, so that naming or changing a rival reruns only the job that times it."""
        node = {k: v for k, v in self.section("eval").items() if k != "rivals"}
        rival = self.eval.rivals.get(method) if method is not None else None
        return {**node, "rival": {rival: self.method_section(rival)}} if rival else node

    def method_cuts_on_costs(self, method: str) -> bool:
        """Whether a method's draft lengths follow this machine's measured costs (a hybrid: through any of its
        methods), so that its τ moves with the machine."""
        m = self.methods[method]
        if isinstance(m, HybridMethod):
            return any(self.method_cuts_on_costs(part) for part in m.methods)
        return isinstance(m, TrainedMethod) and m.cuts_on_costs

    def method_checkpoints(self, method: str) -> list[str]:
        """Published checkpoint folders a method decodes with (a hybrid: those of its methods)."""
        m = self.methods[method]
        if isinstance(m, HybridMethod):
            return sorted({c for part in m.methods for c in self.method_checkpoints(part)})
        return [m.checkpoint] if isinstance(m, TrainedMethod) and m.checkpoint is not None else []

    def drafters_in_use(self) -> list[str]:
        """Drafters some method decodes with: only these are trained (and need features)."""
        return sorted({d for name in self.methods for d in self.method_drafters(name)})

    def engine_spec(self, engine: str, method: str, export: str | Path | None) -> dict | None:
        """How engine `engine` runs `method` (vLLM's speculative_config), trained drafters from `export`."""
        from deepspec.engines.vllm_runner import speculative_config

        m = self.methods[method]
        drafter = self.drafters[m.drafter] if getattr(m, "drafter", None) is not None else None
        return speculative_config(m, export, drafter)

    def engine_exports(self, engine: str, method: str) -> list[str]:
        """The drafters `method` must be exported to before `engine` can run it (trained here, not published)."""
        m = self.methods[method]
        return [m.drafter] if isinstance(m, TrainedMethod) and m.drafter is not None else []

    def section(self, *keys: str) -> Any:
        """One part of the config as plain data, without the keys that only say where it runs (`LAUNCH_KEYS`):
        what a stage's output depends on (its hash; the Snakemake rule params that trigger reruns)."""
        node: Any = hashed(self.model_dump(mode="json"))
        for key in keys:
            node = node[key]
        return node

    def section_hash(self, *keys: str) -> str:
        """Hash of one part of the config: stage outputs record what they were built from."""
        return node_hash(self.section(*keys))

    def hash(self) -> str:
        """Stable short hash of the effective config (key order and formatting do not matter).

        `reproduce`, `resources` and `engines` are left out: they say what a run is compared with, where it runs and
        in which other engines its methods run again, not what its stages compute, so a run and the reference it
        reproduces share one hash. A deploy job records the hash of its `engines` section beside this one."""
        return node_hash(hashed(self.model_dump(mode="json", exclude={"reproduce", "resources", "engines"})))


def node_hash(node: Any) -> str:
    """Short hash of plain config data (key order and formatting do not matter)."""
    blob = json.dumps(node, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    parts = [str(p) for p in first["loc"] if not str(p).startswith(("function-", "tagged-union"))]
    if len(parts) >= 3 and parts[0] in ("methods", "drafters"):  # drop the union tag pydantic puts in the path
        parts.pop(2)
    loc = ".".join(parts)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], (dict, list)):
        msg = f"{msg} (got {first['input']!r})"
    if not loc and ": " in msg and msg.split(": ", 1)[0].replace(".", "").replace("_", "").isalnum():
        return f"config error: {msg}"  # a cross-field check that names its own key path
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
    for name, method in cfg.methods.items():
        if isinstance(method, TrainedMethod) and method.checkpoint and not (Path(method.checkpoint) / "config.json").is_file():
            raise ConfigError(f"config error: methods.{name}.checkpoint: no config.json in {method.checkpoint}")
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
