"""Target models: loading (path, hub id, GGUF, packaged default) and the forward backends the engine drives."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepspec.models.hf_backend import HFBackend
from deepspec.models.lean import SUPPORTED_MODEL_TYPES, LeanLlama
from deepspec.models.loading import LoadedModel, ModelLoadError, load_model


@dataclass
class Target:
    loaded: LoadedModel
    backend: LeanLlama | HFBackend

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


def make_backend(model, backend: str = "auto", max_len: int = 4096, key: str = "target.backend") -> LeanLlama | HFBackend:
    """`auto` picks the lean forward for Llama-family models and HF's forward for everything else; `key`
    names the config entry an impossible choice is reported against."""
    model_type = model.config.model_type
    if backend == "lean" and model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"{key}: 'lean' supports {', '.join(SUPPORTED_MODEL_TYPES)}, not {model_type!r}")
    if backend == "lean" or (backend == "auto" and model_type in SUPPORTED_MODEL_TYPES):
        return LeanLlama(model, max_len)
    return HFBackend(model, max_len)


def load_target(spec: str, dtype: str = "float32", backend: str = "auto", max_len: int = 4096,
                device: torch.device | str = "cpu") -> Target:
    """The target and its forward backend on `device` (the backend's caches are allocated there too)."""
    from deepspec.devices import on

    loaded = load_model(spec, dtype)
    loaded.model.to(device)
    with on(device):
        return Target(loaded, make_backend(loaded.model, backend, max_len))


__all__ = ["Target", "load_target", "make_backend", "load_model", "LoadedModel", "ModelLoadError"]
