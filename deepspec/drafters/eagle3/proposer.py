"""Drafting with EAGLE-3 at decode time: an EAGLE-2 dynamic tree (or a chain) from the target features of
committed tokens, the drafter's own K/V kept across rounds."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from deepspec.decoding.cost import AcceptanceCalibration, GrowthForecast, best_cut
from deepspec.decoding.tree import DraftTree, dynamic_tree, scratch_mask
from deepspec.drafters.eagle3.model import DraftCache, Eagle3Drafter


class Eagle3Proposer:
    """Drafts an EAGLE-2 dynamic tree (or a chain with top_k 1) from target features of committed tokens.

    The engine hands over the features of every committed position (`observe`); each round the drafter
    first runs its committed-row steps for the new positions (keeping their K/V across rounds), then
    grows the tree in scratch rows of its own cache."""

    name = "eagle3"

    def __init__(self, drafter: Eagle3Drafter, max_len: int, depth: int = 5, top_k: int = 4, total_tokens: int = 12,
                 verify_ms: list[float] | None = None, calibration: AcceptanceCalibration | None = None,
                 forecast: GrowthForecast | None = None):
        """`verify_ms`: the verify cost of 1, 2, ... rows; given, each round keeps the nodes that pay for their rows
        (`decoding.cost.best_cut`) instead of all `total_tokens`. `calibration`: the cut reads the nodes' path
        probabilities through it, and it learns from which nodes the verifier took (kept across sequences).
        `forecast` (with `verify_ms`): a depth is drafted only when it is forecast to pay for its drafter forward;
        it learns from every expansion (kept across sequences)."""
        from deepspec.models.lean import pack_linears

        self.drafter = pack_linears(drafter.eval())  # inference only from here: weights prepacked for oneDNN
        self.capture_layers = tuple(drafter.config["aux_layers"])
        self.depth, self.top_k, self.total_tokens = depth, top_k, total_tokens
        self.verify_ms = verify_ms
        self.calibration = calibration
        self.forecast = forecast
        self._pending: tuple[int, DraftTree] | None = None  # the last tree drafted, after how many tokens
        self.cache = DraftCache(drafter, max_len)
        self._d2t = drafter.draft_to_target
        self._features: list[Tensor] = []  # target states of committed positions not yet in the draft cache
        self._covered = 0  # committed positions whose draft step is in the cache

    def reset(self) -> None:
        self._pending = None  # its commits, if any, ended the sequence
        self.cache.length = 0
        self._features = []
        self._covered = 0

    @torch.inference_mode()
    def observe(self, captured: list[Tensor]) -> None:
        """Target hidden states (one tensor per aux layer, rows = newly committed positions, in order). Kept as
        they are until the next draft fuses them all in one matmul: inside a hybrid, rounds that another
        proposer drafts then cost no drafter work."""
        self._features.append(torch.cat(captured, dim=-1))

    @torch.inference_mode()
    def propose(self, tokens: list[int], max_nodes: int) -> DraftTree | None:
        if self._pending is not None:
            self._learn(tokens)
        if max_nodes < 1 or not self._features:
            return None
        t0 = time.perf_counter()
        d, cache = self.drafter, self.cache
        start = self._covered  # draft row t reads (token t+1, feature t); the last token has no feature yet
        n = sum(f.shape[0] for f in self._features)
        if start + n + 1 != len(tokens):
            raise RuntimeError(f"eagle3: features for {start + n} positions, but {len(tokens)} committed tokens")
        if start + n + self.depth * self.top_k + 1 > cache.max_len:
            return None  # no room for a tree: the engine falls back to a plain step
        feats = d.fuse(torch.cat(self._features).to(d.norm.weight.dtype))
        self._features = []
        # Every new row's K/V goes to the cache; only the last row drafts, so only it is carried through the layer
        # (it sees every row: no mask).
        h, logp = d.step(torch.tensor(tokens[start + 1 : start + n + 1]), feats, torch.arange(start, start + n),
                         cache, start, None, out_rows=slice(-1, None))
        self._covered = cache.length = start + n
        base = cache.length
        if self.top_k == 1 and self.verify_ms is None:  # a chain (the paper's protocol): no host sync until the end
            return DraftTree.chain(self._chain(logp[-1], h[-1], base, min(self.depth, self.total_tokens, max_nodes)))
        total = min(self.total_tokens, max_nodes)
        cut = grow = None
        if self.verify_ms is not None:  # the drafting spent so far is part of this round's cost
            verify_ms, calibrated = self.verify_ms, self.calibration or (lambda probs: probs)

            def cut(probs: list[float]) -> int:
                return best_cut(calibrated(probs), (time.perf_counter() - t0) * 1e3, verify_ms)

            if self.forecast is not None:
                def grow(probs: list[float], frontier: list[float]) -> bool:
                    return self.forecast.pays(probs, frontier, (time.perf_counter() - t0) * 1e3, total, calibrated)

        tree = self._tree(logp[-1], h[-1], base, total, cut, grow)
        if not len(tree):
            return None
        if self.calibration is not None:
            self._pending = (len(tokens), tree)
        return tree

    def _learn(self, tokens: list[int]) -> None:
        """Hand the calibration which nodes of the last tree the verifier took (the tokens committed since)."""
        after, tree = self._pending
        self._pending = None
        taken = tree.taken_by(tokens[after:])
        known = [i for i, t in enumerate(taken) if t is not None]
        self.calibration.update([tree.path_probs[i] for i in known], [taken[i] for i in known])

    def _tree(self, root_logp: Tensor, root_h: Tensor, base: int, total: int, cut=None, grow=None) -> DraftTree:
        """An EAGLE-2 dynamic tree grown in the draft cache's scratch rows past `base` (`cut`, `grow`:
        `dynamic_tree`'s); each expansion's children and time go to the forecast."""
        d, cache = self.drafter, self.cache
        row_of: dict[int, int] = {}
        hidden_of: dict[int, Tensor] = {}
        used = 0

        def expand(nodes: list[int], toks: list[int], parents: list[int]) -> Tensor:
            nonlocal used
            t = time.perf_counter()
            m = len(nodes)
            mask, depth_of = scratch_mask(nodes, parents, row_of, base, used, root_h.dtype)
            parent_h = [hidden_of[parents[node]] if parents[node] >= 0 else root_h for node in nodes]
            ids = self._d2t[torch.tensor([toks[x] for x in nodes])]
            hs, lp = d.step(ids, torch.stack(parent_h), torch.tensor([base - 1 + dd for dd in depth_of]), cache,
                            base + used, mask)
            for r, node in enumerate(nodes):
                row_of[node] = used + r
                hidden_of[node] = hs[r]
            used += m
            if self.forecast is not None:
                cond = torch.topk(lp, self.top_k, dim=-1).values.exp().tolist()
                self.forecast.observe(cond, (time.perf_counter() - t) * 1e3)
            return lp

        tree = dynamic_tree(root_logp, expand, self.depth, self.top_k, total, cut, grow)
        return DraftTree(self._d2t[torch.tensor(tree.tokens, dtype=torch.long)].tolist(), tree.parents,
                         path_probs=tree.path_probs)

    def _chain(self, root_logp: Tensor, root_h: Tensor, base: int, length: int) -> list[int]:
        """Each draft the argmax after the one before, stepped on the drafter's device; what `dynamic_tree` gives
        with top_k 1 (draft i at position base + i, its K/V in scratch row i, seeing every row before it)."""
        d, cache = self.drafter, self.cache
        tok, h = root_logp.argmax(), root_h
        drafted = [tok]
        for i in range(length - 1):
            visible = torch.zeros((1, base + i + 1), dtype=h.dtype)
            hs, lp = d.step(self._d2t[tok][None], h[None], torch.tensor([base + i]), cache, base + i, visible)
            tok, h = lp[0].argmax(), hs[0]
            drafted.append(tok)
        return self._d2t[torch.stack(drafted)].tolist()

