"""`deepspec train`: distil a drafter from the feature cache.

AdamW, linear warmup then cosine decay, gradient clipping and accumulation, seeded data order. Every
`save_every` steps the drafter and its train state go to `checkpoint/` (HF-style folder + optimizer
state loaded with `weights_only=True`); a restarted run resumes from there and, because the data
order is a function of (seed, epoch) and nothing else is random, continues exactly as an uninterrupted
run would. The feature cache and its soft targets are read a micro-batch at a time (`FeatureStore`), so
memory does not grow with the cache. Per step it logs the loss and top-1 accuracy of each training-time-test
step, the learning rate, tokens/s and the peak resident (and GPU) memory to MLflow; `train_log.jsonl` keeps
the same rows for the report's curves.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from deepspec import io, tracking
from deepspec.config import Config
from deepspec.config_base import TrainConfig
from deepspec.devices import bf16_autocast, on, peak_memory_mb
from deepspec.drafters.registry import KINDS
from deepspec.features.extract import LAYER_CONVENTION, FeatureStore, drafter_layers, load_manifest
from deepspec.layout import drafter_dir, drafter_model, features_dir, train_data_file
from deepspec.training.distributed import Trainable, World, join, leave, micro_plan, save_checkpoint
from deepspec.training.targets import cached_soft_targets, draft_vocab, supervised, target_to_draft, training_targets


def lr_at(step: int, total: int, dc) -> float:
    t = dc.train
    warmup = t.warmup_steps if t.warmup_ratio is None else round(t.warmup_ratio * total)
    if step < warmup:
        return t.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def split(n: int, tc: TrainConfig, where: str) -> tuple[list[int], list[int]]:
    """(validation, training) sequence indices of a cache of `n`: a seeded shuffle, validation first (at most a
    fifth), then `train_sequences` of the rest (all when null). The validation set does not depend on
    `train_sequences`, so runs that train on less of one cache are scored on the same sequences."""
    perm = _order(n, tc.seed, -1)
    n_val, n_train = tc.split_sizes(n)
    if tc.train_sequences is not None and tc.train_sequences > n_train:
        raise ValueError(f"{where}.train_sequences: {tc.train_sequences}, but the training split holds {n_train} "
                         f"sequences ({n} in the cache, {n_val} for validation)")
    return perm[:n_val], perm[n_val : n_val + n_train]


def _batch(train_idx: list[int], micro: int, per: int, seed: int) -> list[int]:
    """Sequences of global micro-batch `micro`: a pure function of the step, so resume is exact."""
    per_epoch = max(1, len(train_idx) // per)
    epoch, i = divmod(micro, per_epoch)
    order = _order(len(train_idx), seed, epoch)
    return [train_idx[j] for j in order[i * per : (i + 1) * per]]


def train(cfg: Config, name: str, on_step: Callable[[int], None] | None = None) -> Path:
    """Train drafter `name` under its launcher (`train.distributed`); resumes from its checkpoint, at any
    world size for none / ddp / fsdp2. `on_step(step)` runs after each optimizer step and its checkpoint
    (a test stops the run there as a crash would, to check the exact resume)."""
    if name not in cfg.drafters:
        raise ValueError(f"drafter {name!r} is not in the config (drafters: {', '.join(cfg.drafters) or 'none'})")
    world = join(cfg.drafters[name].train.distributed)
    try:
        with tracking.stage_run(cfg, "train", f"train {name}", enabled=world.main, drafter=name) as run:
            t = _Training(cfg, name, world, run)
            t.resume()
            t.announce()
            bar = tqdm(total=t.total, initial=t.step, desc=f"train {name}", unit="step", dynamic_ncols=True,
                       disable=not world.main)
            while t.step < t.total:
                row = t.optimize()
                if t.val_idx and (t.step % t.tc.eval_every == 0 or t.step == t.total):
                    row.update(t.validate())
                t.log(row, bar)
                if t.step % t.tc.save_every == 0 or t.step == t.total:
                    t.checkpoint()
                if on_step is not None:
                    on_step(t.step)
            bar.close()
            return t.finish()
    finally:
        leave()


def step_seconds(cfg: Config, name: str, steps: int = 12, untimed: int = 2) -> tuple[float, float]:
    """Seconds per optimizer step of drafter `name` on this machine now, timed over `steps` steps after
    `untimed` ones (one process; nothing saved or logged), and its optimizer steps per epoch. A benchmark turns
    a budget in seconds into a fixed step count with them, so that the machine's pace while a run trains
    cannot change how far it gets."""
    world = join("none")
    try:
        t = _Training(cfg, name, world, tracking.NoRun())
        t.sized = True  # a fixed number of steps: no re-sizing from a log this probe does not keep
        for _ in range(untimed):
            t.optimize()
        start = t.wall
        for _ in range(steps):
            t.optimize()
        return (t.wall - start) / steps, t.per_epoch
    finally:
        leave()


class _Training:
    """One training run's state, and the steps the loop in `train` takes over it."""

    def __init__(self, cfg: Config, name: str, world: World, run):
        """Features and labels (train / validation split, draft vocabulary, soft targets), a fresh drafter
        of the config's kind, its launcher wrapper, and the step plan."""
        from deepspec.models import load_model

        self.cfg, self.name, self.world, self.run = cfg, name, world, run
        self.dc = dc = cfg.drafters[name]
        self.tc = tc = dc.train
        self.kind = KINDS[dc.kind]
        self.out = drafter_dir(cfg, name)
        self.say = print if world.main else (lambda *a, **k: None)
        torch.set_num_threads(tc.threads or max(1, (os.cpu_count() or 1) // world.size))
        online = cfg.features.extract == "online"
        sections = {"drafter": cfg.section_hash("drafters", name), "train_data": cfg.section_hash("train_data"),
                    "features": cfg.section_hash("features"), "target": cfg.section_hash("target")}
        t_soft = time.perf_counter()
        if online:  # the target's states computed here, per sequence, and no cache
            from deepspec.features.online import OnlineFeatures, OnlineSoftTargets
            from deepspec.models import load_target

            run.tags(tracking.lineage({"train_data": train_data_file(cfg)}, sections))
            target = load_target(cfg.target.model, cfg.target.dtype, cfg.target.backend,
                                 max(cfg.target.max_len, cfg.features.max_len), world.device)
            loaded, convention = target.loaded, LAYER_CONVENTION
            self.layers = drafter_layers(cfg, name, loaded.model.config.num_hidden_layers)
            self.store = store = OnlineFeatures(cfg, target, self.layers, world.device)
            lm_head = loaded.model.get_output_embeddings().weight.detach().float()
            self.soft, self.soft_reused = OnlineSoftTargets(store, lm_head, dc.soft_top_k), False
        else:
            fdir = features_dir(cfg)
            manifest = load_manifest(fdir)
            run.tags(tracking.lineage({"feature_manifest": fdir / "manifest.json"}, sections))
            loaded, convention = load_model(cfg.target.model, cfg.target.dtype), manifest["layer_convention"]
            if manifest["target_fingerprint"] != loaded.fingerprint:
                raise ValueError(f"{fdir}: features were extracted from another target ({manifest['target_fingerprint']})")
            self.layers = drafter_layers(cfg, name, loaded.model.config.num_hidden_layers)
            self.store = store = FeatureStore(fdir, manifest, self.layers)
            lm_head = loaded.model.get_output_embeddings().weight.detach().float()
            if not world.main:
                world.barrier()  # rank 0 computes and stores the soft targets; the others read them
            self.soft, self.soft_reused = cached_soft_targets(fdir, manifest, store, lm_head, dc.soft_top_k)
            if world.main:
                world.barrier()
        self.soft_s = time.perf_counter() - t_soft
        self.val_idx, self.train_idx = split(len(store), tc, f"drafters.{name}.train")
        vocab_size = loaded.model.config.vocab_size
        mass: list[tuple[float, int]] = []  # top-k mass kept and positions, per sequence, counted on the one pass

        def counted(i: int) -> dict[str, torch.Tensor]:
            st = self.soft[i]
            mass.append((float(st["top_logp"].exp().sum()), int(st["top_logp"].shape[0])))
            return st

        self.draft_ids, self.coverage = draft_vocab(
            (counted(i) for i in self.train_idx),
            (supervised(store.loss_mask(i), dc.supervise) for i in self.train_idx), vocab_size, dc.draft_vocab,
            dc.vocab_coverage)
        meta = {"target": cfg.target.model, "target_fingerprint": loaded.fingerprint, "layer_convention": convention}
        model = self.kind.new_drafter(dc, loaded.model, loaded.tokenizer, self.layers, self.draft_ids,
                                      (store.sequence(i)["hidden"] for i in self.train_idx), meta, f"drafters.{name}",
                                      self.say)
        self.steps = self.kind.steps(dc, model)
        self.lookup = target_to_draft(self.draft_ids, vocab_size)
        masks = [store.loss_mask(i) for i in self.train_idx]
        self.counts = {"train_tokens": sum(int(m.numel()) for m in masks),
                       "supervised_positions": sum(int(supervised(m, dc.supervise).sum()) for m in masks),
                       "assistant_positions": sum(int(supervised(m, "assistant").sum()) for m in masks)}
        del masks
        # Validation always scores the assistant positions, where the target writes at inference, so recipes
        # are compared on the same examples; it is small and stays in memory.
        self.val = [(counted(i), self.example(i, "assistant"))[1] for i in self.val_idx]
        self.mass = sum(m for m, _ in mass) / max(sum(n for _, n in mass), 1)
        self.per = min(tc.batch_sequences, len(self.train_idx))
        self.n_micro = tc.sequences_per_step // tc.batch_sequences  # micro-batches of `per` sequences per step
        self.mine = micro_plan(self.n_micro, world)
        self.per_epoch = tc.steps_per_epoch(len(self.train_idx))
        self.total = tc.total_steps(len(self.train_idx))
        self.sized = tc.wall_budget_s is None  # a wall budget fixes `total` once the first steps are timed
        if not self.sized:
            self.total = max(self.total, _PROBE_STEPS + 1)
        self.amp = tc.precision == "bfloat16" or (tc.precision == "auto" and world.device.type == "cuda")
        self.n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.trainable = Trainable(model, tc.distributed, world, tc, self.n_micro // world.size, self.amp)
        if world.device.type != "cpu":
            self.val = [(_to(s, world.device), _to(t, world.device)) for s, t in self.val]
        self.step, self.history, self.wall = 0, [], 0.0  # wall: training time so far (validation excluded)

    def example(self, i: int, supervise: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Sequence `i` read from the cache, with its labels (`training_targets`) under `supervise`."""
        seq = self.store.sequence(i)
        return seq, training_targets(self.soft[i], seq["loss_mask"], self.lookup, supervise)

    @property
    def log_path(self) -> Path:
        return self.out / "train_log.jsonl"

    def resume(self) -> None:
        """Continue from the checkpoint when one was written for this very config."""
        ckpt = self.out / "checkpoint"
        state_file = ckpt / "train_state" / "state.json"
        if not state_file.is_file():
            return
        state = json.loads(state_file.read_text())
        if state["config_hash"] != _train_hash(self.cfg, self.name):
            return
        written = state.get("launcher_state", "dcp")
        if written != _state_kind(self.tc.distributed):
            raise ValueError(f"{ckpt}: train state written by the {written} launcher family; resume with it, "
                             f"or delete the folder to start over")
        self.trainable.load_state(ckpt / "train_state")
        self.step = state["step"]
        if not self.sized and state.get("sized", True):
            self.total, self.sized = state["total"], True  # sized from the first steps' time by the run that wrote it
        history = io.read_jsonl(self.log_path) if self.log_path.is_file() else []
        self.history = [r for r in history if r["step"] <= self.step]
        self.wall = self.history[-1].get("wall_s", 0.0) if self.history else 0.0
        self.say(f"[train] {self.name}: resuming at step {self.step}/{self.total} on {self.world.size} process(es) "
                 f"(written by {state.get('world_size', 1)})")

    def announce(self) -> None:
        """The run's parameters to MLflow and one summary line to the console."""
        dc, tc, c = self.dc, self.tc, self.counts
        self.run.params({"drafter": self.name, "algorithm": dc.kind, "layers": self.layers,
                         "draft_vocab": int(self.draft_ids.numel()), "vocab_coverage": round(self.coverage, 4),
                         "train_sequences": len(self.train_idx), "val_sequences": len(self.val_idx), **c,
                         "soft_topk_mass": round(self.mass, 4), "soft_targets_s": round(self.soft_s, 1),
                         "total_steps": self.total, "parameters": self.n_params, "bf16_autocast": self.amp,
                         "world_size": self.world.size, "micro_batches_per_step": self.n_micro,
                         **{f"train.{k}": v for k, v in tc.model_dump().items()},
                         **{k: v for k, v in dc.model_dump().items()
                            if k not in ("train", "kind", "layers", "draft_vocab", "vocab_coverage")}})
        self.say(f"[train] {self.name}: {len(self.train_idx)} train / {len(self.val_idx)} val sequences "
                 f"({c['train_tokens']} tokens; supervised {c['supervised_positions']} positions, "
                 f"{c['assistant_positions']} of them before a target-written token), layers {self.layers}, draft vocab "
                 f"{self.draft_ids.numel()} covering {100 * self.coverage:.1f}% of supervised argmaxes, top-{dc.soft_top_k} "
                 f"soft targets keep {100 * self.mass:.1f}% of the mass ({self.soft_s:.0f} s"
                 f"{', stored by an earlier run' if self.soft_reused else ''}), {self.n_params / 1e6:.2f}M parameters, "
                 f"{self.total} steps of {self.n_micro} x {self.per} sequences on {self.world.size} "
                 f"{self.world.device.type} process(es) ({tc.distributed})")
        self.trainable.train()

    def optimize(self) -> dict[str, Any]:
        """One optimizer step over this step's micro-batches; its log row."""
        tc, world = self.tc, self.world
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.total, self.dc)
        local = []
        for j, m in enumerate(self.mine):
            micro = self.step * self.n_micro + m
            batch = _batch(self.train_idx, micro, self.per, tc.seed)
            gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + micro)  # anchors
            examples = [self.example(i, self.dc.supervise) for i in batch]
            if world.device.type != "cpu":
                examples = [(_to(s, world.device), _to(t, world.device)) for s, t in examples]
            with bf16_autocast(world.device, self.amp), on(world.device):
                local.append((m, self.kind.run_batch(self.trainable, self.dc, [s for s, _ in examples],
                                                     [t for _, t in examples], True, gen,
                                                     last=j == len(self.mine) - 1)))
        grad_norm = self.trainable.step(lr)
        parts = world.gather((local, peak_memory_mb(world.device)))
        stats = [st for _, st in sorted((x for part, _ in parts for x in part), key=lambda x: x[0])]
        self.step += 1
        elapsed = time.perf_counter() - t0
        self.wall += elapsed
        n = len(stats)
        seen = self.step * self.n_micro * self.per
        row: dict[str, Any] = {"step": self.step, "lr": lr, "loss": sum(s["loss"] for s in stats) / n,
                               "grad_norm": grad_norm, "tokens_per_s": sum(s["tokens"] for s in stats) / elapsed,
                               "wall_s": self.wall, "epoch": seen / max(len(self.train_idx), 1),
                               "train_tokens_seen": seen * self.counts["train_tokens"] / max(len(self.train_idx), 1),
                               **{k: max(peak[k] for _, peak in parts) for k in parts[0][1]}}  # the largest rank
        for k in range(self.steps):
            row[f"loss_{k}"] = sum(s["loss_step"][k] for s in stats) / n
            row[f"acc_{k}"] = sum(s["acc_step"][k] for s in stats) / n
        for k in ("l1", "bce"):
            if k in stats[0]:
                row[k] = sum(s[k] for s in stats) / n
        if not self.sized and self.step % _PROBE_STEPS == 0:
            # Re-sized every few steps at the recent pace (the first steps of a process are often slow), until
            # most of the budget is spent; every rank takes rank 0's count, so all stop at the same step.
            first = self.step == _PROBE_STEPS
            self.total = world.gather(_sized_total(tc.wall_budget_s, self.history, self.step, self.wall))[0]
            self.sized = self.wall >= _SIZED_FRACTION * tc.wall_budget_s
            if first:
                self.say(f"[train] {self.name}: {self.total} steps fit the {tc.wall_budget_s:.0f} s budget at the "
                         f"first steps' pace (re-sized as it goes)")
        return row

    def validate(self) -> dict[str, Any]:
        """Validation loss, teacher-forced chain τ and accuracy by step (on every rank: FSDP2 gathers weights
        in each forward)."""
        self.trainable.train(False)
        with bf16_autocast(self.world.device, self.amp), on(self.world.device):
            v = self.kind.run_batch(self.trainable, self.dc, [s for s, _ in self.val], [t for _, t in self.val],
                                    False, None)
        self.trainable.train()
        return {"val_loss": v["loss"], "val_tau_chain": v["tau_chain"],
                **{f"val_acc_{k}": v["acc_step"][k] for k in range(self.steps)}}

    def log(self, row: dict[str, Any], bar) -> None:
        self.history.append(row)
        self.run.metrics({k: v for k, v in row.items() if k != "step"}, step=self.step)
        bar.total = self.total
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc0=f"{row['acc_0']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}",
                        **({"val_tau": f"{row['val_tau_chain']:.2f}"} if "val_tau_chain" in row else {}))

    def checkpoint(self) -> None:
        if self.world.main:
            io.write_jsonl(self.log_path, self.history)
        save_checkpoint(self.world, self.trainable, self.out / "checkpoint",
                        {"step": self.step, "config_hash": _train_hash(self.cfg, self.name), "total": self.total,
                         "sized": self.sized, "world_size": self.world.size,
                         "launcher_state": _state_kind(self.tc.distributed)})

    def finish(self) -> Path:
        """The full drafter (gathered on rank 0), what its kind fits on held-out data, the saved model and
        the summary metrics."""
        out, name, dc = self.out, self.name, self.dc
        final = self.trainable.full_drafter()  # collective; the full weights land on rank 0
        if not self.world.main:
            self.world.barrier()
            return out
        final = final.cpu()
        io.write_jsonl(self.log_path, self.history)
        fitted = self.kind.after_training(final, dc, [_to(s, "cpu") for s, _ in self.val],
                                          [_to(t, "cpu") for _, t in self.val])
        if fitted is not None:
            io.write_json(out / fitted.file, fitted.data)
            self.run.artifact(out / fitted.file)
            for line in fitted.lines:
                self.say(f"[train] {name}: {line}")
        final.save(drafter_model(self.cfg, name))
        last_val = next((r for r in reversed(self.history) if "val_tau_chain" in r), {})
        summary = {"drafter": name, "steps": self.total, "train_sequences": len(self.train_idx),
                   "val_sequences": len(self.val_idx), "train_tokens": self.counts["train_tokens"],
                   "supervise": dc.supervise, "supervised_positions": self.counts["supervised_positions"],
                   "assistant_positions": self.counts["assistant_positions"], "layers": self.layers,
                   "draft_vocab": int(self.draft_ids.numel()), "vocab_coverage": self.coverage,
                   "final_loss": self.history[-1]["loss"], "val_loss": last_val.get("val_loss"),
                   "val_tau_chain": last_val.get("val_tau_chain"),
                   "val_acc": [last_val.get(f"val_acc_{k}") for k in range(self.steps)], "algorithm": dc.kind,
                   **(fitted.summary if fitted is not None else {}), "config_hash": _train_hash(self.cfg, name),
                   **{k: max(r.get(k, 0.0) for r in self.history)
                      for k in ("peak_rss_mb", "peak_device_mb") if k in self.history[-1]}}
        io.write_json(out / "metrics.json", summary)
        self.run.artifact(out / "metrics.json")
        self.run.artifact(drafter_model(self.cfg, name), "drafter")  # the whole HF-style folder: config.json + model.safetensors
        acc = ", ".join(f"{a:.2f}" for a in summary["val_acc"] if a is not None)
        self.say(f"[train] {name}: {self.total} steps, final loss {summary['final_loss']:.3f}; validation: "
                 f"chain tau {summary['val_tau_chain'] or float('nan'):.2f}, top-1 accuracy by step [{acc}]")
        self.world.barrier()
        return out


_PROBE_STEPS = 10  # a wall-time budget re-sizes the schedule every this many steps (the first two not timed)
_SIZED_FRACTION = 0.9  # ... until this share of the budget is spent


def _sized_total(budget_s: float, history: list[dict[str, Any]], step: int, wall: float) -> int:
    """Total steps that end training after `budget_s` seconds, at the pace of the last `_PROBE_STEPS` steps
    (of steps 3..`step` at the first sizing)."""
    since = max(2, step - _PROBE_STEPS)
    start = next(r["wall_s"] for r in history if r["step"] == since)
    per_step = (wall - start) / (step - since)
    return max(step, round(step + (budget_s - wall) / max(per_step, 1e-9)))


def _state_kind(launcher: str) -> str:
    """Train-state format: torch.distributed.checkpoint (none / ddp / fsdp2, interchangeable) or DeepSpeed's."""
    return "deepspeed" if launcher == "deepspeed" else "dcp"


def _to(d: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}


def _train_hash(cfg: Config, name: str) -> str:
    return cfg.section_hash("drafters", name) + cfg.section_hash("train_data") + cfg.section_hash("features")
