"""Suffix decoding (SuffixDecoding, Oliaro et al. 2024; Arctic Inference): draft from suffix tries over the
current conversation and over the target's earlier outputs in the run.

Each trie holds every substring of its text up to `max_depth` tokens, each node counting its occurrences,
so count(child) / count(node) is how often the text went on with that token. A round finds the longest
suffix of the context that occurred before *and was followed by something* (longer matches imply shorter
ones, so a binary search finds it), then grows a tree from there best first: a node's score is the product
of those frequencies along its path, nodes below `min_token_prob` are not taken, and the tree holds at most
`spec_factor` x match length + `spec_offset` nodes (a longer match earns a longer guess). The conversation's
trie and the earlier outputs' trie each propose; the tree with the larger total score (the expected number
of accepted tokens) is verified.

The earlier-outputs trie is bounded (`max_cached_outputs`, oldest out first) and depends only on the
order outputs arrive, so a run is deterministic; evaluate replays a resumed run's kept outputs into it.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

from deepspec.decoding.tree import DraftTree


class _Node:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.count = 0


class SuffixTrie:
    """Counts of every substring of up to `max_depth` tokens of the texts added (removable again)."""

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.root = _Node()
        self._open: list[_Node] = []  # nodes of the suffixes ending at the last appended token

    def start(self) -> None:
        """Begin a new text: no substring spans two texts."""
        self._open = []

    def append(self, token: int) -> None:
        nodes = []
        for node in [self.root, *self._open]:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node()
            child.count += 1
            nodes.append(child)
        self._open = nodes[: self.max_depth - 1]  # a suffix already max_depth long grows no further

    def add(self, tokens: list[int]) -> None:
        self.start()
        for t in tokens:
            self.append(t)
        self.start()

    def remove(self, tokens: list[int]) -> None:
        """Undo `add(tokens)`: every substring's count goes down by one, emptied nodes go."""
        for i in range(len(tokens)):
            node = self.root
            for t in tokens[i : i + self.max_depth]:
                child = node.children[t]
                child.count -= 1
                if child.count == 0:
                    del node.children[t]
                    break
                node = child

    def find(self, pattern: list[int]) -> _Node | None:
        node = self.root
        for t in pattern:
            node = node.children.get(t)
            if node is None:
                return None
        return node

    def match(self, context: list[int], max_match: int) -> tuple[int, _Node | None]:
        """(length, node) of the longest suffix of `context` (at most `max_match` tokens) that has a continuation."""
        def ok(m: int) -> _Node | None:
            node = self.find(context[len(context) - m :])
            return node if node is not None and node.children else None

        lo, hi, best = 1, min(max_match, len(context), self.max_depth - 1), None
        while lo <= hi:
            mid = (lo + hi) // 2
            node = ok(mid)
            if node is not None:
                best, lo = (mid, node), mid + 1
            else:
                hi = mid - 1
        return best if best is not None else (0, None)


def speculate(node: _Node, budget: int, min_prob: float) -> tuple[list[int], list[int], float]:
    """Best-first tree below `node`: (tokens, parents, total score). Children of a node in order of count."""
    tokens: list[int] = []
    parents: list[int] = []
    score = 0.0
    heap: list[tuple[float, int, int, int, _Node]] = []  # (-score, tie, parent index, token, node)
    tie = 0
    for tok, child in node.children.items():
        heap.append((-child.count / node.count, tie, -1, tok, child))
        tie += 1
    heapq.heapify(heap)
    while heap and len(tokens) < budget:
        neg, _, parent, tok, child = heapq.heappop(heap)
        if -neg < min_prob:
            break
        index = len(tokens)
        tokens.append(tok)
        parents.append(parent)
        score -= neg
        for t, grand in child.children.items():
            heapq.heappush(heap, (neg * grand.count / child.count, tie, index, t, grand))
            tie += 1
    return tokens, parents, score


class SuffixProposer:
    name = "suffix"

    def __init__(self, max_depth: int = 24, max_spec_tokens: int = 16, spec_factor: float = 1.0,
                 spec_offset: float = 0.0, min_token_prob: float = 0.1, global_cache: bool = True,
                 max_cached_outputs: int = 1000):
        self.max_depth, self.max_spec_tokens = max_depth, max_spec_tokens
        self.spec_factor, self.spec_offset, self.min_token_prob = spec_factor, spec_offset, min_token_prob
        self.local = SuffixTrie(max_depth)
        self.earlier = SuffixTrie(max_depth) if global_cache else None
        self.max_cached_outputs = max_cached_outputs
        self._cached: deque[list[int]] = deque()
        self._seen = 0
        self.chosen = {"conversation": 0, "earlier outputs": 0}

    def reset(self) -> None:
        self.local = SuffixTrie(self.max_depth)
        self._seen = 0

    def remember(self, output: list[int]) -> None:
        """A finished output joins the earlier-outputs trie (the oldest leaves once it holds the maximum)."""
        if self.earlier is None or not output:
            return
        self.earlier.add(output)
        self._cached.append(list(output))
        if len(self._cached) > self.max_cached_outputs:
            self.earlier.remove(self._cached.popleft())

    def propose(self, tokens: list[int], max_nodes: int) -> DraftTree | None:
        for t in tokens[self._seen :]:
            self.local.append(t)
        self._seen = len(tokens)
        best: tuple[float, list[int], list[int], str] | None = None
        for where, trie in (("conversation", self.local), ("earlier outputs", self.earlier)):
            if trie is None:
                continue
            length, node = trie.match(tokens, self.max_depth - 1)
            if node is None:
                continue
            budget = min(max_nodes, self.max_spec_tokens, math.floor(self.spec_factor * length + self.spec_offset))
            toks, parents, score = speculate(node, budget, self.min_token_prob)
            if toks and (best is None or score > best[0]):
                best = (score, toks, parents, where)
        if best is None:
            return None
        self.chosen[best[3]] += 1
        return DraftTree(best[1], best[2])
