"""EAGLE-3 checkpoints in and out: export to the layouts serving engines load, import of published ones.

Layouts (EAGLE-3, `LlamaForCausalLMEagle3`):
  weights  `fc.weight`, `midlayer.*` (or `layers.0.*`), `norm.weight`, `lm_head.weight` over the draft
           vocabulary, `d2t` (offsets: target id = draft id + d2t[draft id]), `t2d` (engines ignore it);
           `embed_tokens.weight` is optional: the engines and we share the target's embedding.
  layers   vLLM reads top-level `eagle_aux_hidden_state_layer_ids` as *input of layer k* (HF
           `hidden_states[k]`, our convention); SGLang reads `eagle_config.eagle_aux_hidden_state_layer_ids`
           as *output of layer k* and adds one, so its ids are ours minus one. Each export states its
           convention in `aux_hidden_state_layer_convention`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deepspec import io
from deepspec.drafters.checkpoint import CheckpointError, check_target_fit, read_weights
from deepspec.drafters.eagle3.model import ALGORITHM, Eagle3Drafter

FORMATS = ("vllm", "sglang", "hf")
INPUT_OF_LAYER = "input of layer k (HF hidden_states[k])"
OUTPUT_OF_LAYER = "output of layer k (HF hidden_states[k+1])"


# ---- export -----------------------------------------------------------------------------------------
def serving_config(drafter: Eagle3Drafter, fmt: str, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of an exported drafter in `fmt` ('vllm' or 'sglang')."""
    c = drafter.config
    aux = list(c["aux_layers"])
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": c["hidden_size"], "target_hidden_size": c["hidden_size"],
        "intermediate_size": c["intermediate_size"], "num_attention_heads": c["num_attention_heads"],
        "num_key_value_heads": c["num_key_value_heads"], "head_dim": c["head_dim"], "num_hidden_layers": 1,
        "rms_norm_eps": c["rms_norm_eps"], "rope_theta": c["rope_theta"], "vocab_size": c["vocab_size"],
        "draft_vocab_size": c["draft_vocab_size"], "max_position_embeddings": c.get("max_position_embeddings", 8192),
        "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if c.get("rope_scaling"):
        config["rope_scaling"] = c["rope_scaling"]
    if fmt == "vllm":
        config["eagle_aux_hidden_state_layer_ids"] = aux
        config["aux_hidden_state_layer_convention"] = INPUT_OF_LAYER
    else:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [k - 1 for k in aux], "use_aux_hidden_state": True}
        config["aux_hidden_state_layer_convention"] = OUTPUT_OF_LAYER
    # Where it came from, in our own terms (engines ignore unknown keys; our import checks them).
    config["deepspec"] = {key: c[key] for key in ("algorithm", "target", "target_fingerprint", "target_num_hidden_layers",
                                                  "layer_convention") if key in c} | {"aux_layers": aux}
    return config


