"""Fused soft cross-entropy and L1 (= 2 TV) against a sparse top-k target, over the whole vocabulary.

A drafter's logits z [N, V] are scored against the target's cached top-k (ids [N, k], probabilities
[N, k]; ids outside the draft vocabulary carry p = 0). With q = softmax(z) and a_k = q[ids_k] where p_k > 0:

    ce = sum_k p_k (lse - z[ids_k])
    l1 = sum_k |a_k - p_k| + max(0, 1 - sum_k a_k)      (the draft's mass outside the target's top-k)

Both need only the row's log-sum-exp and k gathered logits, and the gradient is dense in one way only:

    dL/dz_v = q_v * alpha_row + sparse_v,   alpha = g_ce * sum(p) - g_l1 * sum_k c_k a_k,
    sparse  = scatter over ids_k of (g_l1 * c_k * a_k - g_ce * p_k),   c_k = sign(a_k - p_k) - [sum a < 1]

So the forward keeps the logits and two numbers per row (max, sum of exponentials, as the log-sum-exp),
and the backward overwrites the logits with their gradient, chunk by chunk over the vocabulary: no
[N, V] log-probabilities, probabilities or gradient are ever allocated. At N = 3,584 rows (512 blocks of
7) and V = 151,936 that is one 2.2 GB fp32 (1.1 GB bf16) buffer where the naive path holds four.

`soft_target_losses` picks the Triton kernels for CUDA tensors (or under TRITON_INTERPRET=1), and the
in-place torch path otherwise; both compute exactly the formulas above. The logits passed in are
consumed: after backward they hold the gradient.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton is optional: the torch path below has the same semantics
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is not installed
    triton = None

BLOCK = 1024
ROW_CHUNK = 256  # rows per step of the torch path (bounds its temporaries at [256, V])


def triton_usable(x: Tensor) -> bool:
    """Triton runs CUDA tensors, or CPU tensors when its interpreter is on (tests)."""
    if triton is None:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _lse_kernel(z_ptr, lse_ptr, stride, V, BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        base = z_ptr + row.to(tl.int64) * stride
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, z)
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - safe) + tl.exp(z - safe)
            m = m_new
        m_row = tl.max(m, axis=0)
        s_row = tl.sum(s * tl.exp(m - m_row), axis=0)
        tl.store(lse_ptr + row, m_row + tl.log(s_row))

    @triton.jit
    def _dense_grad_kernel(z_ptr, lse_ptr, alpha_ptr, stride, V, BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        base = z_ptr + row.to(tl.int64) * stride
        lse = tl.load(lse_ptr + row)
        alpha = tl.load(alpha_ptr + row)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) * alpha
            tl.store(base + cols, g.to(z_ptr.dtype.element_ty), mask=mask)


def row_lse(z: Tensor, use_triton: bool) -> Tensor:
    """Log-sum-exp of each row, in fp32."""
    if use_triton:
        lse = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
        _lse_kernel[(z.shape[0],)](z, lse, z.stride(0), z.shape[1], BLOCK_V=BLOCK)
        return lse
    return torch.cat([torch.logsumexp(z[i : i + ROW_CHUNK].float(), dim=-1) for i in range(0, z.shape[0], ROW_CHUNK)])


def dense_grad_(z: Tensor, lse: Tensor, alpha: Tensor, use_triton: bool) -> Tensor:
    """z <- softmax(z) * alpha, row by row, in place."""
    if use_triton:
        _dense_grad_kernel[(z.shape[0],)](z, lse, alpha.float().contiguous(), z.stride(0), z.shape[1], BLOCK_V=BLOCK)
        return z
    for i in range(0, z.shape[0], ROW_CHUNK):
        part = z[i : i + ROW_CHUNK]
        part.copy_((part.float() - lse[i : i + ROW_CHUNK, None]).exp_().mul_(alpha[i : i + ROW_CHUNK, None]))
    return z


def _sparse_terms(z_top: Tensor, lse: Tensor, p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ce, l1, a, c) of each row from its gathered logits (see the module docstring)."""
    inside = p > 0
    a = torch.exp(z_top - lse[:, None]) * inside
    ce = (p * (lse[:, None] - z_top)).sum(-1)
    under = 1.0 - a.sum(-1)
    l1 = ((a - p).abs() * inside).sum(-1) + under.clamp(min=0.0)
    c = (torch.sign(a - p) - (under > 0).float()[:, None]) * inside
    return ce, l1, a, c


class _SoftTargetLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, idx: Tensor, p: Tensor, use_triton: bool) -> tuple[Tensor, Tensor]:
        z = logits.detach()
        if z.stride(-1) != 1:
            raise ValueError("soft_target_losses: logits must be contiguous in the vocabulary dimension")
        lse = row_lse(z, use_triton)
        z_top = z.gather(-1, idx).float()
        ce, l1, a, c = _sparse_terms(z_top, lse, p.float())
        ctx.save_for_backward(z, idx, p, lse, a, c)
        ctx.use_triton = use_triton
        return ce, l1

    @staticmethod
    def backward(ctx, g_ce: Tensor, g_l1: Tensor):
        z, idx, p, lse, a, c = ctx.saved_tensors
        g_ce = torch.zeros_like(lse) if g_ce is None else g_ce.float()
        g_l1 = torch.zeros_like(lse) if g_l1 is None else g_l1.float()
        alpha = g_ce * p.float().sum(-1) - g_l1 * (c * a).sum(-1)
        grad = dense_grad_(z, lse, alpha, ctx.use_triton)  # the logits' storage becomes their gradient
        sparse = g_l1[:, None] * c * a - g_ce[:, None] * p.float()
        grad.scatter_add_(-1, idx, sparse.to(grad.dtype))
        return grad, None, None, None


def soft_target_losses(logits: Tensor, idx: Tensor, p: Tensor, use_triton: bool | None = None) -> tuple[Tensor, Tensor]:
    """Per-row soft cross-entropy and L1 of `logits` [N, V] against the sparse target (`idx`, `p`) [N, k].

    Differentiable w.r.t. `logits`, whose storage the backward reuses for the gradient. `use_triton`
    None: Triton where it runs (`triton_usable`), the torch path elsewhere."""
    if logits.dim() != 2 or idx.shape != p.shape or idx.shape[0] != logits.shape[0]:
        raise ValueError(f"soft_target_losses: logits [N, V] and idx / p [N, k] expected, got {tuple(logits.shape)}, "
                         f"{tuple(idx.shape)}, {tuple(p.shape)}")
    if use_triton is None:
        use_triton = triton_usable(logits)
    return _SoftTargetLosses.apply(logits.contiguous(), idx, p, use_triton)


def reference_losses(logits: Tensor, idx: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    """The naive path ([N, V] log-probabilities): what the fused losses must equal, values and gradients."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logp_top = logp.gather(-1, idx)
    inside = p > 0
    ce = -(p * logp_top).sum(-1)
    a = logp_top.exp() * inside
    l1 = ((a - p).abs() * inside).sum(-1) + (1.0 - a.sum(-1)).clamp(min=0.0)
    return ce, l1
