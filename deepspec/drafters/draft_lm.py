"""`draft_lm`: an independent causal LM that shares the target's tokenizer and drafts with its own KV cache.

Any Llama-family model works; `layers` keeps only the first N decoder layers and `quantize: int8` reads
int8 weights, so the default can draft with a cheap copy of the target itself (no other model shares
SmolLM2's tokenizer offline). Drafts are deterministic top-k choices (q one-hot), which the verifier
accepts exactly under greedy and sampled decoding alike.
"""

from __future__ import annotations

import torch

from deepspec.decoding.tree import DraftTree, dynamic_tree, scratch_mask
from deepspec.models.lean import LeanLlama


def check_same_tokenizer(draft_tok, target_tok, where: str) -> None:
    """Refuse a drafter whose token ids mean something else than the target's."""
    dv, tv = draft_tok.get_vocab(), target_tok.get_vocab()
    if dv != tv:
        differ = sum(1 for k, v in dv.items() if tv.get(k) != v) + len(set(tv) - set(dv))
        raise ValueError(f"{where}: the draft tokenizer differs from the target's ({len(dv)} vs {len(tv)} tokens, {differ} differ)")


class DraftLMProposer:
    name = "draft_lm"

    def __init__(self, draft: LeanLlama, depth: int = 4, top_k: int = 1, total_tokens: int = 8):
        self.draft = draft
        self.depth, self.top_k, self.total_tokens = depth, top_k, total_tokens
        self._tokens: list[int] = []  # what the draft cache holds, row by row

    def reset(self) -> None:
        self.draft.cache.reset()
        self._tokens = []

    def _sync(self, tokens: list[int]) -> torch.Tensor:
        """Bring the draft cache up to `tokens` (committed rows never change within one generation);
        returns the draft's log-probs after the last token."""
        cache = self.draft.cache
        have = len(self._tokens)
        if self._tokens != tokens[:have]:  # a different sequence: start over
            self.reset()
            have = 0
        new = tokens[have:]
        logits, _ = self.draft.forward(torch.tensor(new), torch.arange(have, have + len(new)), logits_rows=slice(-1, None))
        cache.commit(len(new))
        self._tokens = list(tokens)
        return torch.log_softmax(logits[0].float(), -1)

    def propose(self, tokens: list[int], max_nodes: int) -> DraftTree | None:
        if max_nodes < 1:
            return None
        root_logp = self._sync(tokens)
        cache = self.draft.cache
        base = cache.length  # the root (last committed token) sits at base - 1
        if cache.room() < self.depth * self.top_k * self.top_k + 1:
            return None
        row_of: dict[int, int] = {}  # tree node -> its scratch row in the draft cache
        used = 0

        def expand(nodes: list[int], toks: list[int], parents: list[int]) -> torch.Tensor:
            nonlocal used
            n = len(nodes)
            mask, depth_of = scratch_mask(nodes, parents, row_of, base, used, self.draft.dtype)
            positions = torch.tensor([base - 1 + d for d in depth_of])
            logits, _ = self.draft.forward(torch.tensor([toks[x] for x in nodes]), positions, mask=mask, write_at=base + used)
            for r, node in enumerate(nodes):
                row_of[node] = used + r
            used += n
            return torch.log_softmax(logits.float(), -1)

        tree = dynamic_tree(root_logp, expand, self.depth, self.top_k, min(self.total_tokens, max_nodes))
        return tree
