"""EAGLE-3: a one-layer drafter over fused target features, with a reduced vocabulary.

Model (names follow vLLM's `LlamaForCausalLMEagle3`, so the state dict is the serving format):
  fc            [H, K*H]  fuses the K captured target hidden states of a position
  midlayer      one Llama decoder layer whose q/k/v read [input_layernorm(embed(token)) || hidden_norm(h)]
                and whose residual stream is h
  norm, lm_head final norm and a head over the draft vocabulary; `d2t[i]` is the offset from draft id i
                to its target id, `t2d` marks target ids in the draft vocabulary
The token embedding is the target's own (frozen, not stored).

A draft step at position t reads (token x_{t+1}, h_t) and returns h'_t, whose logits predict x_{t+2}.
h_t is fc(target features at t) for committed positions and the draft's own h' of the parent for tree
nodes, which is exactly what training-time test (`ttt_loss`) rehearses: step k attends to the committed
prefix plus its own k earlier steps at the same position.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepspec.drafters.checkpoint import FolderCheckpoint
from deepspec.drafters.layers import MLP, RMSNorm, init_normal, inv_freq, rope, rotate, target_shape
from deepspec.kernels.head_loss import head_soft_ce

ALGORITHM = "eagle3"


class _Attention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_kv: int, head_dim: int):
        super().__init__()
        self.q_proj = nn.Linear(2 * hidden, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(2 * hidden, n_kv * head_dim, bias=False)
        self.v_proj = nn.Linear(2 * hidden, n_kv * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)


class _MidLayer(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        h = c["hidden_size"]
        self.hidden_norm = RMSNorm(h, c["rms_norm_eps"])
        self.input_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.self_attn = _Attention(h, c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"])
        self.post_attention_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.mlp = MLP(h, c["intermediate_size"])


class Eagle3Drafter(FolderCheckpoint, nn.Module):
    ALGORITHMS = (ALGORITHM,)

    def __init__(self, config: dict[str, Any], embed: Tensor):
        super().__init__()
        c = self.config = dict(config)
        h, k = c["hidden_size"], len(c["aux_layers"])
        self.fc = nn.Linear(k * h, h, bias=False)
        if c.get("fc_input_scale"):  # a fixed 1/RMS per fused layer (their scales differ ~8x); folded on export
            self.register_buffer("fc_in_scale", torch.ones(k * h))
        self.midlayer = _MidLayer(c)
        self.norm = RMSNorm(h, c["rms_norm_eps"])
        self.lm_head = nn.Linear(h, c["draft_vocab_size"], bias=False)
        self.register_buffer("d2t", torch.zeros(c["draft_vocab_size"], dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(c["vocab_size"], dtype=torch.bool))
        self.register_buffer("embed", embed.detach(), persistent=False)  # the target's, frozen
        hd = c["head_dim"]
        self.register_buffer("inv_freq", inv_freq(c), persistent=False)
        self.n_heads, self.n_kv, self.head_dim = c["num_attention_heads"], c["num_key_value_heads"], hd

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def for_target(cls, target_model, aux_layers: list[int], draft_ids: Tensor, init_head: bool = True,
                   seed: int = 0, **meta: Any) -> "Eagle3Drafter":
        """A fresh drafter shaped like the target's layers; `draft_ids` are the target ids of the draft vocab."""
        config = {
            "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "algorithm": ALGORITHM,
            **target_shape(target_model), "draft_vocab_size": int(draft_ids.numel()), "num_hidden_layers": 1,
            "aux_layers": list(aux_layers), "tie_word_embeddings": False, **meta,
        }
        torch.manual_seed(seed)
        model = cls(config, target_model.get_input_embeddings().weight)
        init_normal(model)
        draft_ids = draft_ids.sort().values
        model.d2t.copy_(draft_ids - torch.arange(draft_ids.numel()))
        model.t2d.zero_()
        model.t2d[draft_ids] = True
        if init_head:  # the target's own head over the draft vocabulary: a good output space from step one
            with torch.no_grad():
                model.lm_head.weight.copy_(target_model.get_output_embeddings().weight[draft_ids].float())
                model.norm.weight.copy_(target_model.model.norm.weight.float())
        return model

    @torch.no_grad()
    def copy_target_layer(self, target_model) -> int:
        """Start from the target's own computation instead of noise: the midlayer becomes a copy of the target
        layer whose input is the deepest fused state, reading it through the hidden half of q / k / v (the
        token half starts at zero) and fc passing that state through. A draft step then first computes what
        that layer computes at the position; training teaches it to read the token and look one further.
        Returns the target layer copied."""
        c = self.config
        h, source = c["hidden_size"], max(c["aux_layers"])
        theirs = target_model.model.layers[source]
        if getattr(theirs.self_attn, "q_norm", None) is not None:
            raise ValueError("init_layers: target: the target's attention normalises q / k (q_norm), which "
                             "EAGLE-3's layer has no place for")
        m = self.midlayer
        self.fc.weight.zero_()
        scale = self.fc_in_scale[-h:] if hasattr(self, "fc_in_scale") else torch.ones(h)
        self.fc.weight[:, -h:] = torch.diag(1.0 / scale)  # fused layers are sorted: the deepest is the last block
        m.hidden_norm.weight.copy_(theirs.input_layernorm.weight.float())
        for name in ("q_proj", "k_proj", "v_proj"):
            mine = getattr(m.self_attn, name).weight
            mine.zero_()
            mine[:, h:] = getattr(theirs.self_attn, name).weight.float()
        m.self_attn.o_proj.weight.copy_(theirs.self_attn.o_proj.weight.float())
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(m.mlp, name).weight.copy_(getattr(theirs.mlp, name).weight.float())
        m.post_attention_layernorm.weight.copy_(theirs.post_attention_layernorm.weight.float())
        return source

    @property
    def draft_to_target(self) -> Tensor:
        return torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    # ---- shared pieces --------------------------------------------------------------------------
    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rope(positions, self.inv_freq)

    def _qkv(self, tokens: Tensor, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [heads, n, hd], k/v [kv_heads, n, hd] of draft steps reading (tokens, hidden)."""
        m = self.midlayer
        e = F.embedding(tokens, self.embed).to(hidden.dtype)
        x = torch.cat([m.input_layernorm(e), m.hidden_norm(hidden)], dim=-1)
        n = x.shape[0]
        a = m.self_attn
        q = a.q_proj(x).view(n, self.n_heads, self.head_dim).transpose(0, 1)
        k = a.k_proj(x).view(n, self.n_kv, self.head_dim).transpose(0, 1)
        v = a.v_proj(x).view(n, self.n_kv, self.head_dim).transpose(0, 1)
        cos, sin = self._rope(positions)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _finish(self, hidden: Tensor, attn: Tensor) -> Tensor:
        """o_proj + residual (the hidden stream) + MLP: the step's output hidden state."""
        m = self.midlayer
        h = hidden + m.self_attn.o_proj(attn.transpose(0, 1).reshape(hidden.shape[0], -1))
        return h + m.mlp(m.post_attention_layernorm(h))

    def fuse(self, features: Tensor) -> Tensor:
        """fc over the concatenated target features of each position."""
        if hasattr(self, "fc_in_scale"):
            features = features * self.fc_in_scale.to(features.dtype)
        return self.fc(features)

    def folded_state_dict(self) -> dict[str, Tensor]:
        """The state dict with the fixed input scale folded into fc's columns: the plain EAGLE-3 layout."""
        state = dict(self.state_dict())
        scale = state.pop("fc_in_scale", None)
        if scale is not None:
            state["fc.weight"] = state["fc.weight"] * scale.to(state["fc.weight"].dtype)[None]
        return state

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.norm(hidden))

    # ---- training: training-time test over one sequence ------------------------------------------
    def ttt_states(self, hidden: Tensor, input_ids: Tensor, steps: int) -> Iterator[Tensor]:
        """The output state h' [T-1, H] of each training-time-test step over one sequence of T positions,
        step by step.

        hidden [T, K*H] are the target features, input_ids [T] the tokens. Base position t (0..T-2) at
        step k reads token x_{t+1+k} (clamped at the end; the caller masks those) at RoPE position t+k and
        attends to steps 0 of positions <= t plus its own steps 1..k: what a depth-k tree node sees."""
        T = input_ids.shape[0]
        n = T - 1
        scale = 1.0 / math.sqrt(self.head_dim)
        base = torch.arange(n)
        causal = torch.full((n, n), float("-inf")).triu_(1)
        rep = self.n_heads // self.n_kv
        h = self.fuse(hidden[:n])
        keys = values = None
        diag_k: list[Tensor] = []
        diag_v: list[Tensor] = []
        for k in range(steps):
            q, kk, vv = self._qkv(input_ids[(base + 1 + k).clamp(max=T - 1)], h, base + k)
            kk, vv = kk.repeat_interleave(rep, 0), vv.repeat_interleave(rep, 0)
            if k == 0:
                keys, values = kk, vv
            else:
                diag_k.append(kk)
                diag_v.append(vv)
            scores = [(q @ keys.transpose(1, 2)) * scale + causal] + [(q * dk).sum(-1, keepdim=True) * scale for dk in diag_k]
            w = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
            attn = w[..., :n] @ values
            for i, dv in enumerate(diag_v):
                attn = attn + w[..., n + i : n + i + 1] * dv
            h = self._finish(h, attn)
            yield h

    def ttt_forward(self, hidden: Tensor, input_ids: Tensor, steps: int) -> list[Tensor]:
        """Draft log-probs [T-1, Vd] of each training-time-test step (see `ttt_states`)."""
        return [torch.log_softmax(self.logits(h).float(), dim=-1) for h in self.ttt_states(hidden, input_ids, steps)]

    def ttt_loss(self, hidden: Tensor, input_ids: Tensor, target_idx: Tensor, target_p: Tensor, target_top: Tensor,
                 weight: Tensor, trained: Tensor, steps: int,
                 chunked_head: bool = False) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Per-step soft cross-entropy sums and top-1 hits over one sequence (see `ttt_forward`).

        target_idx / target_p [T, k] are the target's distribution at each position as draft ids and
        probabilities (a top-k cache, or k = the whole draft vocabulary), target_top [T] its full-vocab
        argmax; `trained` [T] marks supervised positions, `weight` [T] the loss weight of each (zero where
        the argmax is outside the draft vocab; accuracy counts those as misses). Step k of base t is scored
        against position t+1+k. Returns (loss sums per step, hit counts per step, consecutive hits from
        step 0 per base). `chunked_head`: the head and the loss in row chunks (`head_soft_ce`), so no step
        keeps [T, Vd] log-probabilities for the backward; otherwise the plain log-softmax path.
        """
        T = input_ids.shape[0]
        base = torch.arange(T - 1)
        d2t = self.draft_to_target
        losses, hits = [], []
        alive = torch.ones(T - 1, dtype=torch.bool)
        run_length = torch.zeros(T - 1, dtype=torch.long)
        steps_out = self.ttt_states(hidden, input_ids, steps) if chunked_head else self.ttt_forward(hidden, input_ids, steps)
        for k, out in enumerate(steps_out):
            idx = (base + 1 + k).clamp(max=T - 1)
            valid = base + 1 + k <= T - 1
            if chunked_head:
                ce, top = head_soft_ce(self.norm(out), self.lm_head.weight, target_idx[idx], target_p[idx])
            else:
                ce, top = -(target_p[idx] * out.gather(-1, target_idx[idx])).sum(-1), out.argmax(-1)
            losses.append(ce.mul(weight[idx] * valid).sum())
            hit = (d2t[top] == target_top[idx]) & valid
            hits.append((hit & trained[idx]).sum())
            run_length += (alive & hit).long()
            alive &= hit
        return losses, hits, run_length

    # ---- inference: cached steps over committed rows and tree nodes ------------------------------
    @torch.inference_mode()
    def step(self, tokens: Tensor, hidden: Tensor, positions: Tensor, cache: "DraftCache", write_at: int,
             mask: Tensor | None, out_rows: slice | None = None) -> tuple[Tensor, Tensor]:
        """Draft steps for n rows: K/V go to cache rows [write_at, write_at+n); returns (h' [m, H], logp [m, Vd]) of
        `out_rows` (default all n). The other rows only write their K/V: their attention, MLP and head are skipped."""
        q, k, v = self._qkv(tokens, hidden, positions)
        end = write_at + tokens.shape[0]
        cache.k[:, write_at:end] = k
        cache.v[:, write_at:end] = v
        if out_rows is not None:
            q, hidden, mask = q[:, out_rows], hidden[out_rows], None if mask is None else mask[out_rows]
        attn = F.scaled_dot_product_attention(q[None], cache.k[None, :, :end], cache.v[None, :, :end], attn_mask=mask,
                                              enable_gqa=self.n_kv != self.n_heads)[0]
        h = self._finish(hidden, attn)
        return h, torch.log_softmax(self.logits(h).float(), dim=-1)


class DraftCache(torch.nn.Module):
    """The drafter's K/V: [kv_heads, max_len, head_dim], module buffers on the drafter's device; rows past
    `length` are scratch for tree nodes."""

    def __init__(self, drafter: Eagle3Drafter, max_len: int):
        super().__init__()
        shape = (drafter.n_kv, max_len, drafter.head_dim)
        norm = drafter.norm.weight  # (a norm: linears may be prepacked for inference)
        self.register_buffer("k", torch.zeros(shape, dtype=norm.dtype, device=norm.device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=norm.dtype, device=norm.device), persistent=False)
        self.max_len = max_len
        self.length = 0
