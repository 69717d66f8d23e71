"""DFlash and DSpark: block drafters that propose a whole block in one non-causal forward.

Context C = hidden_norm(fc(concat of K target layers)) at every committed position. Each of the N
decoder layers (shaped like the target's, with Qwen3's q_norm / k_norm) projects C with its own
k_proj / v_proj (k_norm, RoPE at the context positions) and prepends it to the block's keys; C is
never a query. The block [anchor, M, ..., M] of size B sits at positions a..a+B-1, attends to itself
bidirectionally and to context keys strictly before a (training scores each block over its own keys,
`block_attention`). Its final states go through the (frozen,
target-initialised) head.

Label conventions (`label_convention`): "next" (DeepSpec) - every slot k predicts the token after its
own position, B drafts from slots 0..B-1; "own" (z-lab / SpecForge DFlash) - mask slot k >= 1 predicts
the token *at* its position, B-1 drafts from slots 1..B-1. Either way draft j is the token at a+1+j;
`draft_rows` maps drafts to slots, and training and inference both go through it.

DSpark adds a Markov head (a low-rank bigram bias on each draft's logits from the token before it,
teacher-forced in training and sampled left to right at inference) and a confidence head that predicts
whether each draft is accepted. Weight names follow DeepSpec's checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepspec.drafters.checkpoint import FolderCheckpoint
from deepspec.drafters.layers import MLP, RMSNorm, init_normal, inv_freq, rope, rotate, target_shape
from deepspec.models.attention import attend

ALGORITHMS = ("dflash", "dspark")
LAYER_CONVENTION = "output: id k = output of decoder layer k (HF hidden_states[k + 1]; -1 = the embeddings)"


class BlockAttention(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        h, hd = c["hidden_size"], c["head_dim"]
        self.n_heads, self.n_kv, self.head_dim = c["num_attention_heads"], c["num_key_value_heads"], hd
        self.q_proj = nn.Linear(h, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, h, bias=False)
        self.q_norm = RMSNorm(hd, c["rms_norm_eps"])
        self.k_norm = RMSNorm(hd, c["rms_norm_eps"])

    def keys_values(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """k, v [kv_heads, n, hd] of rows x [n, H] (context states or normed block states)."""
        n = x.shape[0]
        k = self.k_norm(self.k_proj(x).view(n, self.n_kv, self.head_dim)).transpose(0, 1)
        v = self.v_proj(x).view(n, self.n_kv, self.head_dim).transpose(0, 1)
        return rotate(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx_k: Tensor, ctx_v: Tensor, visible: Tensor | None,
                block_size: int) -> Tensor:
        n = x.shape[0]
        q = rotate(self.q_norm(self.q_proj(x).view(n, self.n_heads, self.head_dim)).transpose(0, 1), cos, sin)
        k, v = self.keys_values(x, cos, sin)
        if visible is None:  # one block that sees every context key (inference)
            k, v = torch.cat([ctx_k, k], dim=1), torch.cat([ctx_v, v], dim=1)
            out = attend(q[None], k[None], v[None], None)[0]
        else:
            out = block_attention(q, k, v, ctx_k, ctx_v, visible, block_size)
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))


def block_attention(q: Tensor, k: Tensor, v: Tensor, ctx_k: Tensor, ctx_v: Tensor, visible: Tensor,
                    block_size: int) -> Tensor:
    """Attention [heads, A*B, hd] of A training blocks of B rows (q [heads, A*B, hd], their own k / v
    [kv_heads, A*B, hd]): block a sees the first visible[a] context keys (those strictly before its anchor
    *position*, never keyed on block index: anchors closer than B apart must not see each other's future
    features) and its own B rows, bidirectionally.

    Scored per block over [context ‖ own rows], A*B*(T+B) scores, instead of one dense mask over every
    block's rows, A*B*(T+A*B), most of it masked out once anchors are many."""
    heads, n, hd = q.shape
    a = n // block_size
    rep = heads // k.shape[0]
    if rep > 1:
        k, v, ctx_k, ctx_v = (t.repeat_interleave(rep, dim=0) for t in (k, v, ctx_k, ctx_v))
    t = int(visible.max())
    ctx_k, ctx_v = ctx_k[:, :t], ctx_v[:, :t]
    qb = q.view(heads, a, block_size, hd)
    kb, vb = k.view(heads, a, block_size, hd), v.view(heads, a, block_size, hd)
    scale = hd**-0.5
    s_ctx = torch.einsum("habd,htd->habt", qb, ctx_k) * scale
    hidden = torch.arange(t, device=q.device)[None, :] >= visible[:, None]  # [A, t]
    s_ctx = s_ctx.masked_fill(hidden[None, :, None, :], float("-inf"))
    s_own = torch.einsum("habd,hacd->habc", qb, kb) * scale
    p = torch.softmax(torch.cat([s_ctx, s_own], dim=-1), dim=-1)
    out = torch.einsum("habt,htd->habd", p[..., :t], ctx_v) + torch.einsum("habc,hacd->habd", p[..., t:], vb)
    return out.reshape(heads, n, hd)


