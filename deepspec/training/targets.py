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
from typing import TYPE_CHECKING, Iterable, Literal

import torch
from torch import Tensor

from deepspec.features.rows import RowReader, RowWriter

if TYPE_CHECKING:
    from deepspec.features.extract import FeatureStore

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


class SoftTargetStore:
    """Cached top-k soft targets, read per sequence like the feature cache (one file per shard, the same rows)."""

    def __init__(self, store: "FeatureStore", files: list[Path]):
        self.index = store.index
        self.files = [RowReader(f) for f in files]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        k, a, b = self.index[i]
        ids = self.files[k].rows("top_ids", a, b)
        return {"top_ids": ids, "top_logp": self.files[k].rows("top_logp", a, b), "argmax": ids[:, 0].long()}


def cached_soft_targets(directory: Path, manifest: dict, store: "FeatureStore", lm_head: Tensor,
                        k: int) -> tuple[SoftTargetStore, bool]:
    """`soft_targets`, stored next to the feature cache so that every drafter trained on it pays the
    [T x V] product once. One file per shard, keyed by the shard's checksum, the target, the head and k (a
    cache grown by more shards computes only theirs), written a sequence at a time then renamed. Returns
    (targets, whether they all came from the store)."""
    k = min(k, lm_head.shape[0])
    by_shard: dict[int, list[int]] = {}
    for i, (n, _, _) in enumerate(store.index):
        by_shard.setdefault(n, []).append(i)
    files, reused = [], True
    for n, shard in enumerate(manifest["shards"]):
        key = hashlib.sha256(json.dumps([shard["sha256"], manifest.get("target_fingerprint"), list(lm_head.shape),
                                         k]).encode()).hexdigest()[:16]
        path = Path(directory) / "soft_targets" / f"top{k}-{key}.safetensors"
        files.append(path)
        if path.is_file():
            continue
        reused = False
        tokens = shard["tokens"]
        with RowWriter(path, {"top_ids": (torch.int32, (tokens, k)), "top_logp": (torch.float32, (tokens, k))}) as out:
            for i in by_shard.get(n, []):
                _, a, _ = store.index[i]
                st = soft_targets([{"final": store.final(i)}], lm_head, k)[0]
                out.write("top_ids", a, st["top_ids"])
                out.write("top_logp", a, st["top_logp"])
    return SoftTargetStore(store, files), reused


def supervised(loss_mask: Tensor, mode: Supervise) -> Tensor:
    """Positions whose next token is scored: every position but the last ("all": the target's
    distribution is a valid label in the prompt too), or those followed by an assistant token."""
    nxt = torch.zeros_like(loss_mask, dtype=torch.bool)
    nxt[:-1] = True if mode == "all" else loss_mask[1:]
    return nxt


def draft_vocab(targets: Iterable[dict[str, Tensor]], masks: Iterable[Tensor], vocab_size: int, size: int | None,
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


def target_to_draft(draft_ids: Tensor, vocab_size: int) -> Tensor:
    """The inverse of a draft vocabulary [vocab_size]: each target id's draft id, -1 outside it (what
    `training_targets` reads the cached top-k through)."""
    lookup = torch.full((vocab_size,), -1, dtype=torch.long)
    lookup[draft_ids] = torch.arange(draft_ids.numel())
    return lookup


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
