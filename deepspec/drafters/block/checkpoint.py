"""Block drafter checkpoints in the layouts serving engines load.

DeepSpec (`Qwen3DSparkModel`, DFlash and DSpark alike): the target's transformer fields plus
`block_size`, `mask_token_id`, `target_layer_ids` (output of layer k), `num_target_layers`,
`markov_rank`, `markov_head_type`, `enable_confidence_head`, `confidence_head_with_markov`; weights
`fc`, `hidden_norm`, `norm`, `layers.{i}.*` (Qwen3 layers with q_norm / k_norm), `embed_tokens` and
`lm_head` (the target's, full vocabulary), `markov_head.markov_w1/w2`, `confidence_head.proj`. Every
slot predicts the next token.
z-lab DFlash (`DFlashDraftModel`): `block_size`, `num_target_layers`, `dflash_config: {target_layer_ids,
mask_token_id}`; weights `fc`, `hidden_norm`, `norm`, `layers.{i}.*`, embedding and head taken from the
target. Mask slots predict their own position.

vLLM (`--to vllm`, DFlash only): z-lab's layout, which vLLM's DFlash proposer loads; a reduced draft
vocabulary stays reduced (`lm_head` rows and vLLM's `d2t` offsets, `draft_vocab_size`). vLLM queries
[bonus, mask, ...] and samples the mask slots, so only drafters trained with "own" labels export to it;
its DSpark proposer runs only in its GPU model runner.

Our own folder (`BlockDrafter.save`) keeps a reduced draft vocabulary (`d2t`), the label convention
and the confidence calibration (temperature and bias per draft, greedy and sampled); `export_block` writes the engine layout from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from deepspec import io
from deepspec.drafters.block.calibration import RULES as CALIBRATION_RULES
from deepspec.drafters.block.model import LAYER_CONVENTION, BlockDrafter

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "rms_norm_eps", "rope_theta", "vocab_size", "max_position_embeddings")


def _layer_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if k.startswith(("layers.", "fc.", "hidden_norm.", "norm."))}


def export_block(drafter: BlockDrafter, directory: str | Path, target_head: Tensor,
                 dtype: torch.dtype = torch.float32, engine: str | None = None) -> Path:
    """Write `drafter` in DeepSpec's layout ("next" labels) or z-lab's ("own" labels, DFlash only), with
    floating-point weights in `dtype`; `engine` "vllm": the z-lab layout as vLLM's DFlash proposer reads it.

    A reduced draft vocabulary is widened to the full one: head rows outside it are the target's own
    (frozen in training, so unchanged) and their Markov bias is zero; engines then draft over the full
    vocabulary, which can differ from ours only where the restriction mattered (outputs stay lossless)."""
    c = drafter.config
    if engine == "vllm" and (c["label_convention"] != "own" or drafter.markov_head is not None
                             or drafter.confidence_head is not None):
        raise ValueError("export --to vllm: vLLM's DFlash proposer feeds [bonus, mask, ...] and samples the mask "
                         "slots, each for its own position: train a dflash drafter with label_convention: own "
                         "(vLLM 0.32 runs DSpark's Markov and confidence heads only in its GPU model runner)")
    if hasattr(drafter, "mask_embed"):
        raise ValueError("export: a trained mask embedding has no row in the target's embedding; train with a "
                         "mask_token_id to export")
    if c.get("anchor_context"):
        raise ValueError("export: anchor_context (the context state added to the anchor row) has no place in "
                         "DeepSpec's, z-lab's or vLLM's layout; train without it to export")
    state = {k: v.detach().float().contiguous() for k, v in drafter.state_dict().items()}
    scale = state.pop("fc_in_scale", None)
    if scale is not None:  # the fixed input scale folded into fc's columns: the plain layout engines read
        state["fc.weight"] = state["fc.weight"] * scale[None]
    ids = drafter.draft_to_target
    out = _layer_state(state)
    shape = {k: c[k] for k in SHAPE_KEYS if k in c}
    common = {**shape, "model_type": "qwen3", "num_hidden_layers": c["num_hidden_layers"], "block_size": c["block_size"],
              "num_target_layers": c["target_num_hidden_layers"], "tie_word_embeddings": False, "attention_bias": False,
              "layer_types": ["full_attention"] * c["num_hidden_layers"], "target_layer_convention": LAYER_CONVENTION}
    if c["label_convention"] == "next":
        head = target_head.detach().float().clone()
        head[ids] = state["lm_head.weight"]
        out["lm_head.weight"] = head
        out["embed_tokens.weight"] = drafter.embed.detach().float().contiguous()
        config = {**common, "architectures": ["Qwen3DSparkModel"], "mask_token_id": c["mask_token_id"],
                  "target_layer_ids": c["target_layer_ids"], "markov_rank": c.get("markov_rank", 0),
                  "enable_confidence_head": bool(c.get("enable_confidence_head"))}
        if drafter.markov_head is not None:
            config["markov_head_type"] = c["markov_head_type"]
            w2 = torch.zeros(c["vocab_size"], c["markov_rank"])
            w2[ids] = state["markov_head.markov_w2.weight"]
            out["markov_head.markov_w2.weight"] = w2
            out.update({k: v for k, v in state.items() if k.startswith("markov_head.") and "markov_w2" not in k})
        if drafter.confidence_head is not None:
            config["confidence_head_with_markov"] = bool(c.get("confidence_head_with_markov"))
            config["confidence_calibration"] = {  # ours; engines ignore it
                rule: {"temperature": state["confidence_temperature"][r].tolist(),
                       "bias": state["confidence_bias"][r].tolist()} for r, rule in enumerate(CALIBRATION_RULES)}
            out.update({k: v for k, v in state.items() if k.startswith("confidence_head.")})
    else:
        if drafter.markov_head is not None or drafter.confidence_head is not None:
            raise ValueError("export: z-lab's DFlash layout has no Markov or confidence head (train DSpark with "
                             "label_convention: next for DeepSpec's layout)")
        full_vocab = ids.numel() == c["vocab_size"] and bool((ids == torch.arange(c["vocab_size"])).all())
        config = {**common, "architectures": ["DFlashDraftModel"],
                  "dflash_config": {"target_layer_ids": c["target_layer_ids"], "mask_token_id": c["mask_token_id"]}}
        if engine == "vllm" and not full_vocab:  # vLLM maps draft id i to target id i + d2t[i]
            out["lm_head.weight"] = state["lm_head.weight"]
            out["d2t"] = drafter.d2t.detach().long().contiguous()
            config["draft_vocab_size"] = c["draft_vocab_size"]
        elif not full_vocab:
            raise ValueError("export: z-lab's DFlash layout uses the target's head over the full vocabulary; "
                             "train with draft_vocab: null (or export --to vllm, which keeps a reduced one)")
    out = {k: v.to(dtype).contiguous() if v.is_floating_point() else v for k, v in out.items()}
    return io.write_model_folder(directory, out, config)


def import_block(directory: str | Path, target_model, **meta: Any) -> BlockDrafter:
    """A DeepSpec or z-lab checkpoint folder as our drafter, checked against the target's shapes."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not a drafter checkpoint folder")
    written = json.loads(cfg_path.read_text())
    if written.get("algorithm") in ("dflash", "dspark"):  # our own folder
        return BlockDrafter.load(directory, target_model.get_input_embeddings().weight)
    arch = (written.get("architectures") or [""])[0]
    if arch not in ("Qwen3DSparkModel", "DFlashDraftModel"):
        raise ValueError(f"{cfg_path}: architectures {written.get('architectures')} is neither DeepSpec's "
                         "Qwen3DSparkModel nor z-lab's DFlashDraftModel")
    state = load_file(str(directory / "model.safetensors"))
    embed = target_model.get_input_embeddings().weight
    vocab, hidden = embed.shape
    if written.get("hidden_size") != hidden or written.get("vocab_size", vocab) != vocab:
        raise ValueError(f"{cfg_path}: drafter is for hidden {written.get('hidden_size')} / vocab "
                         f"{written.get('vocab_size')}, the target has {hidden} / {vocab}")
    tc = target_model.config
    shape = {k: written[k] for k in SHAPE_KEYS if k in written}
    shape.setdefault("head_dim", hidden // written["num_attention_heads"])
    shape.setdefault("vocab_size", vocab)
    shape.setdefault("max_position_embeddings", getattr(tc, "max_position_embeddings", 8192))
    base = {**shape, "model_type": "qwen3", "num_hidden_layers": written["num_hidden_layers"],
            "block_size": written["block_size"], "target_num_hidden_layers": written.get("num_target_layers",
                                                                                          tc.num_hidden_layers),
            "draft_vocab_size": vocab, "layer_convention": LAYER_CONVENTION, "tie_word_embeddings": False,
            "imported_from": str(directory), **meta}
    if arch == "Qwen3DSparkModel":
        rank = int(written.get("markov_rank", 0))
        config = {**base, "architectures": [arch], "algorithm": "dspark" if rank or written.get("enable_confidence_head")
                  else "dflash", "label_convention": "next", "mask_token_id": written["mask_token_id"],
                  "target_layer_ids": written["target_layer_ids"], "markov_rank": rank,
                  "markov_head_type": written.get("markov_head_type", "vanilla"),
                  "enable_confidence_head": bool(written.get("enable_confidence_head")),
                  "confidence_head_with_markov": bool(written.get("confidence_head_with_markov"))}
        head = state.pop("lm_head.weight")
        state.pop("embed_tokens.weight", None)
        calibration = written.get("confidence_calibration")
    elif arch == "DFlashDraftModel":
        dc = written.get("dflash_config") or {}
        config = {**base, "architectures": [arch], "algorithm": "dflash", "label_convention": "own",
                  "mask_token_id": dc.get("mask_token_id", written.get("mask_token_id")),
                  "target_layer_ids": dc.get("target_layer_ids", written.get("target_layer_ids")), "markov_rank": 0}
        head = state.pop("lm_head.weight", None)  # its own rows where the vLLM layout kept a reduced vocabulary
        if head is None:
            head = target_model.get_output_embeddings().weight.detach()
        calibration = None
    if config["mask_token_id"] is None or config["target_layer_ids"] is None:
        raise ValueError(f"{cfg_path}: mask_token_id and target_layer_ids are required")
    bad = [k for k in config["target_layer_ids"] if not -1 <= k < tc.num_hidden_layers - 1]
    if bad:
        raise ValueError(f"{cfg_path}: target_layer_ids {bad} out of range for a {tc.num_hidden_layers}-layer target")
    d2t = state.pop("d2t", torch.zeros(vocab)).long()  # vLLM's offsets: draft id i is target id i + d2t[i]
    config["draft_vocab_size"] = d2t.numel()
    model = BlockDrafter(config, embed)
    ours = model.state_dict()
    ours_state = {k: v for k, v in state.items() if k in ours}
    ours_state["lm_head.weight"] = head.float()
    ours_state["d2t"] = d2t
    ours_state["t2d"] = torch.zeros(vocab, dtype=torch.bool).index_fill_(0, torch.arange(d2t.numel()) + d2t, True)
    if calibration:
        for key, field in (("confidence_temperature", "temperature"), ("confidence_bias", "bias")):
            ours_state[key] = torch.tensor([calibration[rule][field] for rule in CALIBRATION_RULES], dtype=torch.float32)
    else:
        ours_state["confidence_temperature"] = torch.ones(2, model.drafts)
        ours_state["confidence_bias"] = torch.zeros(2, model.drafts)
    unknown = sorted(set(state) - set(ours))
    if unknown:
        raise ValueError(f"{cfg_path}: weights this drafter does not have: {unknown[:5]}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ours_state.items()})
    return model
