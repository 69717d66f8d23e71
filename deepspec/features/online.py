"""`features.extract: online`: the target's states computed inside the training job, with no cache written.

`OnlineFeatures` answers what `FeatureStore` answers (the same sequences in the same order, the same layer
columns, in `features.dtype`), each by a target forward under `no_grad` when the trainer asks for it, so
training on it takes the steps training on the cache would. `OnlineSoftTargets` turns each final state into
its top-k soft targets on the spot. The price is the target forward in every step (and one pass over the
training split for the draft vocabulary); the gain is no storage at all, which is what a cluster without
tens of terabytes of disk needs.
"""

from __future__ import annotations

from typing import Any

import torch

from deepspec import io
from deepspec.config import Config
from deepspec.devices import on
from deepspec.features.extract import DTYPES, shard_rows, capture, feature_layers, layer_columns
from deepspec.layout import train_data_file
from deepspec.training.targets import soft_targets


class OnlineFeatures:
    """The regenerated training data, its target states computed per sequence (the last one kept, since the
    trainer reads a sequence's states and then its final state)."""

    def __init__(self, cfg: Config, target, layers: list[int], device: torch.device):
        src = train_data_file(cfg)
        if not src.is_file():
            raise FileNotFoundError(f"{src}: training data missing; run `deepspec prepare --train` first")
        rows = io.read_jsonl(src)
        self.backend, self.device, self.dtype = target.backend, device, DTYPES[cfg.features.dtype]
        n_layers = self.backend.config.num_hidden_layers
        self.stored = feature_layers(cfg, n_layers)  # what the cache would hold, so the columns match it
        self.cols = layer_columns(self.stored, layers, n_layers)
        cut = cfg.features.max_len
        shards = cfg.features.shards
        self.seqs = [(r["input_ids"][:cut], r["loss_mask"][:cut]) for s in range(shards) for r in shard_rows(rows, s, shards)]
        self._last: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.seqs)

    def _states(self, i: int) -> torch.Tensor:
        if self._last is None or self._last[0] != i:
            with torch.no_grad(), on(self.device):
                feats = capture(self.backend, self.seqs[i][0], self.stored).to(self.dtype).cpu()
            self._last = (i, feats)
        return self._last[1]

    def loss_mask(self, i: int) -> torch.Tensor:
        return torch.tensor(self.seqs[i][1], dtype=torch.bool)

    def final(self, i: int) -> torch.Tensor:
        return self._states(i)[:, -1]

    def sequence(self, i: int) -> dict[str, Any]:
        return {"input_ids": torch.tensor(self.seqs[i][0], dtype=torch.long), "loss_mask": self.loss_mask(i),
                "hidden": self._states(i)[:, self.cols]}


class OnlineSoftTargets:
    """`soft_targets` of each sequence's final state, computed when asked."""

    def __init__(self, features: OnlineFeatures, lm_head: torch.Tensor, k: int):
        self.features, self.lm_head, self.k = features, lm_head, min(k, lm_head.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return soft_targets([{"final": self.features.final(i)}], self.lm_head, self.k)[0]
