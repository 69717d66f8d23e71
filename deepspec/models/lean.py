"""A lean forward for Llama-family decoders (Llama, Mistral, Qwen2/3, SmolLM) over an engine-owned KV cache.

Why not HF's forward: on a 2-core CPU the per-call Python and cache bookkeeping of HF's modules is a
large share of a 135M model's step, and speculative decoding needs explicit positions, an arbitrary
tree mask and in-place compaction of the cache, which HF's caches do not offer. Weights are taken
from the loaded HF model (no model file is copied); q/k/v and gate/up are fused into one matmul each.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from deepspec.decoding.verify import Sampling, target_probs
from deepspec.models.attention import attend, fold_mask, sdpa_scope

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class _Layer:
    wqkv: Tensor
    bqkv: Tensor | None
    wo: Tensor
    w_gate_up: Tensor
    w_down: Tensor
    attn_norm: Tensor
    mlp_norm: Tensor
    q_norm: Tensor | None
    k_norm: Tensor | None


class KVCache(torch.nn.Module):
    """Preallocated keys/values for all layers: [layers, kv_heads, max_len, head_dim], batch size one.

    Allocated once, as module buffers (they move with `.to(device)`); `length` counts committed
    positions, rows past it are scratch space for the tokens being verified, and rolling back or
    compacting is a matter of indices (`commit`), never a reallocation.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (n_layers, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def room(self) -> int:
        return self.max_len - self.length

    def commit(self, n_written: int, keep: list[int] | None = None) -> None:
        """Make the scratch rows `keep` (offsets from `length`, ascending) the next committed positions.

        `keep=None` keeps the first `n_written` rows as they are (the chain / autoregressive case). The
        offsets are host integers, so deciding whether anything moves never waits on the device.
        """
        if keep is None:
            self.length += n_written
            return
        n = len(keep)
        start = self.length
        if n and keep[-1] != n - 1:  # not already a prefix of the scratch rows: gather them into place
            src = torch.tensor(keep, device=self.k.device) + start
            self.k[:, :, start : start + n] = self.k[:, :, src]
            self.v[:, :, start : start + n] = self.v[:, :, src]
        self.length += n


@dataclass(frozen=True)
class OneDNNWeight:
    """A linear weight reordered once into oneDNN's blocked layout (`LeanLlama(linear="onednn")`).

    Plain matmuls over a few rows read the weights far more slowly than over one (measured on one
    SmolLM2 layer: 4 rows 1.5-2.4x one row); prepacked, 4 rows cost about what 1 row does
    (`deepspec bench decode` has both curves)."""

    packed: Tensor


def onednn_available() -> bool:
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8), 1)
        return True
    except (RuntimeError, AttributeError):
        return False


def _pack_onednn(w: Tensor) -> OneDNNWeight:
    return OneDNNWeight(torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 8))


class PackedLinear(torch.nn.Module):
    """Inference-only stand-in for an `nn.Linear` with its weight prepacked for oneDNN."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = _pack_onednn(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        return _linear(x.reshape(-1, shape[-1]), self.weight, self.bias).view(*shape[:-1], -1)


def pack_linears(module: torch.nn.Module) -> torch.nn.Module:
    """Swap every float32 `nn.Linear` of an inference-only module for a `PackedLinear`, in place (drafters
    run a few rows per step, where plain matmuls are least efficient). A no-op without oneDNN."""
    if not onednn_available():
        return module
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear) and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
            setattr(module, name, PackedLinear(child))
        else:
            pack_linears(child)
    return module


def _linear(x: Tensor, weight, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T. A oneDNN-packed weight goes through oneDNN's linear. Otherwise, for several rows MKL
    is markedly faster with the weight as the left operand (measured 1.3-1.5x at 4-16 rows on AVX2); a
    single row stays a matrix-vector product. A packed int8 weight (see `LeanLlama.quantize_int8`) goes
    through fbgemm's dynamic linear."""
    if isinstance(weight, OneDNNWeight):
        return torch.ops.mkldnn._linear_pointwise(x, weight.packed, bias, "none", [], "")
    if not isinstance(weight, Tensor):
        out = torch.ops.quantized.linear_dynamic(x, weight, True)  # reduce_range: AVX2 fbgemm saturates without it
        return out if bias is None else out + bias
    if x.shape[0] == 1:
        return F.linear(x, weight, bias)
    out = (weight @ x.T).T
    return out if bias is None else out + bias


