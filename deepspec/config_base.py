"""The parts of the config that drafter kinds build on: strict sections, the training schedule, the base
classes of a drafter's config and of a method that decodes with a trained drafter, and what the config hash
leaves out.

`deepspec.config` assembles the whole experiment config from these and from each drafter kind's own
sections (`deepspec/drafters/<kind>/config.py`), so adding a kind never edits the experiment config.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """A config section that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid")


class TrainConfig(Strict):
    epochs: Annotated[float, Field(gt=0)] = 2.0
    lr: Annotated[float, Field(gt=0)] = 1e-3
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] | None = Field(None, description="warmup as a share of the steps "
                                                                                       "(instead of warmup_steps)")
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    grad_clip: Annotated[float, Field(gt=0)] | None = 0.5
    batch_sequences: Annotated[int, Field(ge=1)] = Field(4, description="sequences per micro-batch per process")
    grad_accum: Annotated[int, Field(ge=1)] = 1
    global_batch: Annotated[int, Field(ge=1)] | None = Field(
        None, description="sequences per optimizer step whatever the number of processes (accumulation adapts); "
                          "null: batch_sequences x grad_accum")
    distributed: Literal["none", "ddp", "fsdp2", "deepspeed"] = Field(
        "none", description="launcher: one process, or torchrun DDP / FSDP2, or DeepSpeed ZeRO (gloo on CPU, NCCL on GPU)")
    processes: Annotated[int, Field(ge=1)] = Field(1, description="processes the train rule starts (torchrun --nproc-per-node)")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    wall_budget_s: Annotated[float, Field(gt=0)] | None = Field(
        None, description="size the schedule to end after this much training wall time: the total number of steps "
                          "is set from the pace of the last 10 steps, every 10 steps until 90% of the budget is spent "
                          "(and kept on resume), so the learning rate anneals by then; null: `epochs` decides")
    val_sequences: Annotated[int, Field(ge=0)] = 16
    train_sequences: Annotated[int, Field(ge=1)] | None = Field(
        None, description="train on only this many of the training split's sequences (a seeded subset, drawn after "
                          "the validation split, so runs on one cache share their validation set); null: all")
    eval_every: Annotated[int, Field(ge=1)] = 50
    save_every: Annotated[int, Field(ge=1)] = 100
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    seed: int = 0
    threads: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _launch(self) -> "TrainConfig":
        if self.distributed == "none" and self.processes > 1:
            raise ValueError(f"processes: {self.processes} processes need distributed: ddp, fsdp2 or deepspeed")
        if self.global_batch is not None and self.global_batch % self.batch_sequences:
            raise ValueError(f"global_batch: {self.global_batch} is not a multiple of batch_sequences "
                             f"({self.batch_sequences})")
        return self

    @property
    def sequences_per_step(self) -> int:
        return self.global_batch or self.batch_sequences * self.grad_accum

    def split_sizes(self, n: int) -> tuple[int, int]:
        """(validation, training) sequence counts of a cache of `n`: validation at most a fifth, training the
        rest, or `train_sequences` of it."""
        n_val = min(self.val_sequences, n // 5)
        return n_val, min(n - n_val, self.train_sequences or n)

    def steps_per_epoch(self, n_train: int) -> float:
        """Optimizer steps per pass over `n_train` training sequences: whole micro-batches of `batch_sequences`,
        `sequences_per_step / batch_sequences` of them per step."""
        per = min(self.batch_sequences, n_train)
        return max(1, n_train // per) / (self.sequences_per_step // self.batch_sequences)

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps of `epochs` over `n_train` training sequences."""
        return max(1, math.ceil(self.epochs * self.steps_per_epoch(n_train)))


# Where a run executes does not change what it computes: these keys stay out of every config hash and rule
# param, so one reference serves every launcher and every set of servers. Keys added after a reference was
# made stay out too while unset, so old hashes hold.
LAUNCH_KEYS: dict[type[BaseModel], tuple[str, ...]] = {TrainConfig: ("distributed", "processes", "zero_stage")}
UNSET_KEYS: dict[type[BaseModel], dict[str, Any]] = {TrainConfig: {"global_batch": None, "warmup_ratio": None,
                                                                   "wall_budget_s": None, "train_sequences": None}}


def hashed(node: Any) -> Any:
    """`node` (a config as plain data) without the launch keys and the keys still at their unset value."""
    if isinstance(node, dict):
        out = {k: hashed(v) for k, v in node.items()}
        for model in {**LAUNCH_KEYS, **UNSET_KEYS}:
            if set(out) == set(model.model_fields):
                for key in LAUNCH_KEYS.get(model, ()):
                    out.pop(key)
                for key, unset in UNSET_KEYS.get(model, {}).items():
                    if out[key] == unset:
                        out.pop(key)
        return out
    if isinstance(node, list):
        return [hashed(v) for v in node]
    return node


def hash_default(section: type[BaseModel], **unset: Any) -> None:
    """Keys added to `section` after a reference was made: left out of hashes while they hold these values."""
    UNSET_KEYS.setdefault(section, {}).update(unset)


# Where a drafter whose decoder layers are shaped like the target's (EAGLE-3, DFlash, DSpark) starts.
InitLayers = Annotated[Literal["random", "target"], Field(
    description="random: decoder layers and fc from noise; target: the decoder layers copied from the target's "
                "layers after the deepest fused one, fc passing that fused layer through")]


class DrafterBase(Strict):
    """What the trainer reads of every drafter kind's config (under `drafters.<name>`)."""

    kind: str
    draft_vocab: Annotated[int, Field(ge=2)] | None = Field(
        8192, description="at most this many of the target's most frequent argmax tokens on the training split "
                          "(only tokens that occur); null: full vocabulary")
    vocab_coverage: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0, description="cut the draft vocabulary once it covers this share of supervised positions")
    supervise: Literal["all", "assistant"] = Field(
        "all", description="positions trained on: all (the target's distribution is a label in the prompt too) "
                           "or only those before a target-written token")
    soft_top_k: Annotated[int, Field(ge=1)] = Field(64, description="target distribution cached as its top-k")
    train: TrainConfig = TrainConfig()


class HeadLossOption(Strict):
    """For kinds scored per step through the target-sized head (EAGLE-3, Medusa): how each step's logits are held."""

    head_loss: Literal["auto", "chunked", "naive"] = Field(
        "auto", description="each step's head and loss: `chunked` recomputes the logits in row chunks in the "
                            "backward (no [T, V] tensor kept per step: large vocabularies), `naive` keeps each "
                            "step's log-probabilities; auto: chunked on GPUs, naive on the CPU (its references)")

    def chunked_head(self, on_gpu: bool) -> bool:
        return self.head_loss == "chunked" or (self.head_loss == "auto" and on_gpu)


class TrainedMethod(Strict):
    """A method that decodes with a trained drafter: one trained here (`drafter`, an entry under `drafters`)
    or a published checkpoint folder (`checkpoint`). `decodes` names the drafter kinds it can decode with."""

    decodes: ClassVar[tuple[str, ...]] = ()
    kind: str
    drafter: str | None = Field(None, description="name of an entry under `drafters`")
    checkpoint: str | None = Field(None, description="folder of a published checkpoint (instead of `drafter`)")

    @model_validator(mode="after")
    def _one_source(self) -> "TrainedMethod":
        if (self.drafter is None) == (self.checkpoint is None):
            raise ValueError("set exactly one of 'drafter' (trained here) or 'checkpoint' (a published folder)")
        return self

    @property
    def cuts_on_costs(self) -> bool:
        """Whether draft lengths are cut on this machine's measured costs (`length: cost` / `calibrated`)."""
        return getattr(self, "length", "fixed") in ("cost", "calibrated")

    def as_chain(self) -> "TrainedMethod":
        """This method as an engine that drafts one chain per round runs it (vLLM): a tree becomes the chain of its
        depth, one candidate per draft."""
        depth = getattr(self, "depth", None)
        if depth is None or not hasattr(self, "total_tokens"):
            return self
        return self.model_copy(update={"top_k": 1, "total_tokens": depth})

    def check_drafter(self, where: str, drafter: DrafterBase) -> None:
        """Refuse a drafter this method cannot decode with (a ValueError naming `where`)."""
        if drafter.kind not in self.decodes:
            raise ValueError(f"{where}: {self.drafter!r} is a {drafter.kind} drafter, which a method of kind "
                             f"{self.kind!r} cannot decode with")
