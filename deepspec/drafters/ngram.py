"""Prompt lookup (n-gram) drafting: continue the context the way an earlier occurrence of its last n-gram did.

Costs no model forward, so it only pays where outputs repeat their input (code edits, summaries,
multi-turn chat quoting itself). `branches` > 1 merges several earlier continuations into one tree.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from deepspec.decoding.tree import DraftTree


class NgramProposer:
    name = "ngram"

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1, num_draft: int = 8, branches: int = 1):
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self.num_draft, self.branches = num_draft, branches

    def reset(self) -> None:
        pass  # stateless: the context is searched afresh each round

    def continuations(self, tokens: list[int]) -> list[list[int]]:
        """Distinct continuations after the most recent matches of the longest matching suffix n-gram."""
        arr = np.asarray(tokens, dtype=np.int64)
        for n in range(self.ngram_max, self.ngram_min - 1, -1):
            if len(arr) <= n:
                continue
            windows = sliding_window_view(arr[:-1], n)  # a match must leave at least one token after it
            starts = np.flatnonzero((windows == arr[-n:]).all(axis=1))
            found: list[list[int]] = []
            for s in starts[::-1]:
                cont = arr[s + n : s + n + self.num_draft].tolist()
                if cont and cont not in found:
                    found.append(cont)
                    if len(found) == self.branches:
                        break
            if found:
                return found
        return []

    def propose(self, tokens: list[int], max_nodes: int) -> DraftTree | None:
        conts = self.continuations(tokens)
        if not conts:
            return None
        if len(conts) == 1:
            return DraftTree.chain(conts[0][:max_nodes])
        index: dict[tuple[int, ...], int] = {}
        tok_list: list[int] = []
        parents: list[int] = []
        for cont in conts:  # most recent match first: it keeps the lowest node indices
            for d in range(1, len(cont) + 1):
                prefix = tuple(cont[:d])
                if prefix in index:
                    continue
                if len(tok_list) == max_nodes:
                    break
                index[prefix] = len(tok_list)
                tok_list.append(cont[d - 1])
                parents.append(index[prefix[:-1]] if d > 1 else -1)
        return DraftTree(tok_list, parents)
