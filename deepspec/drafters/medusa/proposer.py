"""Drafting with Medusa heads: one step of the heads on the last committed position's final state, read out
as a sparse tree of each head's top tokens.

The tree is Medusa's: a node at depth d + 1 takes rank i_d of head d, and a path (i_0, …, i_d) is worth
the product of the heads' measured top-i accuracies (the chance every token on it is right, heads taken as
independent). The `total_tokens` most valuable paths are kept, best first, so every parent comes before its
children; the shape is fixed per drafter, the tokens change every round.
"""

from __future__ import annotations

import heapq
from typing import Callable

import torch
from torch import Tensor

from deepspec.decoding.tree import DraftTree
from deepspec.drafters.medusa.model import MedusaHeads


def sparse_tree(accuracy: list[list[float]], total: int, depth: int, top_k: int) -> list[tuple[int, ...]]:
    """The `total` paths of candidate ranks with the largest accuracy products, best first (ties: the earlier
    path); depth at most `depth`, ranks below `top_k`."""
    depth = min(depth, len(accuracy))
    heap = [(-accuracy[0][i], (i,)) for i in range(min(top_k, len(accuracy[0])))]
    heapq.heapify(heap)
    paths: list[tuple[int, ...]] = []
    while heap and len(paths) < total:
        neg, path = heapq.heappop(heap)
        paths.append(path)
        k = len(path)
        if k < depth:
            for i in range(min(top_k, len(accuracy[k]))):
                heapq.heappush(heap, (neg * accuracy[k][i], path + (i,)))
    return paths


def prior_accuracy(heads: int, ranks: int = 10) -> list[list[float]]:
    """Top-i accuracies assumed for heads that come without measured ones (a published checkpoint): halving
    with each rank, 0.8 of the head before it."""
    return [[0.8**k * 0.5 ** (i + 1) for i in range(ranks)] for k in range(heads)]


class MedusaProposer:
    name = "medusa"

    def __init__(self, heads: MedusaHeads, final_layer: int, normed: Callable[[Tensor], Tensor], top_k: int = 4,
                 total_tokens: int = 12, depth: int | None = None):
        self.heads = heads.eval()
        self.capture_layers = (final_layer,)  # the target's last layer's output; `normed` applies its final norm
        self.normed = normed
        accuracy = heads.config.get("head_accuracy") or prior_accuracy(heads.heads)
        self.paths = sparse_tree(accuracy, total_tokens, depth or heads.heads, top_k)
        self.top_k = max(p[-1] for p in self.paths) + 1
        self.depth = max(len(p) for p in self.paths)
        self._last: Tensor | None = None
        self._seen = 0

    def reset(self) -> None:
        self._last = None
        self._seen = 0

    def observe(self, captured: list[Tensor]) -> None:
        self._last = captured[0][-1]
        self._seen += captured[0].shape[0]

    @torch.inference_mode()
    def propose(self, tokens: list[int], max_nodes: int) -> DraftTree | None:
        if max_nodes < 1 or self._last is None:
            return None
        if self._seen + 1 != len(tokens):
            raise RuntimeError(f"medusa: features for {self._seen} positions, but {len(tokens)} committed tokens")
        h = self.normed(self._last[None]).to(self.heads.token_map.device, self.heads.blocks[0].layers[0].weight.dtype)
        ranked = [logits[0].topk(self.top_k).indices for logits in self.heads(h)[: self.depth]]
        d2t = self.heads.token_map
        paths = self.paths[:max_nodes]
        tokens_of = {p[:d]: int(d2t[ranked[d - 1][p[d - 1]]]) for p in paths for d in range(1, len(p) + 1)}
        return DraftTree.from_paths([list(p) for p in paths], tokens_of)
