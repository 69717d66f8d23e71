"""Medusa-1 heads over the target's final normed hidden state.

Head k (0-based) is a residual SiLU block stack then a read-out over the draft vocabulary; at position t it
predicts the token at t + k + 2, the one the target's own head predicts at t + k + 1. So head k is
distilled from the target's distribution at t + k + 1 (soft targets from the feature cache), and at decode
time the state of the last committed position yields the next `heads` drafts in one step, without seeing
any drafted token. Names follow vLLM's Medusa model: `blocks.{k}.layers.{j}` and `lm_heads.{k}` (or one
`lm_head` shared by every head, `original_lm_head`); `token_map` maps draft rows to target ids.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepspec.drafters.checkpoint import FolderCheckpoint
from deepspec.kernels.head_loss import head_soft_ce

ALGORITHM = "medusa"


class ResidualBlock(nn.Module):
    """x + SiLU(W x + b), `layers` times; zero-initialised, so a fresh head starts as the identity."""

    def __init__(self, hidden: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = x + F.silu(layer(x))
        return x


class MedusaHeads(FolderCheckpoint, nn.Module):
    ALGORITHMS = (ALGORITHM,)

    def __init__(self, config: dict[str, Any], embed: Tensor | None = None):
        super().__init__()
        c = self.config = dict(config)
        h, vd = c["hidden_size"], c["draft_vocab_size"]
        self.blocks = nn.ModuleList(ResidualBlock(h, c["head_layers"]) for _ in range(c["num_heads"]))
        if c["share_head"]:
            self.lm_head = nn.Linear(h, vd, bias=False)
        else:
            self.lm_heads = nn.ModuleList(nn.Linear(h, vd, bias=False) for _ in range(c["num_heads"]))
        self.register_buffer("token_map", torch.arange(vd, dtype=torch.long))

    @classmethod
    def for_target(cls, target_model, draft_ids: Tensor, heads: int, head_layers: int, share_head: bool,
                   seed: int = 0, **meta: Any) -> "MedusaHeads":
        """Fresh heads for this target: blocks at the identity, read-outs from the target's head rows."""
        tc = target_model.config
        config = {"architectures": ["MedusaModel"], "model_type": "medusa", "algorithm": ALGORITHM,
                  "hidden_size": tc.hidden_size, "vocab_size": tc.vocab_size, "draft_vocab_size": int(draft_ids.numel()),
                  "num_heads": heads, "head_layers": head_layers, "share_head": share_head,
                  "target_num_hidden_layers": tc.num_hidden_layers, **meta}
        torch.manual_seed(seed)
        model = cls(config)
        rows = target_model.get_output_embeddings().weight.detach()[draft_ids].float()
        with torch.no_grad():
            for block in model.blocks:
                for layer in block.layers:
                    layer.weight.zero_()
                    layer.bias.zero_()
            for head in model.readouts():
                head.weight.copy_(rows)
            model.token_map.copy_(draft_ids)
        return model

    @property
    def heads(self) -> int:
        return self.config["num_heads"]

    @property
    def draft_to_target(self) -> Tensor:
        return self.token_map

    def readouts(self) -> list[nn.Linear]:
        return [self.lm_head] * self.heads if self.config["share_head"] else list(self.lm_heads)

    def forward(self, final: Tensor) -> list[Tensor]:
        """Logits [n, Vd] of each head from final normed states [n, H]."""
        return [head(block(final)) for block, head in zip(self.blocks, self.readouts())]

    def medusa_loss(self, final: Tensor, input_ids: Tensor, target_idx: Tensor, target_p: Tensor, target_top: Tensor,
                    weight: Tensor, trained: Tensor, steps: int,
                    chunked_head: bool = False) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Per-head soft cross-entropy sums and top-1 hits over one sequence (the `step_loss` contract: head k
        of base t against the target at t + 1 + k; `input_ids` unused, the heads see no token). `chunked_head`:
        each head's readout and loss in row chunks (`head_soft_ce`), so no [T, V] tensor is kept per head."""
        T = final.shape[0]
        losses, hits = [], []
        alive = torch.ones(T - 1, dtype=torch.bool)
        run_length = torch.zeros(T - 1, dtype=torch.long)
        x = final[: T - 1].to(self.token_map.device)
        logits = None if chunked_head else self(x)
        for k in range(min(steps, self.heads)):
            n = T - 1 - k  # bases whose target t + 1 + k exists
            idx = torch.arange(n) + 1 + k
            if chunked_head:
                ce, top = head_soft_ce(self.blocks[k](x[:n]), self.readouts()[k].weight, target_idx[idx], target_p[idx])
            else:
                logp = torch.log_softmax(logits[k][:n].float(), dim=-1)
                ce, top = -(target_p[idx] * logp.gather(-1, target_idx[idx])).sum(-1), logp.argmax(-1)
            losses.append(ce.mul(weight[idx]).sum())
            hit = torch.zeros(T - 1, dtype=torch.bool)
            hit[:n] = self.token_map[top] == target_top[idx]
            hits.append((hit[:n] & trained[idx]).sum())
            run_length += (alive & hit).long()
            alive &= hit
        return losses, hits, run_length
