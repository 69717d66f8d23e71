"""The training loss of drafters scored per position and draft step (EAGLE-3's training-time test, Medusa's
heads): each sequence's step losses, decayed over steps, with top-1 hits and the teacher-forced chain τ.

`loss_fn(drafter, features [T, F], input_ids, target_idx, target_p, target_top, weight, trained, steps)`
returns (loss sums per step, hit counts per step, consecutive hits from step 0 per base position), step k of
base t scored against position t + 1 + k."""

from __future__ import annotations

from typing import Any, Callable

import torch

from deepspec.drafters.kind import Runner


def run_batch(runner: Runner, loss_fn: Callable[..., Any], seqs: list[dict], labels: list[dict], steps: int,
              decay: float, train: bool, last: bool = True) -> dict[str, Any]:
    """Loss (backpropagated, one sequence at a time, when `train`), per-step sums and hits over a list of
    sequences. `last`: this list ends the optimizer step (its final backward reduces across ranks)."""
    counts = [sum(float(t["weight"][1 + k :].sum()) for t in labels) for k in range(steps)]
    trained = [sum(float(t["trained"][1 + k :].sum()) for t in labels) for k in range(steps)]
    loss_sum = [0.0] * steps
    hit_sum = [0.0] * steps
    depth_sum, depth_n = 0.0, 0
    pairs = [(s, t) for s, t in zip(seqs, labels) if s["input_ids"].numel() >= 2]
    for i, (s, t) in enumerate(pairs):
        with torch.set_grad_enabled(train), runner.sync(last and i == len(pairs) - 1):
            losses, hits, first_miss = runner.call(
                loss_fn, s["hidden"].flatten(1).float(), s["input_ids"], t["target_idx"], t["target_p"],
                t["target_top"], t["weight"], t["trained"], steps)
            total = sum((decay**k) * losses[k] / max(counts[k], 1.0) for k in range(steps))
            if train:
                runner.backward(total)
        for k in range(steps):
            loss_sum[k] += float(losses[k].detach())
            hit_sum[k] += float(hits[k])
        first_scored = t["trained"][1:]
        depth_sum += float(first_miss[first_scored].sum())
        depth_n += int(first_scored.sum())
    return {
        "loss": sum((decay**k) * loss_sum[k] / max(counts[k], 1.0) for k in range(steps)),
        "loss_step": [loss_sum[k] / max(counts[k], 1.0) for k in range(steps)],
        "acc_step": [hit_sum[k] / max(trained[k], 1.0) for k in range(steps)],
        "tokens": sum(int(s["input_ids"].numel()) for s in seqs),
        "tau_chain": 1.0 + depth_sum / max(depth_n, 1),
    }
