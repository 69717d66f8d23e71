"""Fallback target backend for any HF causal LM: HF's own forward with a float tree mask and a DynamicCache.

Slower than the lean backend (HF's per-layer bookkeeping, a cache that grows by concatenation), but it
runs architectures the lean forward does not know, with the same engine and the same guarantees.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deepspec.models.attention import sdpa_scope


class HFCache:
    """Engine-facing view of a DynamicCache: committed length, scratch rows, in-place-style compaction."""

    def __init__(self, max_len: int):
        from transformers import DynamicCache

        self._factory = DynamicCache
        self.max_len = max_len
        self.store = DynamicCache()
        self.length = 0

    def reset(self) -> None:
        self.store = self._factory()
        self.length = 0

    def room(self) -> int:
        return self.max_len - self.length

    def commit(self, n_written: int, keep: list[int] | None = None) -> None:
        start = self.length
        n = n_written if keep is None else len(keep)
        prefix = keep is None or (n > 0 and keep[-1] == n - 1)  # kept rows already in place
        for layer in self.store.layers:
            if not getattr(layer, "is_initialized", True) or layer.keys is None:
                continue
            if prefix:
                layer.keys, layer.values = layer.keys[..., : start + n, :], layer.values[..., : start + n, :]
            else:
                rows = torch.tensor(keep, device=layer.keys.device) + start
                layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys[..., rows, :]], dim=-2)
                layer.values = torch.cat([layer.values[..., :start, :], layer.values[..., rows, :]], dim=-2)
        self.length += n


class HFBackend:
    def __init__(self, hf_model: torch.nn.Module, max_len: int = 4096):
        self.model = hf_model
        self.config = hf_model.config
        self.dtype = next(hf_model.parameters()).dtype
        self.vocab_size = hf_model.config.vocab_size
        self.device = next(hf_model.parameters()).device
        self.cache = HFCache(max_len)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        mask: Tensor | None = None,
        logits_rows: Tensor | slice | None = None,
        capture_layers: tuple[int, ...] = (),
    ) -> tuple[Tensor, list[Tensor]]:
        n = input_ids.shape[0]
        if self.cache.length + n > self.cache.max_len:
            raise ValueError(f"KV cache overflow: {self.cache.length + n} positions needed, room for {self.cache.max_len}")
        # The store may still hold scratch rows of an earlier call only if a caller skipped commit.
        with sdpa_scope(self.device):
            out = self.model(
                input_ids=input_ids[None],
                position_ids=positions[None],
                attention_mask=None if mask is None else mask[None, None],
                cache=self.cache.store,
                use_cache=True,
                output_hidden_states=bool(capture_layers),
            )
        logits = out.logits[0]
        if logits_rows is not None:
            logits = logits[logits_rows]
        captured = [out.hidden_states[i][0] for i in capture_layers] if capture_layers else []
        return logits, captured