def write_export(drafter: Eagle3Drafter, fmt: str, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `drafter` in `fmt` to folder `out` (temp folder, then renamed into place)."""
    if fmt not in FORMATS:
        raise ValueError(f"--to: unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
    dtype = dtype or drafter.fc.weight.dtype
    out = Path(out)
    if fmt == "hf":  # our own folder, as trained
        return drafter.to(dtype).save(out)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous()
             for k, v in drafter.folded_state_dict().items()}
    if state["lm_head.weight"].shape[0] == drafter.config["vocab_size"]:
        # The whole vocabulary drafts: the engines then build no id map and refuse the tensors of one
        # (vLLM: "no parameter named draft_id_to_target_id"); our importer reads their absence as identity.
        state.pop("d2t")
        state.pop("t2d")
    return io.write_model_folder(out, state, serving_config(drafter, fmt, dtype), metadata={"format": "pt"})


# ---- import -----------------------------------------------------------------------------------------
def _aux_layers(config: dict[str, Any], n_layers: int) -> list[int]:
    """Fused layer ids in our convention (input of layer k), from whichever convention the file uses."""
    ours = (config.get("deepspec") or {}).get("aux_layers") or config.get("aux_layers")
    if ours:
        return list(ours)
    if config.get("eagle_aux_hidden_state_layer_ids"):  # vLLM: input of layer k, as ours
        return list(config["eagle_aux_hidden_state_layer_ids"])
    nested = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if nested:  # SGLang: output of layer k
        return [k + 1 for k in nested]
    return [2, n_layers // 2, n_layers - 3]  # the EAGLE authors' releases pin none: their (and vLLM's) default


def import_eagle3(folder: str | Path, target_model, fingerprint: str | None = None) -> Eagle3Drafter:
    """Load an EAGLE-3 checkpoint in our, vLLM's, SGLang's or the EAGLE authors' layout for `target_model`
    (an HF Llama-family causal LM), checking that it fits before any weight is read."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: not found (an EAGLE-3 checkpoint folder holds config.json and weights)")
    config = json.loads(cfg_path.read_text())
    if config.get("algorithm") == ALGORITHM:  # our own folder
        drafter = Eagle3Drafter.load(folder, target_model.get_input_embeddings().weight)
        _check_fit(cfg_path, drafter.config, drafter.config.get("target_fingerprint"), target_model, fingerprint)
        return drafter
    arch = " ".join(config.get("architectures") or [])
    if "Eagle3" not in arch:
        raise CheckpointError(f"{cfg_path}: architectures {config.get('architectures')} is not an EAGLE-3 drafter")
    if config.get("norm_before_residual"):
        raise CheckpointError(f"{cfg_path}: norm_before_residual drafters are not supported by our EAGLE-3 model")
    tc = target_model.config
    n_layers = tc.num_hidden_layers
    meta = config.get("deepspec") or {}
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    ours = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "algorithm": ALGORITHM,
        "hidden_size": hidden, "intermediate_size": config["intermediate_size"], "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads", heads),
        "head_dim": config.get("head_dim") or hidden // heads, "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        "vocab_size": config["vocab_size"],
        "draft_vocab_size": config.get("draft_vocab_size") or config["vocab_size"], "num_hidden_layers": 1,
        "aux_layers": _aux_layers(config, n_layers), "layer_convention": "hf_hidden_states_index (input of layer k)",
        "tie_word_embeddings": False, "imported_from": str(folder), "target_num_hidden_layers": n_layers,
        **{k: meta[k] for k in ("target", "target_fingerprint") if k in meta},
    }
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        ours["rope_scaling"] = {k: v for k, v in scaling.items() if k != "rope_theta"}
    if meta.get("target_num_hidden_layers") not in (None, n_layers):
        raise CheckpointError(f"{cfg_path}: drafter is for a {meta['target_num_hidden_layers']}-layer target, "
                              f"the target has {n_layers}")
    _check_fit(cfg_path, ours, meta.get("target_fingerprint"), target_model, fingerprint)
    weights = read_weights(folder)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        name = name.removeprefix("model.").replace("layers.0.", "midlayer.")
        if name.startswith("embed_tokens."):
            if tuple(tensor.shape) != tuple(target_model.get_input_embeddings().weight.shape):
                raise CheckpointError(f"{folder}: embed_tokens {tuple(tensor.shape)} does not match the target's embedding")
            continue  # the target's own embedding is used, as the engines do
        state[name] = tensor
    dv = ours["draft_vocab_size"]
    if "d2t" not in state:
        if dv != ours["vocab_size"]:
            raise CheckpointError(f"{folder}: draft vocabulary of {dv} tokens but no d2t mapping to the target's")
        state["d2t"] = torch.zeros(dv, dtype=torch.long)
    state["d2t"] = state["d2t"].long()
    t2d = torch.zeros(ours["vocab_size"], dtype=torch.bool)
    t2d[torch.arange(dv) + state["d2t"]] = True
    state["t2d"] = t2d  # recomputed: engines ignore it, and some releases store it as ints
    fc = state.get("fc.weight")
    if fc is None or fc.shape[1] != len(ours["aux_layers"]) * hidden:
        got = None if fc is None else tuple(fc.shape)
        raise CheckpointError(f"{folder}: fc.weight {got} does not fuse {len(ours['aux_layers'])} layers of {hidden}")
    drafter = Eagle3Drafter(ours, target_model.get_input_embeddings().weight)
    dtype = next(iter(v for v in state.values() if v.is_floating_point())).dtype
    drafter = drafter.to(dtype)
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match the EAGLE-3 layout (missing {sorted(missing)[:4]}, "
                              f"unexpected {sorted(unexpected)[:4]})")
    return drafter


def _check_fit(cfg_path: Path, config: dict[str, Any], drafter_fp: str | None, target_model, fingerprint: str | None) -> None:
    check_target_fit(cfg_path, config, drafter_fp, target_model, fingerprint)
    n_layers = target_model.config.num_hidden_layers
    bad = [k for k in config["aux_layers"] if not 0 <= k <= n_layers]
    if bad:
        raise CheckpointError(f"{cfg_path}: aux layers {bad} do not exist in a {n_layers}-layer target")
