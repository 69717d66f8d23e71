"""Training blocks: anchors, labels and the DFlash / DSpark loss over one batch of sequences.

Per sequence: up to `num_anchors` anchors are drawn from positions whose next token is supervised, or
(`anchors: answer`, DeepSpec's) only from those whose next token the target wrote, redrawn each epoch
from a seeded generator, so a resumed run draws the same ones. All blocks go through one backbone pass,
each attending to the context before its anchor and to itself. Draft j of anchor a is scored against
the target's distribution at position a + j (the token at a + 1 + j), while every draft before it is
scored too (a contiguous prefix). Losses, weighted exp(-j / gamma) or by the chance that draft j is reached
(`draft_weights`):
  ce   soft cross-entropy against the target's cached top-k (restricted to the draft vocabulary)
  l1   sum |p_draft - p_target| = 2 TV (DSpark)
  bce  the confidence head against 1 - TV, the probability that draft j is accepted at T = 1 (DSpark)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deepspec.drafters.block.model import BlockDrafter, block_positions, loss_weights
from deepspec.kernels import reference_losses, soft_target_losses
from deepspec.drafters.kind import Runner


def anchor_candidates(trained: Tensor) -> Tensor:
    """Positions a >= 1 (some context before them) whose next token is supervised."""
    cand = trained.clone()
    cand[0] = False
    return cand.nonzero().flatten()


def sample_anchors(trained: Tensor, num: int | None, generator: torch.Generator | None) -> Tensor:
    """Up to `num` distinct anchors, sorted: drawn from `generator`, or evenly spaced without one (a fixed
    evaluation set); all candidates when `num` is None."""
    cand = anchor_candidates(trained)
    if num is not None and cand.numel() > num:
        if generator is None:
            pick = torch.linspace(0, cand.numel() - 1, num).round().long().unique()
        else:
            pick = torch.randperm(cand.numel(), generator=generator, device="cpu")[:num].sort().values.to(cand.device)
        cand = cand[pick]
    return cand


def training_anchors(labels: dict[str, Tensor], dc: Any, generator: torch.Generator | None) -> Tensor:
    """A sequence's anchors: `dc.num_anchors` drawn from `generator` in training (from the supervised
    positions, or with `dc.anchors` answer only where the target wrote the next token), every supervised
    position up to `dc.eval_anchors` in evaluation (`generator` None)."""
    if generator is None:
        return sample_anchors(labels["trained"], dc.eval_anchors, None)
    region = labels["trained"] & labels["answer"] if dc.anchors == "answer" else labels["trained"]
    return sample_anchors(region, dc.num_anchors, generator)


def block_terms(model: BlockDrafter, hidden: Tensor, input_ids: Tensor, labels: dict[str, Tensor], anchors: Tensor,
                gamma: float | str | None) -> dict[str, Tensor]:
    """Per-draft loss sums and counts of one sequence's blocks (see the module docstring)."""
    T = input_ids.shape[0]
    B, D = model.block_size, model.drafts
    ctx = model.context(hidden)
    ctx_kv = model.context_kv(ctx, torch.arange(T))
    x = model.block_inputs(input_ids[anchors], ctx[anchors - 1])  # anchors >= 1: some context before each
    h = model.backbone(x, block_positions(anchors, B), ctx_kv, anchors)
    h = h.view(anchors.shape[0], B, -1)[:, model.draft_rows]  # [A, D, H]
    t = anchors[:, None] + torch.arange(D)[None, :]  # where draft j's target distribution lives
    tc = t.clamp(max=T - 1)
    valid = (labels["trained"][tc] & (t <= T - 2)).long().cumprod(dim=-1).bool()  # a contiguous prefix
    logits, states = model.draft_logits(h, input_ids[tc])  # teacher-forced previous tokens: x_{a+j}
    idx, p_t = labels["target_idx"][tc].long(), labels["target_p"][tc]  # top-k ids outside the draft vocab: p = 0
    w = valid * labels["weight"][tc]
    with torch.no_grad():  # the argmax of the log-probabilities on CPU, where it must repeat earlier runs bit for bit
        draft_top = (logits if logits.is_cuda else torch.log_softmax(logits.float(), dim=-1)).argmax(-1)
    if logits.is_cuda:  # fused over the vocabulary (Triton where installed): the logits become their gradient
        A, V = logits.shape[0], logits.shape[-1]
        ce, l1 = (x.view(A, D) for x in soft_target_losses(logits.reshape(A * D, V), idx.reshape(A * D, -1),
                                                           p_t.reshape(A * D, -1)))
    else:
        ce, l1 = reference_losses(logits, idx, p_t)
    accept = (1.0 - 0.5 * l1).clamp(0.0, 1.0)
    w = w * draft_weights(accept.detach(), gamma)
    out = {"ce": (ce * w).sum(0), "w": w.sum(0)}
    out["l1"] = (l1 * w).sum(0)
    if model.confidence_head is not None:
        z = model.confidence_logit(h, states).float()
        out["bce"] = (F.binary_cross_entropy_with_logits(z, accept.detach(), reduction="none") * w).sum(0)
        out["confidence"] = z.detach()
        out["accept"] = accept.detach()
    with torch.no_grad():
        hit = (model.draft_to_target[draft_top] == labels["target_top"][tc]) & valid
        out["hits"] = hit.sum(0).float()
        out["scored"] = valid.sum(0).float()
        out["run"] = hit.long().cumprod(dim=-1).sum(-1)  # drafts accepted from j = 0, teacher-forced
        out["hit"], out["valid"] = hit, valid
    return out


