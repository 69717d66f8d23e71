"""Shared fixtures: the real default target (loaded once) and tiny random Llama models for exact tests."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

REAL_MODEL = "packaged:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def real_target():
    from deepspec.models import load_target

    torch.set_num_threads(os.cpu_count() or 1)
    return load_target(REAL_MODEL, max_len=2048)


def tiny_llama(vocab: int = 64, layers: int = 2, dtype=torch.float64, seed: int = 0, model_type: str = "llama"):
    """A randomly initialised Llama-family model: for exact (float64) engine tests only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    # Sharper logits than the default init, so that greedy paths are long and trees get accepted.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture
def tiny_model():
    return tiny_llama()


def write_config(path, results_dir, **over):
    """A smoke-sized config file under `path` writing into `results_dir`."""
    import yaml

    cfg = {
        "experiment": "t",
        "results_dir": str(results_dir),
        "target": {"model": REAL_MODEL, "max_len": 1024},
        "tasks": {"humaneval": {"kind": "humaneval", "max_samples": 2}},
        "methods": {"ar": {"kind": "autoregressive"}, "pld": {"kind": "ngram"}},
        "eval": {"max_new_tokens": 8},
    }
    for key, value in over.items():
        cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory):
    """A small random Llama that shares SmolLM2's tokenizer: a real `any causal LM by path` target."""
    from deepspec.models import load_model

    folder = tmp_path_factory.mktemp("tiny_target")
    tok = load_model(REAL_MODEL).tokenizer
    model = tiny_llama(vocab=len(tok), layers=4, dtype=torch.float32, seed=3)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
