"""Load the target (or any causal LM) by local path, GGUF file, hub id or `packaged:<name>`.

A GGUF file is de-quantised once through transformers' GGUF support and cached as a plain HF folder
keyed by the file's sha256, so later loads take well under a second instead of ~30 s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from deepspec.assets import AssetError, asset_path, cache_dir, sha256_file

PACKAGED = {"smollm2-135m-instruct": "smollm2-135m-instruct.gguf"}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for
    fingerprint: str  # identifies the weights, for lineage

    @property
    def eos_ids(self) -> list[int]:
        return stop_ids(self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id)


def stop_ids(*sources: int | list[int] | None) -> list[int]:
    """The stop tokens named by a generation config and a tokenizer (an id, a list of ids, or none)."""
    ids: set[int] = set()
    for source in sources:
        if source is not None:
            ids.update(source if isinstance(source, list) else [source])
    return sorted(ids)


def _quiet_transformers() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _gguf_to_hf_folder(gguf: Path) -> tuple[Path, str]:
    """De-quantise `gguf` into a cached HF folder (written under a temp name, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = sha256_file(gguf)
    folder = cache_dir() / "hf" / f"{gguf.stem}-{digest[:16]}"
    if (folder / "config.json").is_file():
        return folder, digest
    print(f"[deepspec] converting {gguf.name} to a cached HF folder (once, ~30 s)", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised fp32 now; clear the markers that make save_pretrained refuse.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "deepspec_source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest}))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process won the race; its folder is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, digest


def _folder_fingerprint(folder: Path) -> str:
    src = folder / "deepspec_source.json"
    if src.is_file():
        return json.loads(src.read_text())["sha256"][:16]
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        if path.suffix in (".json", ".safetensors", ".bin", ".model"):
            digest.update(path.name.encode())
            digest.update(str(path.stat().st_size).encode())
            if path.suffix == ".json":
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def resolve(spec: str) -> tuple[str, str]:
    """Map a model spec to (something from_pretrained accepts, fingerprint)."""
    if spec.startswith("packaged:"):
        name = spec.removeprefix("packaged:")
        if name not in PACKAGED:
            raise ModelLoadError(f"target.model: unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
        try:
            gguf = asset_path(PACKAGED[name])
        except AssetError as err:
            raise ModelLoadError(f"target.model: {err}") from None
        folder, digest = _gguf_to_hf_folder(gguf)
        return str(folder), digest[:16]
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"target.model: GGUF file not found: {spec}")
        folder, digest = _gguf_to_hf_folder(path)
        return str(folder), digest[:16]
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"target.model: {spec} is a folder without config.json")
        return str(path), _folder_fingerprint(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"target.model: no such model folder: {spec}")
    return spec, "hub:" + spec  # a hub id; resolved (or refused) by from_pretrained


def gguf_source(spec: str) -> Path | None:
    """The GGUF file a target is converted from (a packaged model or a .gguf path), None for other targets."""
    if spec.startswith("packaged:"):
        name = spec.removeprefix("packaged:")
        return asset_path(PACKAGED[name]) if name in PACKAGED else None
    return Path(spec) if Path(spec).suffix == ".gguf" and Path(spec).is_file() else None


def load_tokenizer(spec: str) -> tuple[object, list[int]]:
    """The target's tokenizer and stop ids without its weights (regeneration through servers needs no more)."""
    _quiet_transformers()
    from transformers import AutoTokenizer, GenerationConfig

    source, _ = resolve(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise ModelLoadError(f"target.model: cannot load the tokenizer of {spec!r} ({str(err).strip()[:200]})") from None
    try:
        eos = GenerationConfig.from_pretrained(source).eos_token_id
    except OSError:
        eos = None
    return tokenizer, stop_ids(eos, tokenizer.eos_token_id)


def load_model(spec: str, dtype: str = "float32") -> LoadedModel:
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, fingerprint = resolve(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype])
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"target.model: cannot load {spec!r}: not a local model and the hub did not provide it ({reason})"
        ) from None
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, fingerprint=fingerprint)
