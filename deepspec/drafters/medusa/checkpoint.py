"""Medusa heads in and out.

Layouts:
  vllm    config.json `MedusaModel` (`num_heads`, `num_hidden_layers` = blocks per head, `medusa_fc_bias`,
          `original_lm_head` when every head shares one read-out); model.safetensors
          `blocks.{k}.layers.{j}.weight/bias`, `lm_heads.{k}.weight` or `lm_head.weight`. vLLM 0.32 refuses
          its own reduced-vocabulary form (a `token_map` it never marks as loaded), so read-outs are written
          over the full vocabulary: rows outside our draft vocabulary are the target's own.
  medusa  the Medusa authors' layout that TGI serves: medusa_lm_head.safetensors with `{k}.{j}.linear.weight/
          bias` and `{k}.{L}.weight` (a full-vocabulary read-out per head; rows outside our draft vocabulary
          are the target's own), config.json `medusa_num_heads`, `medusa_num_layers`.
Both are read back, as is our own folder (which also keeps the heads' measured top-i accuracies).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from deepspec import io
from deepspec.drafters.checkpoint import CheckpointError, check_target_fit, read_weights
from deepspec.drafters.medusa.model import ALGORITHM, MedusaHeads

AUTHORS_FILE = "medusa_lm_head.safetensors"


def _provenance(c: dict[str, Any]) -> dict[str, Any]:
    return {k: c[k] for k in ("algorithm", "target", "target_fingerprint", "target_num_hidden_layers", "head_accuracy",
                              "share_head") if k in c}


def export_medusa(heads: MedusaHeads, fmt: str, out: str | Path, target_head: Tensor, dtype: torch.dtype | None = None) -> Path:
    """Write `heads` in `fmt` ('vllm' or 'medusa') to folder `out` (temp folder, then renamed into place)."""
    c = heads.config
    dtype = dtype or heads.blocks[0].layers[0].weight.dtype
    state = {k: v.detach() for k, v in heads.state_dict().items()}
    K, L = c["num_heads"], c["head_layers"]

    def widened(rows: Tensor) -> Tensor:
        head = target_head.detach().float().clone()
        head[state["token_map"]] = rows.float()
        return head

    base = {"hidden_size": c["hidden_size"], "vocab_size": c["vocab_size"], "torch_dtype": str(dtype).removeprefix("torch."),
            "deepspec": _provenance(c)}
    if fmt == "vllm":
        out_state = {k: v for k, v in state.items() if k.startswith("blocks.")}
        out_state.update({k: widened(v) for k, v in state.items() if k.startswith(("lm_head.", "lm_heads."))})
        config = {**base, "architectures": ["MedusaModel"], "model_type": "medusa", "num_heads": K,
                  "num_hidden_layers": L, "medusa_fc_bias": True, "original_lm_head": c["share_head"]}
        out_state = {k: v.to(dtype).contiguous() for k, v in out_state.items()}
        return io.write_model_folder(out, out_state, config, metadata={"format": "pt"})
    if fmt != "medusa":
        raise ValueError(f"--to: unknown Medusa format {fmt!r} (formats: vllm, medusa)")
    out_state = {}
    for k in range(K):
        for j in range(L):
            for p in ("weight", "bias"):
                out_state[f"{k}.{j}.linear.{p}"] = state[f"blocks.{k}.layers.{j}.{p}"]
        out_state[f"{k}.{L}.weight"] = widened(state["lm_head.weight"] if c["share_head"] else state[f"lm_heads.{k}.weight"])
    out_state = {k: v.to(dtype).contiguous() for k, v in out_state.items()}
    config = {**base, "medusa_num_heads": K, "medusa_num_layers": L}
    return io.write_model_folder(out, out_state, config, weights_file=AUTHORS_FILE)


def import_medusa(folder: str | Path, target_model, fingerprint: str | None = None) -> MedusaHeads:
    """Medusa heads from our folder, vLLM's layout or the Medusa authors', checked against the target."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: not found (a Medusa checkpoint folder holds config.json and weights)")
    written = json.loads(cfg_path.read_text())
    tc = target_model.config
    if written.get("algorithm") == ALGORITHM:  # our own folder
        heads = MedusaHeads.load(folder, target_model.get_input_embeddings().weight)
        check_target_fit(cfg_path, heads.config, heads.config.get("target_fingerprint"), target_model, fingerprint)
        return heads
    K = written.get("num_heads") or written.get("medusa_num_heads")
    L = written.get("num_hidden_layers") or written.get("medusa_num_layers")
    if not K or not L:
        raise CheckpointError(f"{cfg_path}: neither vLLM's (num_heads, num_hidden_layers) nor the Medusa authors' "
                              f"(medusa_num_heads, medusa_num_layers) head counts")
    authors = folder / AUTHORS_FILE
    weights = load_file(str(authors)) if authors.is_file() else read_weights(folder)
    state: dict[str, Tensor] = {}
    for name, tensor in weights.items():
        name = name.removeprefix("medusa_heads.")
        parts = name.split(".")
        if parts[0].isdigit() and parts[1].isdigit():  # the authors' keys
            name = (f"blocks.{parts[0]}.layers.{parts[1]}.{parts[-1]}" if "linear" in parts
                    else f"lm_heads.{parts[0]}.{parts[-1]}")
        state[name] = tensor
    shared = "lm_head.weight" in state or bool(written.get("original_lm_head"))
    if shared and "lm_head.weight" not in state:
        state["lm_head.weight"] = state.pop("lm_heads.0.weight")
    readout = state["lm_head.weight"] if shared else state.get("lm_heads.0.weight")
    if readout is None:
        raise CheckpointError(f"{folder}: no read-out weights (lm_heads.0.weight or lm_head.weight)")
    hidden, vd = readout.shape[1], readout.shape[0]
    meta = written.get("deepspec") or {}
    config = {"architectures": ["MedusaModel"], "model_type": "medusa", "algorithm": ALGORITHM, "hidden_size": hidden,
              "vocab_size": written.get("vocab_size", tc.vocab_size), "draft_vocab_size": vd, "num_heads": K,
              "head_layers": L, "share_head": shared, "target_num_hidden_layers": tc.num_hidden_layers,
              "imported_from": str(folder), **{k: meta[k] for k in ("target", "target_fingerprint", "head_accuracy") if k in meta}}
    check_target_fit(cfg_path, config, config.get("target_fingerprint"), target_model, fingerprint)
    if "token_map" not in state:
        if vd != config["vocab_size"]:
            raise CheckpointError(f"{folder}: a {vd}-row read-out but no token_map to the target's {config['vocab_size']} ids")
        state["token_map"] = torch.arange(vd)
    for k in range(K):
        for j in range(L):
            state.setdefault(f"blocks.{k}.layers.{j}.bias", torch.zeros(hidden))  # vLLM's default: no bias
    heads = MedusaHeads(config)
    dtype = readout.dtype
    heads = heads.to(dtype)
    missing, unexpected = heads.load_state_dict({k: v.long() if k == "token_map" else v for k, v in state.items()},
                                                strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match the Medusa layout (missing {sorted(missing)[:4]}, "
                              f"unexpected {sorted(unexpected)[:4]})")
    return heads