def draft_weights(accept: Tensor, gamma: float | str | None) -> Tensor:
    """Each draft's loss weight [A, D]: exp(-j / gamma); or, with gamma "acceptance", the probability that
    every earlier draft of its block is accepted (the product of their 1 - TV): draft j's share of the
    expected accepted length, so a drafter that rarely gets draft 0 right spends its updates there."""
    if gamma != "acceptance":
        return loss_weights(accept.shape[1], gamma).to(accept.device)[None, :].expand_as(accept)
    return torch.cumprod(torch.cat([torch.ones_like(accept[:, :1]), accept[:, :-1]], dim=1), dim=1)


def batch_terms(model: BlockDrafter, items: list[tuple[Tensor, Tensor, dict[str, Tensor], Tensor]],
                gamma: float | str | None) -> list[dict[str, Tensor]]:
    """`block_terms` of every (hidden, input_ids, labels, anchors) of a micro-batch: one forward, one backward."""
    return [block_terms(model, hidden.to(model.norm.weight.dtype), ids, labels, anchors, gamma)
            for hidden, ids, labels, anchors in items]


def run_batch(runner: Runner, seqs: list[dict], labels: list[dict], dc: Any, train: bool,
              generator: torch.Generator | None, keep: bool = False, last: bool = True) -> dict[str, Any]:
    """Loss (backpropagated when `train`; `last` ends the optimizer step) and per-draft statistics over a
    list of sequences.

    Training draws `dc.num_anchors` anchors per sequence from `generator`; evaluation (`generator` None)
    uses every candidate. `keep` returns the per-block confidences, hits, 1 - TV and sequence index (for calibration)."""
    D = runner.drafter.drafts
    coef = {"ce": dc.ce_weight, "l1": dc.l1_weight, "bce": dc.confidence_weight}
    sums = {k: torch.zeros(D) for k in ("ce", "w", "l1", "bce", "hits", "scored")}
    total: Tensor | None = None
    runs, blocks = 0.0, 0
    kept: dict[str, list[Tensor]] = {"confidence": [], "hit": [], "valid": [], "accept": [], "sequence": []}
    items = []
    for s, t in zip(seqs, labels):
        if s["input_ids"].numel() < 3:
            continue
        anchors = training_anchors(t, dc, generator)
        if anchors.numel():
            items.append((s["hidden"].flatten(1), s["input_ids"], t, anchors))
    with torch.set_grad_enabled(train), runner.sync(last):
        terms_all = runner.call(batch_terms, items, dc.loss_gamma) if items else []
        denom = sum(float(x["w"].sum()) for x in terms_all) or 1.0
        for terms in terms_all:
            part = sum(coef[k] * terms[k].sum() for k in ("ce", "l1", "bce") if k in terms and coef[k] > 0)
            total = part / denom if total is None else total + part / denom
            for k in sums:
                if k in terms:
                    sums[k] += terms[k].detach().cpu()
            scored = terms["valid"][:, 0]
            runs += float(terms["run"][scored].sum())
            blocks += int(scored.sum())
            if keep and "confidence" in terms:
                terms["sequence"] = torch.full((terms["hit"].shape[0],), len(kept["sequence"]))
                for k in kept:
                    kept[k].append(terms[k])
        if train and total is not None and total.requires_grad:
            runner.backward(total)
    w = sums["w"].clamp(min=1e-9)
    out = {
        "loss": float(total.detach()) if total is not None else 0.0,
        "loss_step": (sums["ce"] / w).tolist(),
        "acc_step": (sums["hits"] / sums["scored"].clamp(min=1)).tolist(),
        "tokens": sum(int(s["input_ids"].numel()) for s in seqs),
        "tau_chain": 1.0 + runs / max(blocks, 1),
        "l1": float(sums["l1"].sum() / w.sum()),
        "bce": float(sums["bce"].sum() / w.sum()),
    }
    if keep and kept["confidence"]:
        out["kept"] = {k: torch.cat(v) for k, v in kept.items()}
    return out
