"""What one trained drafter kind tells the rest of the harness: the interface of a registry entry.

The trainer, the feature cache, evaluate, export and the report hold no kind names: each asks the entry
of a drafter's `kind` (`deepspec.drafters.registry.KINDS`). An entry is light to import (its config
classes only); models, losses and checkpoint formats load when a method first needs them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Protocol

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from deepspec.config_base import DrafterBase, TrainedMethod
    from deepspec.decoding.proposer import Proposer


class Runner(Protocol):
    """How a loss reaches the model under any launcher: `call` runs a method of the (possibly wrapped)
    drafter, `sync` says whether this backward reduces gradients across ranks, `backward` scales and
    backpropagates."""

    drafter: "nn.Module"

    def call(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def sync(self, last: bool) -> Any: ...

    def backward(self, loss: "Tensor") -> None: ...


class Direct:
    """The plain drafter behind the runner interface: evaluation outside a launcher, calibration, unit tests."""

    def __init__(self, drafter: "nn.Module"):
        self.drafter = drafter

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.drafter, *args)

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: "Tensor") -> None:
        loss.backward()


@dataclass
class Fitted:
    """What a kind fits on held-out data once training ends: `data` goes to `file` beside the drafter,
    `summary` into its metrics, `lines` to the console."""

    file: str
    data: dict[str, Any]
    summary: dict[str, Any]
    lines: list[str]


class DrafterKind:
    """One trained drafter kind. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    config: ClassVar[type["DrafterBase"]]          # its section under `drafters.<name>`
    method: ClassVar[type["TrainedMethod"]]        # the method that decodes it (several kinds may share one)
    formats: ClassVar[tuple[str, ...]] = ()        # `deepspec export --to` layouts
    step_label: ClassVar[str] = "draft"            # what one scored step is called in the report

    def feature_layers(self, dc: "DrafterBase", n_layers: int, where: str) -> list[int]:
        """The target hidden states it reads, as HF hidden_states indices (the feature cache's convention)."""
        raise NotImplementedError

    def new_drafter(self, dc: "DrafterBase", target_model: "nn.Module", tokenizer: Any, layers: list[int],
                    draft_ids: "Tensor", train_hidden: Iterable["Tensor"], meta: dict[str, Any], where: str,
                    say: Callable[..., None] = print) -> "nn.Module":
        """A fresh drafter for this target, before training (its head and norm from the target's)."""
        raise NotImplementedError

    def steps(self, dc: "DrafterBase", model: "nn.Module") -> int:
        """Draft positions scored per anchor (loss_k / acc_k columns of the training log)."""
        raise NotImplementedError

    def run_batch(self, runner: Runner, dc: "DrafterBase", seqs: list[dict], labels: list[dict], train: bool,
                  generator: "torch.Generator | None", last: bool = True) -> dict[str, Any]:
        """Loss (backpropagated when `train`) and per-step statistics over sequences: loss, loss_step,
        acc_step, tokens, tau_chain (teacher-forced chain τ)."""
        raise NotImplementedError

    def after_training(self, model: "nn.Module", dc: "DrafterBase", val_seqs: list[dict],
                       val_labels: list[dict]) -> Fitted | None:
        """Fit what is fitted on held-out data once training ends (stored in the model), or None."""
        return None

    def load(self, folder: str | Path, target_model: "nn.Module", fingerprint: str | None = None) -> "nn.Module":
        """A checkpoint folder, ours or a published layout, checked against the target as it loads."""
        raise NotImplementedError

    def export(self, drafter: "nn.Module", fmt: str, out: Path, target_model: "nn.Module",
               dtype: "torch.dtype | None") -> Path:
        """Write `drafter` in layout `fmt` to `out` (a temp folder renamed into place)."""
        raise NotImplementedError

    def vllm_proposer(self, method: "TrainedMethod", dc: "DrafterBase | None") -> tuple[str, int]:
        """vLLM's proposer for `method` decoding this kind (its `speculative_config` method name) and the drafts it
        makes per round, decoding `method.as_chain()`; `dc` None: a published checkpoint. A ValueError says why
        vLLM cannot."""
        raise ValueError(f"vLLM has no proposer for {self.name} drafters")

    @staticmethod
    def chain_of_depth(name: str, method: "TrainedMethod") -> tuple[str, int]:
        """vLLM's proposer `name` drafting the chain of a tree method's depth."""
        if getattr(method, "depth", None) is None:
            raise ValueError("vLLM drafts a chain of `depth` tokens: set depth")
        return name, method.depth

    def proposer(self, method: "TrainedMethod", drafter: "nn.Module", target: Any, temperature: float,
                 seed: int) -> "Proposer":
        """The proposer decoding with `drafter` for `target` (a loaded Target) under `method`."""
        raise NotImplementedError
