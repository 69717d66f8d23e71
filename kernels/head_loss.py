"""Soft cross-entropy through a drafter's output head, a chunk of rows at a time: no [N, V] tensor survives
from the forward to the backward.

The head maps normed states x [N, H] to logits z = x Wᵀ [N, V]. Against a sparse target (ids, p) [N, k]
(p = 0 where an id is outside the draft vocabulary), with lse the row's log-sum-exp, q = softmax(z) and
s = Σ_k p_k:

    ce     = Σ_k p_k (lse − z[ids_k])
    ∂ce/∂z = s·q − scatter(ids, p)           (dense only through q)
    ∂ce/∂x = (∂ce/∂z) W,    ∂ce/∂W = (∂ce/∂z)ᵀ x

The forward computes z for one chunk of rows at a time and keeps two numbers per row (lse, argmax); the
backward recomputes each chunk's z, turns it into its gradient in place and accumulates ∂x and ∂W. One
[chunk, V] fp32 block is alive at a time, whatever N. Training-time test otherwise keeps every step's
[N, V] log-probabilities for the backward: EAGLE-3's 7 steps over a 4k-token sequence at Qwen3's 152k
vocabulary hold 17 GB; here the cost is one more head matmul per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB in fp32): rows per chunk = this // V


def _accumulate(x: Tensor) -> torch.dtype:
    """fp32 for the logits and gradients (fp64 when the states are: exact tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _HeadSoftCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, idx: Tensor, p: Tensor, rows: int) -> tuple[Tensor, Tensor]:
        n, acc = x.shape[0], _accumulate(x)
        ce = torch.empty(n, dtype=acc, device=x.device)
        lse = torch.empty(n, dtype=acc, device=x.device)
        top = torch.empty(n, dtype=torch.long, device=x.device)
        for a in range(0, n, rows):
            z = (x[a : a + rows] @ weight.T).to(acc)
            lse[a : a + rows] = torch.logsumexp(z, dim=-1)
            ce[a : a + rows] = (p[a : a + rows] * (lse[a : a + rows, None] - z.gather(-1, idx[a : a + rows]))).sum(-1)
            top[a : a + rows] = z.argmax(-1)
        ctx.save_for_backward(x, weight, idx, p, lse)
        ctx.rows = rows
        ctx.mark_non_differentiable(top)
        return ce, top

    @staticmethod
    def backward(ctx, g: Tensor, _: Tensor):
        x, weight, idx, p, lse = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = torch.empty_like(x) if need_x else None
        acc = _accumulate(x)
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        w32 = weight.to(acc)
        rows = ctx.rows
        for a in range(0, x.shape[0], rows):
            xa, pa, ga = x[a : a + rows].to(acc), p[a : a + rows].to(acc), g[a : a + rows].to(acc)
            gz = (xa @ w32.T).sub_(lse[a : a + rows, None]).exp_().mul_((ga * pa.sum(-1))[:, None])
            gz.scatter_add_(-1, idx[a : a + rows], -(ga[:, None] * pa))
            if need_x:
                gx[a : a + rows] = (gz @ w32).to(x.dtype)
            if need_w:
                gw.addmm_(gz.T, xa)
        return gx, None if gw is None else gw.to(weight.dtype), None, None, None


def head_soft_ce(x: Tensor, weight: Tensor, idx: Tensor, p: Tensor, rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-row soft cross-entropy of the logits x Wᵀ against the sparse target (idx, p) [N, k], and each row's
    argmax, differentiable in `x` and `weight` (see the module docstring). `rows`: rows per chunk."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1] or idx.shape != p.shape \
            or idx.shape[0] != x.shape[0]:
        raise ValueError(f"head_soft_ce: x [N, H], weight [V, H] and idx / p [N, k] expected, got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(idx.shape)}, {tuple(p.shape)}")
    rows = rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _HeadSoftCE.apply(x, weight, idx, p, rows)
