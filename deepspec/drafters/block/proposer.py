"""Drafting with a block drafter: one non-causal forward per round over a context-only KV cache.

The engine hands over target features of committed positions (`observe`); their context keys /
values go into the drafter's cache once. Each round the block [last token, M, ..., M] sits at the
next positions and sees the whole cache (every context key is before its anchor), so the forward needs
no mask and nothing of the block is kept. Drafts are read left to right: the Markov head's bias
depends on the token chosen before, greedily or by sampling from exactly the distribution recorded as
the node's q (so verification stays lossless under sampling).

Length (all decided from draft-side quantities only, so the output stays lossless):
  fixed      every draft of the block (capped by `max_length`)
  threshold  stop before the first draft whose calibrated confidence falls below `threshold`
  cost       the length maximising expected committed tokens per second: E(L) = 1 + sum_{j<=L} prod_{i<=j} c_i
             over the draft time plus the measured verify cost of L + 1 rows
Tree (`tree_top_k` > 1): at drafts whose confidence is below `tree_threshold` (without a confidence
head, DFlash: at the first draft, which gates every later one), the next best tokens become siblings
(leaves), verified by the same tree verifier.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from deepspec.decoding.cost import best_cut
from deepspec.decoding.tree import DraftTree
from deepspec.drafters.block.model import BlockDrafter


class ContextCache(torch.nn.Module):
    """Per layer K/V [kv_heads, max_len, hd] of committed positions' context rows, module buffers on the
    drafter's device."""

    def __init__(self, drafter: BlockDrafter, max_len: int):
        super().__init__()
        norm = drafter.norm.weight
        attn = drafter.layers[0].self_attn
        shape = (len(drafter.layers), attn.n_kv, max_len, attn.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=norm.dtype, device=norm.device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=norm.dtype, device=norm.device), persistent=False)
        self.max_len = max_len
        self.length = 0


