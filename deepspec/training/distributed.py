"""One trainer, several launchers: `none` (this process), `ddp` / `fsdp2` (torchrun), `deepspeed` (ZeRO-2/3).

The trainer sees one object, `Trainable`: a forward (`call`), a backward that knows whether it ends the
optimizer step (`sync`), an optimizer `step`, the full drafter on rank 0, and a train state that a run
resumes from. Everything that differs between the engines lives here.

Work is split by micro-batch, never by sample: an optimizer step covers `global_batch` sequences, cut
into M micro-batches that are a pure function of (seed, step); rank r runs micro-batches r, r+W, ... So
the data order and the anchors drawn do not depend on the world size W, and a run stopped at W processes
resumes at any other W that divides M. Gradients are summed over micro-batches and averaged over ranks by
the engine, then divided by M / W: every world size takes the same optimizer step (up to float order).

FSDP2 shards the whole drafter as one unit: the drafters call submodule methods (attention projections
of the context, say) outside those submodules' forwards, which per-layer units would leave sharded.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deepspec import io

@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def join(launcher: str) -> World:
    """Join the process group torchrun (or the deepspeed launcher) set up in the environment: gloo on CPU,
    NCCL on GPU. `none` is this one process; a multi-process launch of `none` is refused, since every
    process would train the same model alone."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if launcher == "none":
        if size > 1:
            raise ValueError(f"train.distributed: 'none' was launched with WORLD_SIZE={size}; choose ddp, fsdp2 "
                             "or deepspeed for several processes")
        return World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), torch.device("cuda", local) if cuda else torch.device("cpu"))


def relaunch_command(tc: Any, argv: list[str]) -> list[str] | None:
    """The torchrun command that runs `deepspec <argv>` as `train.processes` processes on this node, when
    this process is not already one of them: `deepspec train` (and so the Snakemake rule) starts them
    itself. Several nodes: run torchrun (or srun) with your rendezvous; every process joins the same way."""
    if tc.processes == 1 or "WORLD_SIZE" in os.environ:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tc.processes}",
            "-m", "deepspec.cli", *argv]


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class LossModule(nn.Module):
    """The drafter behind the one `forward` DDP, FSDP2 and DeepSpeed wrap: `forward(fn, *args)` runs
    `fn(drafter, *args)`, one of the drafter's loss functions, so the engines' hooks see every pass."""

    def __init__(self, drafter: nn.Module):
        super().__init__()
        self.drafter = drafter

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.drafter, *args)


def micro_plan(n_micro: int, world: World) -> list[int]:
    """The micro-batches of a step this rank runs (the config checks global_batch against batch_sequences;
    this, the split over ranks, which only the launch knows)."""
    if n_micro % world.size:
        raise ValueError(f"train.global_batch: its {n_micro} micro-batches do not split evenly over {world.size} processes")
    return list(range(world.rank, n_micro, world.size))


