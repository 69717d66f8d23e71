"""Acceptance rules: the only place that decides which drafted tokens are committed.

Greedy: follow the child whose token equals the target's argmax at each parent; the target's argmax at
the last accepted node is the bonus token. Sampling: recursive rejection over siblings (SpecInfer /
EAGLE), exact for stochastic proposals drawn without replacement and for deterministic children
(q one-hot); the result has exactly the target's (temperature/top-k/top-p shaped) distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepspec.decoding.tree import DraftTree


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def target_probs(logits: Tensor, sampling: Sampling) -> Tensor:
    """The distribution the target samples from: temperature, then top-k, then top-p, in float32+."""
    logits = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32) / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop_sorted = (cum - sorted_p) >= sampling.top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def greedy_accept(tree: DraftTree, argmax: list[int]) -> tuple[list[int], int]:
    """Accepted node indices (a root-to-node path) and the bonus token. `argmax[r]` is row r's argmax."""
    kids = tree.children()
    path: list[int] = []
    row = 0
    while True:
        want = argmax[row]
        nxt = next((c for c in kids[row] if tree.tokens[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        row = nxt + 1


def _sample(p: Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(p, 1, generator=generator))


def sample_accept(tree: DraftTree, probs: Tensor, generator: torch.Generator) -> tuple[list[int], int]:
    """Recursive rejection sampling over the tree. `probs[r]` is the target distribution at row r."""
    kids = tree.children()
    path: list[int] = []
    row = 0
    while True:
        p = probs[row].clone()
        q_prev: Tensor | None = None
        accepted = None
        for c in kids[row]:
            tok = tree.tokens[c]
            q = tree.q[c] if tree.q is not None else None
            if q is None:
                accept_p = float(p[tok])  # q is one-hot at tok
            else:
                if q_prev is None or q is not q_prev:
                    qc = q.to(p.dtype).clone()
                q_prev = q
                qc = qc / qc.sum()
                accept_p = min(1.0, float(p[tok]) / max(float(qc[tok]), 1e-30))
            if torch.rand((), generator=generator, dtype=torch.float64).item() < accept_p:
                accepted = c
                break
            # Reject: the residual max(p - q, 0), renormalised; the token leaves q (drawn without replacement).
            if q is None:
                p[tok] = 0.0
            else:
                p = torch.clamp(p - qc, min=0.0)
                qc[tok] = 0.0
            total = p.sum()
            if total <= 0:  # p was entirely covered by q: any remaining mass is numerical noise
                p = probs[row].clone()
                p[[tree.tokens[k] for k in kids[row]]] = 0.0
                total = p.sum()
            p = p / total
        if accepted is None:
            return path, _sample(p, generator)
        path.append(accepted)
        row = accepted + 1
