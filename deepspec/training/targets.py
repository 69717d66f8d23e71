"""What a drafter is trained to predict: the target's next-token distribution, cached once as top-k.

The feature cache stores the target's final hidden state; its distribution at a position is that state
times the target's head, a [T, 49k] product that used to be recomputed at every visit of a sequence.
`soft_targets` does it once per sequence and keeps only the top-k (log-probabilities over the full
vocabulary, their ids and the argmax), so an epoch costs the drafter's work alone. `draft_vocab` picks
the draft vocabulary from those argmaxes on the training split, and `training_targets` restricts each
position's top-k to it (renormalised) and marks which positions are supervised (and which precede a target-written token, `answer`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import Tensor

from deepspec import io

Supervise = Literal["all", "assistant"]


@torch.no_grad()
def soft_targets(seqs: list[dict[str, Tensor]], lm_head: Tensor, k: int, chunk: int = 1024) -> list[dict[str, Tensor]]:
    """Per sequence: `top_ids` [T, k], `top_logp` [T, k] (log-probs over the full vocabulary) and `argmax` [T]."""
    out = []
    k = min(k, lm_head.shape[0])
    for s in seqs:
        ids, logps = [], []
        for a in range(0, s["final"].shape[0], chunk):
            logits = s["final"][a : a + chunk].float() @ lm_head.T
            top = logits.topk(k, dim=-1)
            logps.append(top.values - torch.logsumexp(logits, dim=-1, keepdim=True))
            ids.append(top.indices.int())
        top_ids = torch.cat(ids)
        out.append({"top_ids": top_ids, "top_logp": torch.cat(logps), "argmax": top_ids[:, 0].long()})
    return out


def cached_soft_targets(directory: Path, manifest: dict, seqs: list[dict[str, Tensor]], lm_head: Tensor,
                        k: int) -> tuple[list[dict[str, Tensor]], bool]:
    """`soft_targets`, stored next to the feature cache so that every drafter trained on it pays the
    [T x V] product once. Keyed by the shards' checksums, the head and k; written then renamed. Returns
    (targets, whether they came from the store)."""
    key = hashlib.sha256(json.dumps([[s["sha256"] for s in manifest["shards"]], manifest.get("target_fingerprint"),
                                     list(lm_head.shape), k]).encode()).hexdigest()[:16]
    path = Path(directory) / f"soft_targets-top{k}-{key}.safetensors"
    lengths = [int(s["final"].shape[0]) for s in seqs]
    if path.is_file():
        t = load_file(str(path))
        if t["top_ids"].shape[0] == sum(lengths):
            ids, logp = t["top_ids"].split(lengths), t["top_logp"].split(lengths)
            return [{"top_ids": i, "top_logp": lp, "argmax": i[:, 0].long()} for i, lp in zip(ids, logp)], True
    out = soft_targets(seqs, lm_head, k)
    io.write_safetensors(path, {"top_ids": torch.cat([t["top_ids"] for t in out]).contiguous(),
                                "top_logp": torch.cat([t["top_logp"] for t in out]).contiguous()})
    return out, False


def supervised(loss_mask: Tensor, mode: Supervise) -> Tensor:
    """Positions whose next token is scored: every position but the last ("all": the target's
    distribution is a valid label in the prompt too), or those followed by an assistant token."""
    nxt = torch.zeros_like(loss_mask, dtype=torch.bool)
    nxt[:-1] = True if mode == "all" else loss_mask[1:]
    return nxt


def draft_vocab(targets: list[dict[str, Tensor]], masks: list[Tensor], vocab_size: int, size: int | None,
                coverage: float = 1.0) -> tuple[Tensor, float]:
    """The target's most frequent argmax tokens at supervised positions (ties by id): at most `size`, and
    no more than reach `coverage` of those positions. Never padded with tokens that do not occur, so the
    head spends nothing on them. Returns (sorted target ids, coverage reached)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for t, m in zip(targets, masks):
        counts += torch.bincount(t["argmax"][m], minlength=vocab_size)
    total = int(counts.sum())
    if size is None or total == 0:
        return torch.arange(vocab_size), 1.0
    order = sorted((i for i in range(vocab_size) if counts[i] > 0), key=lambda i: (-int(counts[i]), i))[:size]
    cum = torch.cumsum(counts[torch.tensor(order)], 0).double() / total
    keep = min(len(order), int(torch.searchsorted(cum, torch.tensor([coverage - 1e-12], dtype=torch.float64))) + 1)
    ids = torch.tensor(sorted(order[:keep]))
    return ids, float(counts[ids].sum()) / total


def training_targets(st: dict[str, Tensor], loss_mask: Tensor, target_to_draft: Tensor, mode: Supervise) -> dict[str, Tensor]:
    """Labels of one sequence for `Eagle3Drafter.ttt_loss`.

    `target_idx`/`target_p` [T, k]: the top-k restricted to the draft vocabulary (draft ids; probabilities
    renormalised, zero where a token is outside it). `trained` marks supervised positions, `weight` those
    whose target argmax is in the draft vocabulary (the soft loss is defined there; accuracy counts the
    others as misses). `answer` marks the positions followed by a target-written token, wherever
    `mode` puts the supervision (block drafters may draw their anchors there only)."""
    d = target_to_draft[st["top_ids"].long()]  # -1 outside the draft vocabulary
    inside = d >= 0
    logp = st["top_logp"].masked_fill(~inside, float("-inf"))
    p = torch.softmax(logp, dim=-1).nan_to_num(0.0)  # a row with no draft token at all: weight 0 below
    trained = supervised(loss_mask, mode)
    return {"target_idx": d.clamp(min=0), "target_p": p, "target_top": st["argmax"], "trained": trained,
            "weight": (trained & inside[:, 0]).float(), "answer": supervised(loss_mask, "assistant")}


def topk_mass(targets: list[dict[str, Tensor]]) -> float:
    """Mean probability mass the cached top-k keeps (how close the cache is to the full distribution)."""
    total = sum(float(t["top_logp"].exp().sum()) for t in targets)
    return total / max(sum(int(t["top_logp"].shape[0]) for t in targets), 1)
