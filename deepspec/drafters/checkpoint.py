"""Drafter checkpoint folders: our own HF-style folder, and reading the weights of published ones."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from deepspec import io


class CheckpointError(ValueError):
    """A checkpoint that does not fit the target or is not in a layout we read; one line, naming the file."""


def check_target_fit(cfg_path: Path, config: dict, drafter_fp: str | None, target_model, fingerprint: str | None) -> None:
    """Refuse a drafter whose hidden size or vocabulary is not the target's, or that names other target weights."""
    tc = target_model.config
    if config["hidden_size"] != tc.hidden_size or config["vocab_size"] != tc.vocab_size:
        raise CheckpointError(f"{cfg_path}: drafter is for hidden size {config['hidden_size']} and vocabulary "
                              f"{config['vocab_size']}, the target has {tc.hidden_size} and {tc.vocab_size}")
    if drafter_fp and fingerprint and drafter_fp != fingerprint:
        raise CheckpointError(f"{cfg_path}: drafter was trained for target weights {drafter_fp}, these are {fingerprint}")


def read_weights(folder: Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint folder: one safetensors file, a sharded index, or a torch binary (tensors
    only, nothing executed)."""
    st, index, binary = folder / "model.safetensors", folder / "model.safetensors.index.json", folder / "pytorch_model.bin"
    if st.is_file():
        return load_file(str(st))
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(folder / f)).items()}
    if binary.is_file():  # the EAGLE authors' releases
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


class FolderCheckpoint:
    """Save / load a drafter as an HF-style folder: config.json + model.safetensors (no pickle), written
    under a temp name then renamed into place. `ALGORITHMS` are the config `algorithm` values a class loads."""

    ALGORITHMS: tuple[str, ...] = ()

    def save(self, directory: str | Path) -> Path:
        return io.write_model_folder(directory, {k: v.detach().contiguous() for k, v in self.state_dict().items()},
                                     self.config)

    @classmethod
    def load(cls, directory: str | Path, embed: Tensor):
        """The drafter in `directory`, over the target's (frozen, not stored) embedding `embed`."""
        directory = Path(directory)
        cfg_path = directory / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: no drafter checkpoint; run `deepspec train` first")
        config = json.loads(cfg_path.read_text())
        if config.get("algorithm") not in cls.ALGORITHMS:
            raise ValueError(f"{cfg_path}: algorithm is {config.get('algorithm')!r}, not {' or '.join(cls.ALGORITHMS)}")
        if embed.shape != (config["vocab_size"], config["hidden_size"]):
            raise ValueError(f"{cfg_path}: drafter is for a {config['vocab_size']}x{config['hidden_size']} embedding, "
                             f"the target has {tuple(embed.shape)}")
        model = cls(config, embed)
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model