class BlockLayer(nn.Module):
    def __init__(self, c: dict[str, Any]):
        super().__init__()
        h = c["hidden_size"]
        self.self_attn = BlockAttention(c)
        self.mlp = MLP(h, c["intermediate_size"])
        self.input_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(h, c["rms_norm_eps"])


class MarkovHead(nn.Module):
    """A bias on draft j's logits from the token before it (DSpark).

    vanilla: W2 W1[x]; gated: the same scaled by sigmoid(gate(h_j)), so the backbone decides per slot
    how much the bigram counts; rnn: W2 s_j with s_j = tanh(W1[x] + U s_{j-1}), a state over the drafted
    prefix. `state` is also what the confidence head reads next to h_j."""

    def __init__(self, kind: str, vocab: int, draft_vocab: int, rank: int, hidden: int):
        super().__init__()
        if kind not in ("vanilla", "gated", "rnn"):
            raise ValueError(f"markov_head_type: {kind!r} is not one of vanilla, gated, rnn")
        self.kind = kind
        self.markov_w1 = nn.Embedding(vocab, rank)
        self.markov_w2 = nn.Linear(rank, draft_vocab, bias=False)
        if kind == "gated":
            self.markov_gate = nn.Linear(hidden, 1)
        if kind == "rnn":
            self.markov_u = nn.Linear(rank, rank, bias=False)

    def state(self, prev: Tensor, carry: Tensor | None = None) -> Tensor:
        s = self.markov_w1(prev)
        if self.kind == "rnn":
            s = torch.tanh(s + (self.markov_u(carry) if carry is not None else 0.0))
        return s

    def states(self, prev: Tensor) -> Tensor:
        """Teacher-forced states [..., D, r] for previous tokens prev [..., D]."""
        if self.kind != "rnn":
            return self.state(prev)
        out, carry = [], None
        for j in range(prev.shape[-1]):
            carry = self.state(prev[..., j], carry)
            out.append(carry)
        return torch.stack(out, dim=-2)

    def bias(self, state: Tensor, hidden: Tensor) -> Tensor:
        b = self.markov_w2(state)
        if self.kind == "gated":
            b = b * torch.sigmoid(self.markov_gate(hidden))
        return b


