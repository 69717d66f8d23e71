"""`deepspec train`: distil a drafter from the feature cache.

AdamW, linear warmup then cosine decay, gradient clipping and accumulation, seeded data order. Every
`save_every` steps the drafter and its train state go to `checkpoint/` (HF-style folder + optimizer
state loaded with `weights_only=True`); a restarted run resumes from there and, because the data
order is a function of (seed, epoch) and nothing else is random, continues exactly as an uninterrupted
run would. Per step it logs the loss and top-1 accuracy of each training-time-test step, the learning
rate and tokens/s to MLflow; `train_log.jsonl` keeps the same rows for the report's curves.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from deepspec import io, tracking
from deepspec.config import Config
from deepspec.devices import bf16_autocast, on
from deepspec.drafters.registry import KINDS
from deepspec.features.extract import drafter_layers, features_dir, load_manifest, load_sequences
from deepspec.training.distributed import Trainable, World, join, leave, micro_plan, save_checkpoint
from deepspec.training.targets import cached_soft_targets, draft_vocab, supervised, topk_mass, training_targets


def drafter_dir(cfg: Config, name: str) -> Path:
    return cfg.out_dir / "drafters" / name


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


def _batch(train_idx: list[int], micro: int, per: int, seed: int) -> list[int]:
    """Sequences of global micro-batch `micro`: a pure function of the step, so resume is exact."""
    per_epoch = max(1, len(train_idx) // per)
    epoch, i = divmod(micro, per_epoch)
    order = _order(len(train_idx), seed, epoch)
    return [train_idx[j] for j in order[i * per : (i + 1) * per]]


def train(cfg: Config, name: str, stop_after_steps: int | None = None) -> Path:
    """Train drafter `name` under its launcher (`train.distributed`); resumes from its checkpoint, at any
    world size for none / ddp / fsdp2. `stop_after_steps` ends the run early as a crash would (tests use
    it to check the exact resume)."""
    if name not in cfg.drafters:
        raise ValueError(f"drafter {name!r} is not in the config (drafters: {', '.join(cfg.drafters) or 'none'})")
    world = join(cfg.drafters[name].train.distributed)
    try:
        return _train(cfg, name, world, stop_after_steps)
    finally:
        leave()


def _train(cfg: Config, name: str, world: World, stop_after_steps: int | None) -> Path:
    from deepspec.models import load_model

    dc = cfg.drafters[name]
    tc = dc.train
    out = drafter_dir(cfg, name)
    ckpt = out / "checkpoint"
    log_path = out / "train_log.jsonl"
    say = print if world.main else (lambda *a, **k: None)
    torch.set_num_threads(tc.threads or max(1, (os.cpu_count() or 1) // world.size))
    fdir = features_dir(cfg)
    with tracking.stage_run(cfg, "train", f"train {name}", enabled=world.main, drafter=name) as run:
        manifest = load_manifest(fdir)
        run.tags(tracking.lineage({"feature_manifest": fdir / "manifest.json"},
                                  {"drafter": cfg.section_hash("drafters", name), "train_data": cfg.section_hash("train_data"),
                                   "features": cfg.section_hash("features"), "target": cfg.section_hash("target")}))
        loaded = load_model(cfg.target.model, cfg.target.dtype)
        if manifest["target_fingerprint"] != loaded.fingerprint:
            raise ValueError(f"{fdir}: features were extracted from another target ({manifest['target_fingerprint']})")
        n_layers = loaded.model.config.num_hidden_layers
        layers = drafter_layers(cfg, name, n_layers)
        seqs = load_sequences(fdir, manifest, layers)
        perm = _order(len(seqs), tc.seed, -1)
        n_val = min(tc.val_sequences, len(seqs) // 5)
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        lm_head = loaded.model.get_output_embeddings().weight.detach().float()
        t_soft = time.perf_counter()
        if not world.main:
            world.barrier()  # rank 0 computes and stores the soft targets; the others read them
        cached, reused = cached_soft_targets(fdir, manifest, seqs, lm_head, dc.soft_top_k)
        if world.main:
            world.barrier()
        for s in seqs:
            del s["final"]  # only the cached top-k is needed from here on
        soft_s = time.perf_counter() - t_soft
        train_masks = [supervised(seqs[i]["loss_mask"], dc.supervise) for i in train_idx]
        vocab_size = loaded.model.config.vocab_size
        draft_ids, coverage = draft_vocab([cached[i] for i in train_idx], train_masks, vocab_size, dc.draft_vocab,
                                          dc.vocab_coverage)
        per = min(tc.batch_sequences, len(train_idx))
        micro_per_epoch = max(1, len(train_idx) // per)
        n_micro = tc.sequences_per_step // tc.batch_sequences  # micro-batches of `per` sequences per step
        mine = micro_plan(n_micro, world)
        total = max(1, math.ceil(tc.epochs * micro_per_epoch / n_micro))
        kind = KINDS[dc.kind]
        meta = {"target": cfg.target.model, "target_fingerprint": loaded.fingerprint,
                "layer_convention": manifest["layer_convention"]}
        model = kind.new_drafter(dc, loaded.model, loaded.tokenizer, layers, draft_ids,
                                 [seqs[i]["hidden"] for i in train_idx], meta, f"drafters.{name}", say)
        steps = kind.steps(dc, model)
        lookup = torch.full((vocab_size,), -1, dtype=torch.long)
        lookup[draft_ids] = torch.arange(draft_ids.numel())
        # Training follows `supervise`; validation always scores the assistant positions, where the target
        # writes at inference, so recipes are compared on the same examples.
        val_set = set(val_idx)
        labels = [training_targets(cached[i], s["loss_mask"], lookup, "assistant" if i in val_set else dc.supervise)
                  for i, s in enumerate(seqs)]
        mass = topk_mass(cached)
        del cached
        amp = tc.precision == "bfloat16" or (tc.precision == "auto" and world.device.type == "cuda")
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trainable = Trainable(model, tc.distributed, world, tc, n_micro // world.size, amp)
        if world.device.type != "cpu":
            seqs, labels = [_to(s, world.device) for s in seqs], [_to(t, world.device) for t in labels]
        step = 0
        history: list[dict[str, Any]] = []
        state_file = ckpt / "train_state" / "state.json"
        sized = tc.wall_budget_s is None  # a wall budget fixes `total` once the first steps are timed
        if not sized:
            total = max(total, _PROBE_STEPS + 1)
        if state_file.is_file():
            state = json.loads(state_file.read_text())
            if state["config_hash"] == _train_hash(cfg, name):
                written = state.get("launcher_state", "dcp")
                if written != _state_kind(tc.distributed):
                    raise ValueError(f"{ckpt}: train state written by the {written} launcher family; resume with it, "
                                     f"or delete the folder to start over")
                trainable.load_state(ckpt / "train_state")
                step = state["step"]
                if not sized and state.get("sized", True):
                    total, sized = state["total"], True  # sized from the first steps' time by the run that wrote it
                history = [r for r in io.read_jsonl(log_path)] if log_path.is_file() else []
                history = [r for r in history if r["step"] <= step]
                say(f"[train] {name}: resuming at step {step}/{total} on {world.size} process(es) "
                    f"(written by {state.get('world_size', 1)})")
        tokens_total = sum(int(seqs[i]["input_ids"].numel()) for i in train_idx)
        supervised_total = sum(int(m.sum()) for m in train_masks)
        assistant_total = sum(int(supervised(seqs[i]["loss_mask"], "assistant").sum()) for i in train_idx)
        run.params({"drafter": name, "algorithm": dc.kind, "layers": layers, "draft_vocab": int(draft_ids.numel()),
                    "vocab_coverage": round(coverage, 4), "train_sequences": len(train_idx), "val_sequences": n_val,
                    "train_tokens": tokens_total, "supervised_positions": supervised_total,
                    "assistant_positions": assistant_total, "soft_topk_mass": round(mass, 4),
                    "soft_targets_s": round(soft_s, 1), "total_steps": total, "parameters": n_params,
                    "bf16_autocast": amp, "world_size": world.size, "micro_batches_per_step": n_micro,
                    **{f"train.{k}": v for k, v in tc.model_dump().items()},
                    **{k: v for k, v in dc.model_dump().items() if k not in ("train", "kind", "layers", "draft_vocab", "vocab_coverage")}})
        say(f"[train] {name}: {len(train_idx)} train / {n_val} val sequences ({tokens_total} tokens; supervised "
            f"{supervised_total} positions, {assistant_total} of them before a target-written token), layers {layers}, "
            f"draft vocab {draft_ids.numel()} covering {100 * coverage:.1f}% of supervised argmaxes, "
            f"top-{dc.soft_top_k} soft targets keep {100 * mass:.1f}% of the mass ({soft_s:.0f} s"
            f"{', stored by an earlier run' if reused else ''}), {n_params / 1e6:.2f}M parameters, {total} steps of "
            f"{n_micro} x {per} sequences on {world.size} {world.device.type} process(es) ({tc.distributed})")
        trainable.train()
        bar = tqdm(total=total, initial=step, desc=f"train {name}", unit="step", dynamic_ncols=True, disable=not world.main)
        ran = 0
        wall = history[-1].get("wall_s", 0.0) if history else 0.0  # training time so far (validation excluded)
        while step < total:
            if stop_after_steps is not None and ran >= stop_after_steps:
                bar.close()
                raise KeyboardInterrupt(f"stopped after {ran} steps (test hook)")
            t0 = time.perf_counter()
            lr = lr_at(step, total, dc)
            local = []
            for j, m in enumerate(mine):
                batch = _batch(train_idx, step * n_micro + m, per, tc.seed)
                gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step * n_micro + m)  # anchors
                with bf16_autocast(world.device, amp), on(world.device):
                    local.append((m, kind.run_batch(trainable, dc, [seqs[i] for i in batch], [labels[i] for i in batch], True, gen,
                                                   last=j == len(mine) - 1)))
            grad_norm = trainable.step(lr)
            stats = [st for _, st in sorted((x for part in world.gather(local) for x in part), key=lambda x: x[0])]
            step += 1
            ran += 1
            elapsed = time.perf_counter() - t0
            wall += elapsed
            if not sized and step == _PROBE_STEPS:
                total = _sized_total(tc.wall_budget_s, history, step, wall)
                sized = True
                bar.total = total
                say(f"[train] {name}: {total} steps fit the {tc.wall_budget_s:.0f} s budget")
            tokens = sum(s["tokens"] for s in stats)
            row: dict[str, Any] = {"step": step, "lr": lr, "loss": sum(s["loss"] for s in stats) / len(stats),
                                   "grad_norm": grad_norm, "tokens_per_s": tokens / elapsed, "wall_s": wall,
                                   "epoch": step * n_micro * per / max(len(train_idx), 1),
                                   "train_tokens_seen": step * n_micro * per * tokens_total / max(len(train_idx), 1)}
            for k in range(steps):
                row[f"loss_{k}"] = sum(s["loss_step"][k] for s in stats) / len(stats)
                row[f"acc_{k}"] = sum(s["acc_step"][k] for s in stats) / len(stats)
            for k in ("l1", "bce"):
                if k in stats[0]:
                    row[k] = sum(s[k] for s in stats) / len(stats)
            if n_val and (step % tc.eval_every == 0 or step == total):
                trainable.train(False)
                with bf16_autocast(world.device, amp), on(world.device):  # on every rank: FSDP2 gathers weights in each forward
                    v = kind.run_batch(trainable, dc, [seqs[i] for i in val_idx], [labels[i] for i in val_idx], False, None)
                trainable.train()
                row.update({"val_loss": v["loss"], "val_tau_chain": v["tau_chain"],
                            **{f"val_acc_{k}": v["acc_step"][k] for k in range(steps)}})
            history.append(row)
            run.metrics({k: v for k, v in row.items() if k != "step"}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc0=f"{row['acc_0']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}",
                            **({"val_tau": f"{row['val_tau_chain']:.2f}"} if "val_tau_chain" in row else {}))
            if step % tc.save_every == 0 or step == total:
                if world.main:
                    io.write_jsonl(log_path, history)
                save_checkpoint(world, trainable, ckpt, {"step": step, "config_hash": _train_hash(cfg, name), "total": total, "sized": sized,
                                                         "world_size": world.size,
                                                         "launcher_state": _state_kind(tc.distributed)})
        bar.close()
        final = trainable.full_drafter()  # collective; the full weights land on rank 0
        if not world.main:
            world.barrier()
            return out
        final = final.cpu()
        io.write_jsonl(log_path, history)
        fitted = kind.after_training(final, dc, [_to(seqs[i], "cpu") for i in val_idx],
                                     [_to(labels[i], "cpu") for i in val_idx])
        if fitted is not None:
            io.write_json(out / fitted.file, fitted.data)
            run.artifact(out / fitted.file)
            for line in fitted.lines:
                say(f"[train] {name}: {line}")
        final.save(out / "model")
        last_val = next((r for r in reversed(history) if "val_tau_chain" in r), {})
        summary = {"drafter": name, "steps": total, "train_tokens": tokens_total, "supervise": dc.supervise,
                   "supervised_positions": supervised_total, "assistant_positions": assistant_total, "layers": layers,
                   "draft_vocab": int(draft_ids.numel()), "vocab_coverage": coverage, "final_loss": history[-1]["loss"],
                   "val_loss": last_val.get("val_loss"), "val_tau_chain": last_val.get("val_tau_chain"),
                   "val_acc": [last_val.get(f"val_acc_{k}") for k in range(steps)], "algorithm": dc.kind,
                   **(fitted.summary if fitted is not None else {}),
                   "config_hash": _train_hash(cfg, name)}
        io.write_json(out / "metrics.json", summary)
        run.artifact(out / "metrics.json")
        run.artifact(out / "model", "drafter")  # the whole HF-style folder: config.json + model.safetensors
        acc = ", ".join(f"{a:.2f}" for a in summary["val_acc"] if a is not None)
        say(f"[train] {name}: {total} steps, final loss {summary['final_loss']:.3f}; validation: "
            f"chain tau {summary['val_tau_chain'] or float('nan'):.2f}, top-1 accuracy by step [{acc}]")
        world.barrier()
    return out


_PROBE_STEPS = 10  # steps timed before a wall-time budget fixes the schedule (the first two are left out)


def _sized_total(budget_s: float, history: list[dict[str, Any]], step: int, wall: float) -> int:
    """Total steps that end training after `budget_s` seconds, at the pace of steps 3..`step`."""
    start = next(r["wall_s"] for r in history if r["step"] == 2)
    per_step = (wall - start) / (step - 2)
    return max(step, round(step + (budget_s - wall) / max(per_step, 1e-9)))


def _state_kind(launcher: str) -> str:
    """Train-state format: torch.distributed.checkpoint (none / ddp / fsdp2, interchangeable) or DeepSpeed's."""
    return "deepspeed" if launcher == "deepspeed" else "dcp"


def _to(d: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}


def _train_hash(cfg: Config, name: str) -> str:
    return cfg.section_hash("drafters", name) + cfg.section_hash("train_data") + cfg.section_hash("features")
