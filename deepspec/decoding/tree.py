"""Draft trees in flattened form: node tokens in topological order with parent indices.

Row 0 of every verification forward is the root (the last committed token, not yet in the KV cache);
node i is row i + 1. A chain is the degenerate tree whose parents are -1, 0, 1, ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor


class TreeError(ValueError):
    pass


@dataclass
class DraftTree:
    tokens: list[int]
    parents: list[int]  # -1: child of the root
    # For sampling: the draft distribution each node was drawn from (siblings share one and are taken
    # to be drawn without replacement, in order). None: deterministic choices (q is one-hot).
    q: list[Tensor | None] | None = None
    # The drafter's probability of each node's whole path, where it scores paths (a dynamic tree): what a cost
    # cut and its calibration read. None: not scored.
    path_probs: list[float] | None = None
    source: str | None = None  # who drafted it, where several proposers take turns (a hybrid's part)
    depths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise TreeError(f"tree has {len(self.tokens)} tokens but {len(self.parents)} parents")
        if self.q is not None and len(self.q) != len(self.tokens):
            raise TreeError(f"tree has {len(self.tokens)} tokens but {len(self.q)} draft distributions")
        if self.path_probs is not None and len(self.path_probs) != len(self.tokens):
            raise TreeError(f"tree has {len(self.tokens)} tokens but {len(self.path_probs)} path probabilities")
        depths = []
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise TreeError(f"node {i}: parent {p} must be -1 (root) or an earlier node")
            depths.append(1 if p < 0 else depths[p] + 1)
        self.depths = depths

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: list[int], q: list[Tensor | None] | None = None) -> "DraftTree":
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), q)

    @classmethod
    def from_paths(cls, paths: list[list[int]], tokens_of: dict[tuple[int, ...], int] | None = None) -> "DraftTree":
        """Static tree from token paths (or Medusa/EAGLE "choices" with `tokens_of` giving each prefix's token)."""
        index: dict[tuple[int, ...], int] = {}
        tokens: list[int] = []
        parents: list[int] = []
        for path in sorted(paths, key=len):
            if not path:
                raise TreeError("a tree path may not be empty")
            for d in range(1, len(path) + 1):
                prefix = tuple(path[:d])
                if prefix in index:
                    continue
                if d > 1 and prefix[:-1] not in index:
                    raise TreeError(f"path {list(path)} has no parent path {list(prefix[:-1])}")
                index[prefix] = len(tokens)
                tokens.append(tokens_of[prefix] if tokens_of is not None else prefix[-1])
                parents.append(index[prefix[:-1]] if d > 1 else -1)
        return cls(tokens, parents)

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def children(self) -> list[list[int]]:
        """children[r] for row r (0 = root, i + 1 = node i), as node indices in order."""
        out: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for i, p in enumerate(self.parents):
            out[p + 1].append(i)
        return out

    def positions(self, offset: int) -> Tensor:
        """RoPE positions of the verification rows: the root at `offset`, nodes at offset + depth."""
        return torch.tensor([offset] + [offset + d for d in self.depths], dtype=torch.long)

    def attention_mask(self, prefix_len: int, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
        """Additive mask [n + 1, prefix_len + n + 1]: committed prefix visible, tree rows see their ancestors.
        Built row by row on the host, then sent to `device` (default: torch's default device) in one copy."""
        n = len(self) + 1
        allowed = torch.zeros((n, n), dtype=torch.bool, device="cpu")
        allowed[:, 0] = True
        for i, p in enumerate(self.parents):
            row = i + 1
            if p >= 0:
                allowed[row] = allowed[p + 1]
            allowed[row, row] = True
        device = device or torch.get_default_device()
        mask = torch.zeros((n, prefix_len + n), dtype=dtype, device=device)
        mask[:, prefix_len:].masked_fill_(~allowed.to(device), float("-inf"))
        return mask

    def taken_by(self, committed: list[int]) -> list[bool | None]:
        """Which nodes the verifier took, read from the tokens `committed` after this tree's root: a node was
        taken exactly when its path starts them, because a rejected node's token is never the bonus drawn in its
        place (greedy: the target's own choice differs; sampled: the residual excludes it). None: not knowable,
        since the commits stop inside the node's path (the generation ended there)."""
        out: list[bool | None] = []
        for i, p in enumerate(self.parents):
            above = True if p < 0 else out[p]
            d = self.depths[i]
            if above is not True:
                out.append(above)
            elif d > len(committed):
                out.append(None)
            else:
                out.append(committed[d - 1] == self.tokens[i])
        return out

    def paths(self) -> list[list[int]]:
        """Root-to-leaf paths as node-index lists."""
        kids = self.children()
        out: list[list[int]] = []
        for leaf in (i for i in range(len(self)) if not kids[i + 1]):
            path, node = [], leaf
            while node >= 0:
                path.append(node)
                node = self.parents[node]
            out.append(path[::-1])
        return out


def scratch_mask(nodes: list[int], parents: list[int], row_of: dict[int, int], base: int, used: int,
                 dtype: torch.dtype) -> tuple[Tensor, list[int]]:
    """For a drafter growing a tree in its own cache: the additive mask of draft steps for `nodes`, written
    at scratch rows base+used.., and their depths. Each node sees the committed rows [0, base), the
    scratch rows of its ancestors (`row_of`: node -> offset past base) and itself. Built on the host, returned
    on torch's default device (the drafter's, inside `devices.on`)."""
    mask = torch.full((len(nodes), base + used + len(nodes)), float("-inf"), dtype=dtype, device="cpu")
    mask[:, :base] = 0.0
    depths = []
    for r, node in enumerate(nodes):
        d, a = 0, node
        while a >= 0:
            if a in row_of:
                mask[r, base + row_of[a]] = 0.0
            a, d = parents[a], d + 1
        mask[r, base + used + r] = 0.0
        depths.append(d)
    return mask.to(torch.get_default_device()), depths


def dynamic_tree(root_logp: Tensor, expand, depth: int, top_k: int, total_tokens: int,
                 cut: Callable[[list[float]], int] | None = None,
                 grow: Callable[[list[float], list[float]], bool] | None = None) -> DraftTree:
    """EAGLE-2 dynamic tree: expand the `top_k` best frontier nodes per step, rerank all candidates.

    `root_logp` [V] are the drafter's log-probs after the last committed token. `expand(nodes, tokens,
    parents)` returns log-probs [len(nodes), V] of the children of `nodes`, given the tree so far. A
    node's score is its cumulative draft log-prob; the final tree is the `total_tokens` best scores,
    which is closed under ancestors because scores only fall along a path (ties go to the shallower,
    earlier node). `cut(probs)`, given the best nodes' draft probabilities (falling), says how many to
    keep (possibly none); the tree stops growing once no node of its newest depth is kept. `grow(probs,
    frontier)`, given the best nodes' probabilities and those of the nodes the next depth would expand, says
    whether to draft that depth at all. The tree carries its nodes' probabilities (`path_probs`).
    """
    if depth < 1 or top_k < 1 or total_tokens < 1:
        raise TreeError(f"depth ({depth}), top_k ({top_k}) and total_tokens ({total_tokens}) must be >= 1")
    top = torch.topk(root_logp, top_k)
    tokens: list[int] = top.indices.tolist()
    scores: list[float] = top.values.tolist()
    parents: list[int] = [-1] * len(tokens)
    depths: list[int] = [1] * len(tokens)
    frontier = list(range(len(tokens)))

    def by_score() -> list[int]:
        return sorted(range(len(tokens)), key=lambda i: (-scores[i], depths[i], i))[:total_tokens]

    def best() -> list[int]:
        order = by_score()
        return order if cut is None else order[: cut([math.exp(scores[i]) for i in order])]

    for d in range(2, depth + 1):
        if cut is not None and not any(depths[i] == d - 1 for i in best()):
            break  # the newest depth is cut: its children would be too
        if grow is not None and not grow([math.exp(scores[i]) for i in by_score()], [math.exp(scores[f]) for f in frontier]):
            break
        logp = expand(frontier, tokens, parents)
        cand = torch.topk(logp, top_k, dim=-1)
        cand_scores = torch.tensor([scores[f] for f in frontier], dtype=cand.values.dtype)[:, None] + cand.values
        flat_scores = cand_scores.flatten().tolist()
        flat_tokens = cand.indices.flatten().tolist()
        first_new = len(tokens)
        for j, (s, t) in enumerate(zip(flat_scores, flat_tokens)):
            tokens.append(t)
            scores.append(s)
            parents.append(frontier[j // top_k])
            depths.append(d)
        ranked = sorted(range(len(flat_scores)), key=lambda j: -flat_scores[j])[:top_k]
        frontier = sorted(first_new + j for j in ranked)
    keep = sorted(best())  # parents precede children in the original order
    remap = {old: new for new, old in enumerate(keep)}
    return DraftTree([tokens[i] for i in keep], [remap[parents[i]] if parents[i] >= 0 else -1 for i in keep],
                     path_probs=[math.exp(scores[i]) for i in keep])