class ConfidenceHead(nn.Module):
    """Linear on [h_j ; Markov state]: the logit of draft j being accepted given the ones before it."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)

    def forward(self, features: Tensor) -> Tensor:
        return self.proj(features).squeeze(-1)


class BlockDrafter(FolderCheckpoint, nn.Module):
    ALGORITHMS = ALGORITHMS

    def __init__(self, config: dict[str, Any], embed: Tensor):
        super().__init__()
        c = self.config = dict(config)
        h = c["hidden_size"]
        self.block_size = int(c["block_size"])
        self.fc = nn.Linear(len(c["target_layer_ids"]) * h, h, bias=False)
        if c.get("fc_input_scale"):  # a fixed 1/RMS per fused layer (their scales differ ~8x); folded on export
            self.register_buffer("fc_in_scale", torch.ones(len(c["target_layer_ids"]) * h))
        self.hidden_norm = RMSNorm(h, c["rms_norm_eps"])
        self.layers = nn.ModuleList(BlockLayer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(h, c["rms_norm_eps"])
        self.lm_head = nn.Linear(h, c["draft_vocab_size"], bias=False)
        if c.get("mask_embedding"):  # a trained mask embedding instead of an unused row of the target's
            self.mask_embed = nn.Parameter(torch.zeros(h))
        rank = int(c.get("markov_rank") or 0)
        self.markov_head = (MarkovHead(c.get("markov_head_type", "vanilla"), c["vocab_size"], c["draft_vocab_size"],
                                       rank, h) if rank > 0 else None)
        self.confidence_head = None
        if c.get("enable_confidence_head"):
            with_markov = bool(c.get("confidence_head_with_markov")) and self.markov_head is not None
            self.confidence_head = ConfidenceHead(h + (rank if with_markov else 0))
        self.register_buffer("d2t", torch.zeros(c["draft_vocab_size"], dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(c["vocab_size"], dtype=torch.bool))
        # Calibration of the confidence per draft, sigmoid(z / T + b), fitted on held-out data; row 0 for greedy
        # acceptance, row 1 for sampled (calibration.py). Ones and zeros: uncalibrated.
        self.register_buffer("confidence_temperature", torch.ones(2, self.drafts))
        self.register_buffer("confidence_bias", torch.zeros(2, self.drafts))
        self.register_buffer("embed", embed.detach(), persistent=False)  # the target's, frozen
        self.register_buffer("inv_freq", inv_freq(c), persistent=False)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def for_target(cls, target_model, algorithm: str, layer_ids: list[int], draft_ids: Tensor, *, layers: int,
                   block_size: int, label_convention: str, mask_token_id: int | None, markov_rank: int = 0,
                   markov_head_type: str = "vanilla", confidence_head: bool = False, confidence_with_markov: bool = True,
                   seed: int = 0, **meta: Any) -> "BlockDrafter":
        """A fresh drafter shaped like the target's layers, head and final norm copied from the target.

        `layer_ids` are in the "output of layer k" convention; `mask_token_id` None trains a mask embedding."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown block drafter algorithm {algorithm!r}")
        config = {
            "architectures": ["DeepSpecBlockDrafter"], "model_type": "qwen3", "algorithm": algorithm, **target_shape(target_model),
            "num_hidden_layers": layers, "block_size": block_size, "label_convention": label_convention,
            "mask_token_id": mask_token_id, "mask_embedding": mask_token_id is None,
            "target_layer_ids": list(layer_ids),
            "draft_vocab_size": int(draft_ids.numel()), "markov_rank": markov_rank,
            "markov_head_type": markov_head_type, "enable_confidence_head": confidence_head,
            "confidence_head_with_markov": confidence_head and confidence_with_markov and markov_rank > 0,
            "tie_word_embeddings": False, **meta,
            "layer_convention": LAYER_CONVENTION,  # its own ids' convention, whatever the caller's features use
        }
        torch.manual_seed(seed)
        model = cls(config, target_model.get_input_embeddings().weight)
        init_normal(model)
        if model.markov_head is not None:  # start as plain DFlash: the bigram bias grows from zero
            nn.init.zeros_(model.markov_head.markov_w2.weight)
        draft_ids = draft_ids.sort().values
        model.d2t.copy_(draft_ids - torch.arange(draft_ids.numel()))
        model.t2d.zero_()
        model.t2d[draft_ids] = True
        with torch.no_grad():
            model.lm_head.weight.copy_(target_model.get_output_embeddings().weight[draft_ids].float())
            model.norm.weight.copy_(target_model.model.norm.weight.float())
            if mask_token_id is None:
                model.mask_embed.copy_(model.embed.float().mean(0))
        return model

    @torch.no_grad()
    def copy_target_layers(self, target_model, sample: Tensor | None = None) -> list[int]:
        """Start from the target's own computation instead of noise: decoder layer i becomes a copy of the
        target layer after the deepest fused one (k + 1 + i), fc passes that fused layer through unchanged
        and hidden_norm takes the copied layer's input norm, so the context keys / values begin as the ones
        the target itself computes there. A target without q_norm / k_norm (Llama) gets them set to the
        median per-head RMS of its q / k on `sample` ([n, K*H] fused features), which keeps the copied
        attention's temperature. Returns the target layers copied."""
        c = self.config
        h, k = c["hidden_size"], len(c["target_layer_ids"])
        first = max(c["target_layer_ids"]) + 1
        source = [min(first + i, c["target_num_hidden_layers"] - 1) for i in range(len(self.layers))]
        target_layers = target_model.model.layers
        self.fc.weight.zero_()
        self.fc.weight[:, (k - 1) * h:] = torch.eye(h)
        self.hidden_norm.weight.copy_(target_layers[source[0]].input_layernorm.weight.float())
        ctx = self.context(sample.to(self.fc.weight.dtype)) if sample is not None and sample.numel() else None
        for mine, j in zip(self.layers, source):
            theirs = target_layers[j]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(mine.self_attn, name).weight.copy_(getattr(theirs.self_attn, name).weight.float())
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(mine.mlp, name).weight.copy_(getattr(theirs.mlp, name).weight.float())
            mine.input_layernorm.weight.copy_(theirs.input_layernorm.weight.float())
            mine.post_attention_layernorm.weight.copy_(theirs.post_attention_layernorm.weight.float())
            for name in ("q_norm", "k_norm"):
                norm = getattr(theirs.self_attn, name, None)
                if norm is not None:
                    getattr(mine.self_attn, name).weight.copy_(norm.weight.float())
                elif ctx is not None:
                    proj = getattr(mine.self_attn, name[0] + "_proj")(ctx).view(ctx.shape[0], -1, mine.self_attn.head_dim)
                    getattr(mine.self_attn, name).weight.fill_(float(proj.pow(2).mean(-1).sqrt().median()))
        return source

    @property
    def drafts(self) -> int:
        """Tokens one block proposes."""
        return self.block_size if self.config["label_convention"] == "next" else self.block_size - 1

    @property
    def draft_rows(self) -> Tensor:
        """The block slot whose output is draft j (draft j is the token at anchor + 1 + j)."""
        return torch.arange(self.drafts) + (0 if self.config["label_convention"] == "next" else 1)

    @property
    def draft_to_target(self) -> Tensor:
        return torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    @property
    def capture_layers(self) -> tuple[int, ...]:
        """HF hidden_states indices of the fused layers (output of layer k = hidden_states[k + 1])."""
        return tuple(k + 1 for k in self.config["target_layer_ids"])


    # ---- the forward, shared by training and inference ---------------------------------------------
    def context(self, features: Tensor) -> Tensor:
        """C [n, H] from the concatenated target features [n, K*H] of n positions."""
        if hasattr(self, "fc_in_scale"):
            features = features * self.fc_in_scale.to(features.dtype)
        return self.hidden_norm(self.fc(features))

    def context_kv(self, ctx: Tensor, positions: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each layer's keys / values [kv_heads, n, hd] of context rows (RoPE at their own positions)."""
        cos, sin = rope(positions, self.inv_freq)
        return [layer.self_attn.keys_values(ctx, cos, sin) for layer in self.layers]

    def block_inputs(self, anchors: Tensor, before: Tensor) -> Tensor:
        """[A * B, H]: per anchor, the anchor token's embedding then B-1 mask embeddings. With `anchor_context`
        the anchor row also gets `before` [A, H], the context state C of the position before each anchor."""
        a = anchors.shape[0]
        if hasattr(self, "mask_embed"):
            mask = self.mask_embed
        else:
            mask = self.embed[self.config["mask_token_id"]]
        x = mask.to(self.norm.weight.dtype).expand(a, self.block_size, -1).clone()
        x[:, 0] = F.embedding(anchors, self.embed).to(x.dtype)
        if self.config.get("anchor_context"):
            x[:, 0] += before.to(x.dtype)
        return x.reshape(a * self.block_size, -1)

    def backbone(self, x: Tensor, positions: Tensor, ctx_kv: list[tuple[Tensor, Tensor]], visible: Tensor | None) -> Tensor:
        """Normed final states [R, H] of the rows x [R, H] of R / B blocks at `positions`. Block a sees the
        first visible[a] context keys (its anchor position) and its own rows; `visible` None: one block that
        sees every context key."""
        cos, sin = rope(positions, self.inv_freq)
        h = x
        for layer, (ck, cv) in zip(self.layers, ctx_kv):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, ck, cv, visible, self.block_size)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.norm(h)

    def draft_logits(self, hidden: Tensor, prev: Tensor) -> tuple[Tensor, Tensor | None]:
        """Teacher-forced logits [..., D, Vd] of drafts with states hidden [..., D, H] whose previous tokens
        are prev [..., D] (target ids), and the Markov states (None without a Markov head)."""
        logits = self.lm_head(hidden)
        if self.markov_head is None:
            return logits, None
        states = self.markov_head.states(prev)
        return logits + self.markov_head.bias(states, hidden), states

    def confidence_logit(self, hidden: Tensor, state: Tensor | None) -> Tensor:
        if self.config.get("confidence_head_with_markov"):
            hidden = torch.cat([hidden, state.to(hidden.dtype)], dim=-1)
        return self.confidence_head(hidden)

    def confidence(self, hidden: Tensor, state: Tensor | None, j: int, sampled: bool) -> Tensor:
        """Calibrated P(draft j accepted | earlier drafts accepted) under greedy or sampled acceptance."""
        r = int(sampled)
        z = self.confidence_logit(hidden, state).float()
        return torch.sigmoid(z / self.confidence_temperature[r, j] + self.confidence_bias[r, j])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = state_dict.get(prefix + "confidence_temperature")
        if old is not None and old.dim() == 1:  # folders written before the two rules and the bias
            state_dict[prefix + "confidence_temperature"] = old[None].repeat(2, 1)
            state_dict.setdefault(prefix + "confidence_bias", torch.zeros(2, old.numel()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def block_positions(anchors: Tensor, block_size: int) -> Tensor:
    return (anchors[:, None] + torch.arange(block_size)[None, :]).reshape(-1)


def loss_weights(drafts: int, gamma: float | None) -> Tensor:
    """exp(-j / gamma) for draft j: early drafts gate every later one."""
    j = torch.arange(drafts, dtype=torch.float32)
    return torch.exp(-j / gamma) if gamma else torch.ones(drafts)


def unused_token_id(tokenizer, vocab_rows: int) -> int:
    """A vocabulary row no text produces, for the mask token (frozen like the rest of the embedding).

    Rows past the tokenizer when the embedding is padded (Qwen3: 151669, DeepSpec's choice); else the
    last added token that is not one of the tokenizer's special tokens (SmolLM2: 16, `<empty_output>`,
    a StarCoder data marker whose row was never trained)."""
    if vocab_rows > len(tokenizer):
        return len(tokenizer)
    special = set(tokenizer.all_special_ids)
    added = sorted(i for i in getattr(tokenizer, "added_tokens_decoder", {}) if i not in special and i < vocab_rows)
    if not added:
        raise ValueError("mask_token_id: the tokenizer has no unused token; set one, or null for a trained mask embedding")
    return added[-1]