class Trainable:
    """A drafter wrapped by one launcher, with its optimizer."""

    def __init__(self, drafter: nn.Module, launcher: str, world: World, tc: Any, accum: int, bf16: bool):
        self.launcher, self.world, self.accum = launcher, world, accum
        self.drafter = drafter.to(world.device)
        self.clip = tc.grad_clip or float("inf")
        loss_module = LossModule(self.drafter)
        self._plain: nn.Module | None = None
        self.engine = None
        if launcher == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            self._plain = copy.deepcopy(drafter).cpu() if world.main else None  # receives the full weights
            mesh = init_device_mesh(world.device.type, (world.size,))
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
            self.module: nn.Module = fully_shard(loss_module, mesh=mesh, **({"mp_policy": policy} if policy else {}))
        elif launcher == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(loss_module, device_ids=[world.device.index] if world.device.type == "cuda"
                                                  else None, find_unused_parameters=True)
        else:
            self.module = loss_module
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.params = params
        # One fused kernel over all parameters where they are plain tensors: the per-tensor loop costs a
        # quarter of a small drafter's CPU step; sharded (FSDP2) and DeepSpeed-wrapped parameters keep the default.
        fused = {"fused": True} if launcher in ("none", "ddp") else {}
        self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.95),
                                                                  weight_decay=tc.weight_decay, **fused)
        if launcher == "deepspeed":
            import deepspeed

            if tc.zero_stage == 3:
                self._plain = copy.deepcopy(drafter).cpu() if world.main else None
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=loss_module, model_parameters=params, optimizer=self.optimizer,
                config=deepspeed_config(tc, world.size, bf16), dist_init_required=False)
            self.module = self.engine

    # ---- one optimizer step ----------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.module(fn, *args)

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        """Around one forward + backward: gradients are reduced across ranks only on the step's last one."""
        if self.launcher == "ddp" and not last:
            with self.module.no_sync():
                yield
            return
        if self.launcher == "fsdp2":
            self.module.set_requires_gradient_sync(last)
        elif self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, loss: Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss / self.accum if self.accum > 1 else loss)
        else:
            loss.backward()

    def step(self, lr: float) -> float:
        """Average the accumulated gradients, clip, step; returns the gradient norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        if self.accum > 1:
            for p in self.params:
                if p.grad is not None:
                    p.grad.div_(self.accum)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    # ---- weights and train state -----------------------------------------------------------------
    def full_drafter(self) -> nn.Module | None:
        """The drafter with the current full weights, on rank 0 (None elsewhere). Collective: every rank calls."""
        if self.launcher == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return self._load_plain(state)
        if self._zero3():
            return self._load_plain(self.engine._zero3_consolidated_16bit_state_dict())  # gathered on rank 0
        return self.drafter if self.world.main else None

    def _zero3(self) -> bool:
        return self.engine is not None and self.engine.zero_optimization_stage() == 3

    def _load_plain(self, state: dict[str, Tensor] | None) -> nn.Module | None:
        if not self.world.main or state is None:
            return None
        prefix = "drafter."
        self._plain.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        return self._plain

    def save_state(self, directory: Path) -> None:
        """The sharded train state (weights and optimizer): torch.distributed.checkpoint for none / ddp / fsdp2,
        which reshards on load, so a resume may use another world size; DeepSpeed's own for deepspeed.
        Collective; `directory` must be empty or absent."""
        if self.engine is not None:
            self.engine.save_checkpoint(str(directory), tag="zero", save_latest=False)
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        with _one_process_ok():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory / "dcp"),
                     no_dist=not dist.is_initialized())

    def load_state(self, directory: Path) -> None:
        if self.engine is not None:
            path, _ = self.engine.load_checkpoint(str(directory), tag="zero")
            if path is None:
                raise FileNotFoundError(f"{directory}: no DeepSpeed train state (was it written by another launcher?)")
            return
        if not (directory / "dcp").is_dir():
            raise FileNotFoundError(f"{directory / 'dcp'}: no train state (was it written by the deepspeed launcher?)")
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        with _one_process_ok():
            dcp.load(state, checkpoint_id=str(directory / "dcp"), no_dist=not dist.is_initialized())
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


@contextlib.contextmanager
def _one_process_ok() -> Iterator[None]:
    """torch.distributed.checkpoint warns that it assumes one process when no group exists: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def deepspeed_config(tc: Any, world_size: int, bf16: bool) -> dict[str, Any]:
    """DeepSpeed's config generated from ours: we drive accumulation (the boundary is set per backward) and
    the learning rate; DeepSpeed reduces, partitions (ZeRO `zero_stage`) and clips."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": tc.grad_clip or 0.0,
        "zero_optimization": {"stage": tc.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def save_checkpoint(world: World, trainable: Trainable, directory: Path, state: dict[str, Any]) -> None:
    """checkpoint/: model/ (the HF-style drafter folder, written by rank 0) and train_state/ (sharded, every
    rank). Written under a temporary sibling and renamed by rank 0, so a killed run keeps the previous one."""
    tmp = directory.with_name(f".{directory.name}.partial")  # one name all ranks agree on
    if world.main and tmp.exists():
        shutil.rmtree(tmp)
    world.barrier()
    drafter = trainable.full_drafter()
    if world.main:
        drafter.save(tmp / "model")
    trainable.save_state(tmp / "train_state")
    world.barrier()
    if world.main:
        (tmp / "train_state" / "state.json").write_text(json.dumps(state, indent=2))
        io.replace_dir(tmp, directory)
    world.barrier()