class BlockProposer:
    def __init__(self, drafter: BlockDrafter, max_len: int, *, length: str = "fixed", max_length: int | None = None,
                 threshold: float = 0.5, temperature: float = 0.0, verify_ms: list[float] | None = None,
                 tree_top_k: int = 1, tree_threshold: float = 0.5, seed: int = 0):
        from deepspec.models.lean import pack_linears

        if length != "fixed" and drafter.confidence_head is None:
            raise ValueError(f"length {length!r} needs a drafter with a confidence head (DSpark)")
        if length == "cost" and not verify_ms:
            raise ValueError("length 'cost' needs the verify-cost curve")
        self.name = drafter.config["algorithm"]
        self.max_length = min(max_length or drafter.drafts, drafter.drafts)
        self.drafter = pack_linears(drafter.eval())  # inference only from here: weights prepacked for oneDNN
        self.capture_layers = drafter.capture_layers
        self.length, self.threshold, self.temperature = length, threshold, temperature
        self.verify_ms = verify_ms
        self.tree_top_k, self.tree_threshold = tree_top_k, tree_threshold
        self.cache = ContextCache(drafter, max_len)
        self._d2t = drafter.draft_to_target
        self._rows = drafter.draft_rows
        self._vocab = drafter.config["vocab_size"]
        self._generator = torch.Generator(device=drafter.norm.weight.device).manual_seed(seed)
        self.draft_ms = 0.0  # running estimate of one drafting round, for the cost model
        self._newest: Tensor | None = None  # context state C of the newest committed position, the anchor's before

    def reset(self) -> None:
        self.cache.length = 0
        self._newest = None

    @torch.inference_mode()
    def observe(self, captured: list[Tensor]) -> None:
        d, c = self.drafter, self.cache
        feats = torch.cat(captured, dim=-1).to(d.norm.weight.dtype)
        n = feats.shape[0]
        if c.length + n > c.max_len:
            raise RuntimeError(f"{self.name}: context cache full ({c.max_len} positions)")
        ctx = d.context(feats)
        self._newest = ctx[-1:]
        for i, (k, v) in enumerate(d.context_kv(ctx, torch.arange(c.length, c.length + n))):
            c.k[i, :, c.length : c.length + n] = k
            c.v[i, :, c.length : c.length + n] = v
        c.length += n

    @torch.inference_mode()
    def propose(self, tokens: list[int], max_nodes: int) -> DraftTree | None:
        d, c = self.drafter, self.cache
        if max_nodes < 1 or c.length == 0:
            return None
        if c.length + 1 != len(tokens):
            raise RuntimeError(f"{self.name}: features for {c.length} positions, but {len(tokens)} committed tokens")
        t0 = time.perf_counter()
        n = c.length  # the anchor (last committed token) sits at position n
        x = d.block_inputs(torch.tensor([tokens[-1]]), self._newest)
        kv = [(c.k[i, :, :n], c.v[i, :, :n]) for i in range(len(d.layers))]
        h = d.backbone(x, torch.arange(n, n + d.block_size), kv, None)[self._rows]  # [D, H]
        limit = min(self.max_length, max_nodes)
        drafted, conf_t, qs, alt_t = self._read_block(h, tokens[-1], limit)
        # The round's reads from the device, after the loop: the first waits for the drafting, the rest find
        # the device idle.
        chain = drafted.tolist()
        conf = conf_t.tolist() if conf_t is not None else []
        alternatives = alt_t.tolist() if alt_t is not None else []
        length = len(chain)
        if self.length == "threshold":  # stop before the first later draft below the threshold
            length = next((j for j in range(1, len(conf)) if conf[j] < self.threshold), length)
        elif self.length == "cost" and conf:
            length = self._cost_length(conf)
        chain = chain[:length]
        ms = (time.perf_counter() - t0) * 1e3
        self.draft_ms = 0.8 * self.draft_ms + 0.2 * ms if self.draft_ms else ms
        if self.temperature > 0:
            return DraftTree.chain(chain, qs[:length])
        # Siblings where a draft is unsure (no confidence head: at the first draft, which gates every later one).
        unsure = [j for j in range(length) if (conf[j] < self.tree_threshold if conf else j == 0)]
        if not alternatives or not unsure:
            return DraftTree.chain(chain)
        tokens_out, parents = list(chain), list(range(-1, length - 1))
        for j in unsure:
            for s in alternatives[j]:
                if len(tokens_out) >= max_nodes:
                    break
                tokens_out.append(s)
                parents.append(j - 1)  # a sibling of draft j: same parent
        return DraftTree(tokens_out, parents)

    def _read_block(self, h: Tensor, anchor: int, limit: int) -> tuple[Tensor, Tensor | None, list[Tensor], Tensor | None]:
        """Drafts read left to right from the block's states h [D, H], all on the drafter's device with no host
        sync: the Markov head's bias and the confidence follow the token chosen before (greedy, or sampled
        from exactly the q it records). Returns the drafts' target ids [limit], their confidences [limit]
        (None without a confidence head), each sampled draft's q over the target vocabulary, and the next
        best target ids [limit, tree_top_k - 1] for siblings (greedy with tree_top_k > 1)."""
        d = self.drafter
        base = d.lm_head(h).float()  # every row, as training reads them (fewer rows may round differently)
        sampled = self.temperature > 0
        prev = torch.tensor(anchor)  # target id of the token before draft j
        carry = None
        drafted, confs, qs, alts = [], [], [], []
        for j in range(limit):
            logits, state = base[j], None
            if d.markov_head is not None:
                state = d.markov_head.state(prev, carry)
                logits = logits + d.markov_head.bias(state, h[j]).float()
                carry = state
            if d.confidence_head is not None:
                confs.append(d.confidence(h[j], state, j, sampled).reshape(()))
            if sampled:
                q = torch.softmax(logits / self.temperature, dim=-1)
                tok = torch.multinomial(q, 1, generator=self._generator)[0]
                full = torch.zeros(self._vocab, dtype=q.dtype)
                full[self._d2t] = q
                qs.append(full)
            else:
                tok = logits.argmax()
                if self.tree_top_k > 1:
                    alts.append(self._d2t[logits.topk(self.tree_top_k).indices[1:]])
            prev = self._d2t[tok]
            drafted.append(prev)
        return (torch.stack(drafted), torch.stack(confs) if confs else None, qs,
                torch.stack(alts) if alts else None)

    def _cost_length(self, conf: list[float]) -> int:
        """The cost cut over the block's drafts, each accepted with the product of the confidences up to it."""
        alive, accept = 1.0, []
        for c in conf:
            alive *= c
            accept.append(alive)
        return best_cut(accept, self.draft_ms, self.verify_ms, least=1)