def normed_final(backend, h: Tensor) -> Tensor:
    """The target's final *normed* hidden state from a capture of layer id L: HF's hidden_states[L] is already
    normed, ours is the norm's input."""
    return rms_norm(h, backend.norm, backend.eps) if isinstance(backend, LeanLlama) else h


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's RMSNorm exactly: statistics in float32 whatever the model dtype (a no-op cast for fp32 models)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class LeanLlama:
    """Inference-only Llama-family forward. `forward` writes K/V of the new tokens at the cache's scratch
    rows and returns logits for the requested rows (all rows by default)."""

    def __init__(self, hf_model: torch.nn.Module, max_len: int = 4096, n_layers: int | None = None,
                 linear: str = "auto"):
        """`linear`: "onednn" prepacks every weight for oneDNN (float32 on CPU), "torch" keeps plain
        matmuls, "auto" packs where oneDNN can."""
        cfg = hf_model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"lean backend supports {SUPPORTED_MODEL_TYPES}, not model_type={cfg.model_type!r}")
        inner = hf_model.model
        self.config = cfg
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.vocab_size = cfg.vocab_size
        self.embed = inner.embed_tokens.weight.detach()
        self.norm = inner.norm.weight.detach()
        self.lm_head = hf_model.lm_head.weight.detach()
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        rope = inner.rotary_emb
        self.inv_freq = rope.inv_freq.detach().to(torch.float32)
        self.rope_scale = float(getattr(rope, "attention_scaling", 1.0))
        self.layers: list[_Layer] = []
        layers = list(inner.layers)
        if n_layers is not None:
            if not 1 <= n_layers <= len(layers):
                raise ValueError(f"n_layers must be in 1..{len(layers)}, got {n_layers}")
            layers = layers[:n_layers]
        for layer in layers:
            att, mlp = layer.self_attn, layer.mlp
            wqkv = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).detach()
            bqkv = None
            if att.q_proj.bias is not None:
                bqkv = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]).detach()
            self.layers.append(
                _Layer(
                    wqkv=wqkv,
                    bqkv=bqkv,
                    wo=att.o_proj.weight.detach(),
                    w_gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                    w_down=mlp.down_proj.weight.detach(),
                    attn_norm=layer.input_layernorm.weight.detach(),
                    mlp_norm=layer.post_attention_layernorm.weight.detach(),
                    q_norm=att.q_norm.weight.detach() if hasattr(att, "q_norm") else None,
                    k_norm=att.k_norm.weight.detach() if hasattr(att, "k_norm") else None,
                )
            )
        self.intermediate = self.layers[0].w_gate_up.shape[0] // 2
        packable = self.dtype == torch.float32 and self.device.type == "cpu" and onednn_available()
        if linear == "onednn" and not packable:
            raise ValueError("linear='onednn' needs a float32 model on a CPU with oneDNN")
        self.linear = "onednn" if linear == "onednn" or (linear == "auto" and packable) else "torch"
        if self.linear == "onednn":
            for layer in self.layers:
                layer.wqkv, layer.wo = _pack_onednn(layer.wqkv), _pack_onednn(layer.wo)
                layer.w_gate_up, layer.w_down = _pack_onednn(layer.w_gate_up), _pack_onednn(layer.w_down)
            self.lm_head, self.lm_head_t = _pack_onednn(self.lm_head), None
        else:
            # A single row reads the vocabulary matrix fastest in [hidden, vocab] layout (measured 5.7 vs
            # 9.3 ms for 49152x576 on AVX2, ~8% of a SmolLM2 step); several rows prefer [vocab, hidden].
            self.lm_head_t = self.lm_head.t().contiguous()
        self.cache = KVCache(len(self.layers), self.n_kv_heads, self.head_dim, max_len, self.dtype, self.device)
        self._rope_table(max_len)

    def quantize_int8(self) -> "LeanLlama":
        """Per-channel int8 weights through fbgemm (about 4x fewer bytes read per step).

        For drafters only: activations are quantised per call, so a row's logits depend on the other
        rows in the call (not batch-consistent); a target quantised this way would not be lossless.
        """
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            raise RuntimeError("int8 drafting needs torch's fbgemm engine (x86 CPUs)")
        if self.linear != "torch":
            raise ValueError("quantize_int8 needs the plain weights: build the model with linear='torch'")

        def pack(w: Tensor):
            w = w.float()
            scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).double()
            with warnings.catch_warnings():  # torch marks qint8 tensor creation deprecated; fbgemm still needs it
                warnings.simplefilter("ignore", UserWarning)
                q = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            return torch.ops.quantized.linear_prepack(q, None)

        for layer in self.layers:
            layer.wqkv, layer.wo = pack(layer.wqkv), pack(layer.wo)
            layer.w_gate_up, layer.w_down = pack(layer.w_gate_up), pack(layer.w_down)
        self.lm_head = pack(self.lm_head)
        self.lm_head_t = None
        return self

    def _rope_table(self, max_len: int) -> None:
        t = torch.arange(max_len, dtype=torch.float32, device=self.device)
        freqs = torch.outer(t, self.inv_freq.to(self.device))
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = (emb.cos() * self.rope_scale).to(self.dtype)
        self.sin = (emb.sin() * self.rope_scale).to(self.dtype)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        mask: Tensor | None = None,
        logits_rows: Tensor | slice | None = None,
        capture_layers: tuple[int, ...] = (),
        write_at: int | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Run `n` new tokens (1-D `input_ids`) at RoPE `positions`.

        K/V go to cache rows [write_at, write_at+n) (default: the committed length, i.e. the first
        scratch rows; drafters building a tree write further scratch rows). `mask` is an additive float
        mask [n, write_at+n] (None: causal among the new tokens, all earlier rows visible). Returns
        logits of `logits_rows` and the inputs of the layers in `capture_layers` (the hidden state
        entering layer i; i = n_layers is the input of the final norm).
        """
        cache = self.cache
        n = input_ids.shape[0]
        start = cache.length if write_at is None else write_at
        if start + n > cache.max_len:
            raise ValueError(f"KV cache overflow: {start + n} positions needed, room for {cache.max_len}")
        if mask is None and n > 1:
            causal = torch.full((n, n), float("-inf"), dtype=self.dtype, device=self.device).triu_(1)
            mask = torch.cat([torch.zeros((n, start), dtype=self.dtype, device=self.device), causal], dim=1)
        with sdpa_scope(self.device):
            h, captured = self._layers(input_ids[None], positions[None], None if mask is None else mask[None, None],
                                       cache.k.unsqueeze(1), cache.v.unsqueeze(1), start, capture_layers)
        h = h[0]
        captured = [c[0] for c in captured]
        if logits_rows is not None:
            h = h[logits_rows]
        return self.logits(h), captured

    def logits(self, h: Tensor) -> Tensor:
        """Final norm and head over rows [m, d]."""
        h = rms_norm(h, self.norm, self.eps)
        if h.shape[0] == 1 and self.lm_head_t is not None:
            return h @ self.lm_head_t
        return _linear(h, self.lm_head)

    def _layers(self, input_ids: Tensor, positions: Tensor, mask: Tensor | None, k_store: Tensor, v_store: Tensor,
                start: int, capture_layers: tuple[int, ...] = ()) -> tuple[Tensor, list[Tensor]]:
        """The decoder stack over B sequences of n new tokens each ([B, n] ids and positions), writing K/V at
        columns [start, start+n) of k_store / v_store [layers, B, kv_heads, S, head_dim] and attending to
        columns [0, start+n) under the additive `mask` [B or 1, 1, n, start+n]. Returns (h [B, n, d], captured)."""
        B, n = input_ids.shape
        end = start + n
        h = F.embedding(input_ids, self.embed)  # [B, n, d]
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [B, 1, n, hd]
        captured: list[Tensor] = []
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        mask = fold_mask(mask, nh // nkv)  # once here, not in every layer
        q_size, kv_size = nh * hd, nkv * hd
        for i, layer in enumerate(self.layers):
            if i in capture_layers:
                captured.append(h)
            x = rms_norm(h, layer.attn_norm, self.eps).reshape(B * n, -1)
            qkv = _linear(x, layer.wqkv, layer.bqkv).view(B, n, -1)
            q = qkv[..., :q_size].view(B, n, nh, hd).transpose(1, 2)
            k = qkv[..., q_size : q_size + kv_size].view(B, n, nkv, hd).transpose(1, 2)
            v = qkv[..., q_size + kv_size :].view(B, n, nkv, hd).transpose(1, 2)
            if layer.q_norm is not None:
                q = rms_norm(q, layer.q_norm, self.eps)
                k = rms_norm(k, layer.k_norm, self.eps)
            q = self._rope(q, cos, sin)
            k = self._rope(k, cos, sin)
            k_store[i, :, :, start:end] = k
            v_store[i, :, :, start:end] = v
            attn = attend(q, k_store[i, :, :, :end], v_store[i, :, :, :end], mask)
            h = h + _linear(attn.transpose(1, 2).reshape(B * n, q_size), layer.wo).view(B, n, -1)
            x = rms_norm(h, layer.mlp_norm, self.eps).reshape(B * n, -1)
            gate_up = _linear(x, layer.w_gate_up)
            h = h + _linear(F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :], layer.w_down).view(B, n, -1)
        if len(self.layers) in capture_layers:
            captured.append(h)
        return h, captured

    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                       temperature: float = 0.0, generator: torch.Generator | None = None) -> list[list[int]]:
        """Plain generation for many prompts at once over a batched KV cache (distillation data, not the
        engine: nothing is verified). Each prompt is prefilled on its own, right-aligned in the cache, so
        every decode step writes one cache column for all rows; the columns left of a row's prompt are
        masked out of its attention. Finished rows are dropped from the batch whenever a quarter of it
        has finished. Each answer ends at and includes its first stop token."""
        B, width = len(prompts), max(len(p) for p in prompts)
        S = width + max_new_tokens
        pad = torch.tensor([width - len(p) for p in prompts])
        col = torch.arange(S)
        shape = (len(self.layers), B, self.n_kv_heads, S, self.head_dim)
        k_store = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v_store = torch.zeros(shape, dtype=self.dtype, device=self.device)
        last = []
        for r, p in enumerate(prompts):  # prefill row by row at its own length: no compute spent on padding
            n, at = len(p), width - len(p)
            causal = torch.full((n, n), float("-inf"), dtype=self.dtype, device=self.device).triu_(1)[None, None]
            h, _ = self._layers(torch.tensor([p]), torch.arange(n)[None], causal if n > 1 else None,
                                k_store[:, r : r + 1, :, at:], v_store[:, r : r + 1, :, at:], 0)
            last.append(h[:, -1:])
        h = torch.cat(last)
        stops = set(stop_ids)
        out: list[list[int]] = [[] for _ in prompts]
        rows = torch.arange(B)  # the prompt each batch row holds
        alive = torch.ones(B, dtype=torch.bool)
        lengths = torch.tensor([len(p) for p in prompts])
        for step in range(max_new_tokens):
            logits = self.logits(h[:, -1])
            if temperature > 0:
                nxt = torch.multinomial(target_probs(logits, Sampling(temperature)), 1, generator=generator)[:, 0]
            else:
                nxt = logits.argmax(-1)
            for b, (r, tok) in enumerate(zip(rows.tolist(), nxt.tolist())):
                if alive[b]:
                    out[r].append(tok)
                    alive[b] = tok not in stops
            if step == max_new_tokens - 1 or not bool(alive.any()):
                break
            if int(alive.sum()) <= 0.75 * rows.numel():  # drop finished rows from the batch
                keep = alive.nonzero()[:, 0]
                rows, lengths, pad, nxt, alive = rows[keep], lengths[keep], pad[keep], nxt[keep], alive[keep]
                k_store, v_store = k_store[:, keep], v_store[:, keep]
            at = width + step
            mask = torch.zeros((rows.numel(), 1, 1, at + 1), dtype=self.dtype)
            mask.masked_fill_((col[None, : at + 1] < pad[:, None])[:, None, None], float("-inf"))
            h, _ = self._layers(nxt[:, None], (lengths + step)[:, None], mask, k_store, v_store, at)
        return out

