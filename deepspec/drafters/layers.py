"""Building blocks shared by every trained drafter: one RMSNorm, one SwiGLU MLP, one RoPE, one folder format."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepspec.models.lean import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """Llama's SwiGLU feed-forward (HF parameter names, so state dicts load into serving engines)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def inv_freq(c: dict[str, Any]) -> Tensor:
    """RoPE inverse frequencies; scaled variants (llama3, linear, ...) come from transformers' own tables."""
    hd = c["head_dim"]
    scaling = c.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_scaling: unknown rope_type {kind!r}")
    lc = LlamaConfig(hidden_size=c["hidden_size"], num_attention_heads=c["num_attention_heads"], head_dim=hd,
                     rope_theta=c["rope_theta"], rope_scaling=dict(scaling),
                     max_position_embeddings=c.get("max_position_embeddings", 8192))
    freqs, attention_scale = ROPE_INIT_FUNCTIONS[kind](lc, "cpu")
    if abs(float(attention_scale) - 1.0) > 1e-6:
        raise ValueError(f"rope_scaling: rope_type {kind!r} scales attention, which our drafters do not")
    return freqs.float()


def rope(positions: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin [n, head_dim] at `positions` (HF's half-split layout)."""
    angles = torch.outer(positions.float(), freqs)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def target_shape(target_model) -> dict[str, Any]:
    """The decoder-layer shape of a HF target (what a drafter shaped like its layers copies)."""
    tc = target_model.config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    rope_theta = getattr(tc, "rope_theta", None) or (getattr(tc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    shape = {
        "hidden_size": tc.hidden_size, "intermediate_size": tc.intermediate_size,
        "num_attention_heads": tc.num_attention_heads, "num_key_value_heads": tc.num_key_value_heads,
        "head_dim": head_dim, "rms_norm_eps": tc.rms_norm_eps, "rope_theta": float(rope_theta),
        "vocab_size": tc.vocab_size, "target_num_hidden_layers": tc.num_hidden_layers,
        "max_position_embeddings": getattr(tc, "max_position_embeddings", 8192),
    }
    scaling = dict(getattr(tc, "rope_scaling", None) or {})
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":  # e.g. Llama 3.1's llama3 scaling
        shape["rope_scaling"] = {k: v for k, v in scaling.items() if k != "rope_theta"}
    return shape


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    for p in module.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=std)


def default_layers(n_layers: int) -> list[int]:
    """EAGLE-3's choice of fused target states: the inputs of layers 2, L/2 and L-3 (low, middle, high)."""
    return sorted({min(2, n_layers - 1), n_layers // 2, max(n_layers - 3, 0)})


RMS_POSITIONS = 1 << 20  # positions the fc input scale is measured on (a fixed sample, whatever the cache size)


def layer_rms(hidden: Iterable[Tensor], max_positions: int = RMS_POSITIONS) -> Tensor:
    """Median RMS of each fused layer over positions (the first of each sequence, an attention sink with
    activations ~100x larger, left out), over the first `max_positions` positions of `hidden` ([n, K, H]
    per sequence, read lazily)."""
    parts, seen = [], 0
    for h in hidden:
        if h.shape[0] > 1:
            parts.append(h[1:].float().pow(2).mean(-1).sqrt())  # [n - 1, K]
            seen += h.shape[0] - 1
        if seen >= max_positions:
            break
    return torch.cat(parts).median(dim=0).values.clamp(min=1e-6)


def scale_fc_inputs(model: nn.Module, train_hidden: Iterable[Tensor], where: str, say=print) -> None:
    """Set a drafter's fixed fc input scale (when it has one) to 1 / median RMS of each fused layer."""
    if not hasattr(model, "fc_in_scale"):
        return
    rms = layer_rms(train_hidden)
    model.fc_in_scale.copy_((1.0 / rms).repeat_interleave(model.fc_in_scale.numel() // rms.numel()))
    say(f"[train] {where}: fc input scale 1/RMS per layer, RMS {[round(float(r), 2) for r in rms]}")
