"""Several drafting methods as one proposer: prompt lookup where the output repeats its context, a
trained drafter elsewhere.

`first`: each round, the draft of the first proposer that has one (prompt lookup proposes only when it
finds a match). The round's draft is one proposer's own, so verification is exactly that proposer's:
lossless at any temperature. `merge`: every proposer's draft under one root, shared prefixes merged,
verified as one tree; the round accepts the longest path of either (greedy only: sampled verification
needs one proposal distribution per sibling set).

A proposer that reads target features (EAGLE-3, DFlash / DSpark) is handed every committed position's
features whether or not its draft was used that round, so it stays in step with the sequence.
"""

from __future__ import annotations

from collections import Counter

from deepspec.decoding.proposer import Proposer
from deepspec.decoding.tree import DraftTree


class HybridProposer:
    def __init__(self, proposers: list[Proposer], mode: str = "first"):
        if mode not in ("first", "merge"):
            raise ValueError(f"mode: {mode!r} is not first or merge")
        readers = [p for p in proposers if hasattr(p, "capture_layers")]
        if len(readers) > 1:
            raise ValueError("methods: at most one of a hybrid's methods may read target features")
        self.proposers, self.mode = proposers, mode
        self.name = "+".join(p.name for p in proposers)
        self._reader = readers[0] if readers else None
        if self._reader is not None:
            self.capture_layers = self._reader.capture_layers
        self.chosen: Counter[str] = Counter()  # rounds drafted by each proposer (first) or merged (merge)

    def reset(self) -> None:
        for p in self.proposers:
            p.reset()

    def observe(self, captured) -> None:
        self._reader.observe(captured)

    def remember(self, output: list[int]) -> None:
        for p in self.proposers:
            if hasattr(p, "remember"):
                p.remember(output)

    def propose(self, tokens: list[int], max_nodes: int) -> DraftTree | None:
        if self.mode == "first":
            for p in self.proposers:
                tree = p.propose(tokens, max_nodes)
                if tree is not None and len(tree):
                    self.chosen[p.name] += 1
                    tree.source = p.name
                    return tree
            return None
        drafted = [(p.name, p.propose(tokens, max_nodes)) for p in self.proposers]
        trees = [(name, t) for name, t in drafted if t is not None and len(t)]
        if not trees:
            return None
        self.chosen["merged" if len(trees) > 1 else "single"] += 1
        merged = merge_trees([t for _, t in trees], max_nodes)
        merged.source = "merged" if len(trees) > 1 else trees[0][0]
        return merged


def merge_trees(trees: list[DraftTree], max_nodes: int) -> DraftTree:
    """One greedy tree holding every path of `trees` (earlier trees first, equal prefixes shared), cut at
    `max_nodes` nodes."""
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, int], int] = {}  # (parent in the merged tree, token) -> node
    for tree in trees:
        if tree.q is not None:
            raise ValueError("merge: sampled drafts cannot share a tree; use mode first at temperature > 0")
        where: list[int] = []  # this tree's node -> merged node (-2: cut)
        for tok, par in zip(tree.tokens, tree.parents):
            parent = -1 if par < 0 else where[par]
            key = (parent, tok)
            if parent == -2 or (key not in index and len(tokens) == max_nodes):
                where.append(-2)
                continue
            if key not in index:
                index[key] = len(tokens)
                tokens.append(tok)
                parents.append(parent)
            where.append(index[key])
    return DraftTree(tokens, parents)
