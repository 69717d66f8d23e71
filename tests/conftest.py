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


def tiny_llama(vocab: int = 64, layers: int = 2, dtype=torch.float64, seed: int = 0, model_type: str = "llama",
               heads: int = 4, kv_heads: int = 2, hidden: int = 32):
    """A randomly initialised Llama-family model: for exact (float64) engine tests only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    # Sharper logits than the default init, so that greedy paths are long and trees get accepted.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def greedy_distillation_data(target, prompts: list[list[int]], hidden_ids=(1, 2), new_tokens: int = 40):
    """The target's own greedy continuations of `prompts` as drafter training sequences (features: HF
    hidden_states[hidden_ids] side by side) and their labels over the full vocabulary: what the overfit
    drafters of the lossless tests learn from, so that their drafts are mostly right."""
    from deepspec.decoding.engine import Engine
    from deepspec.models import make_backend
    from deepspec.training.targets import soft_targets, training_targets

    engine = Engine(make_backend(target, "lean", 256), stop_ids=[])
    seqs = []
    for prompt in prompts:
        ids = torch.tensor(prompt + engine.generate(prompt, new_tokens).tokens)
        with torch.no_grad():
            hs = target(ids[None], output_hidden_states=True).hidden_states
        seqs.append({"input_ids": ids, "hidden": torch.cat([hs[i][0] for i in hidden_ids], -1), "final": hs[-1][0],
                     "loss_mask": torch.ones_like(ids, dtype=torch.bool)})
    cached = soft_targets(seqs, target.lm_head.weight.detach().float(), k=16)
    vocab = torch.arange(target.config.vocab_size)  # full vocabulary: draft id == target id
    return seqs, [training_targets(c, s["loss_mask"], vocab, "all") for c, s in zip(cached, seqs)]


def fit_eagle3(drafter, target, prompts: list[list[int]], layers, steps: int = 120, ttt: int = 3, new_tokens: int = 40):
    """`drafter` trained on the target's own greedy continuations of `prompts` until it predicts them well:
    acceptance is then high, so lossless and engine tests exercise long accepted paths."""
    seqs, tgts = greedy_distillation_data(target, prompts, hidden_ids=layers, new_tokens=new_tokens)
    opt = torch.optim.Adam([q for q in drafter.parameters() if q.requires_grad], lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        for s, t in zip(seqs, tgts):
            losses, _, _ = drafter.ttt_loss(s["hidden"], s["input_ids"], t["target_idx"], t["target_p"],
                                            t["target_top"], t["weight"], t["trained"], ttt)
            sum((0.8**k) * x / len(s["input_ids"]) for k, x in enumerate(losses)).backward()
        opt.step()
    return drafter.eval()


def lossless_tau(engine, proposer, prompts: list[list[int]], unscored: list[list[int]] = (), new_tokens: int = 40):
    """Decode every prompt with and without `proposer`, asserting token-identical outputs; returns τ (committed
    tokens per target forward) and the accepted depth of every round over `prompts` (`unscored` prompts are
    checked for identity only)."""
    committed = forwards = 0
    depths: list[int] = []
    for prompt in [*prompts, *unscored]:
        ar = engine.generate(prompt, new_tokens)
        spec = engine.generate(prompt, new_tokens, proposer)
        assert spec.tokens == ar.tokens
        if prompt in prompts:
            committed += len(spec.tokens)
            forwards += spec.forwards
            depths += spec.accepted_depth[1:]
    return committed / forwards, depths


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


def pipeline_config(tmp_path, target_dir, **train):
    """The tiny target's whole training pipeline (8 regenerated conversations, 2 feature shards, EAGLE-3 `d`)."""
    import json

    from deepspec.config import validate

    tmp_path.mkdir(parents=True, exist_ok=True)
    convs = tmp_path / "convs.jsonl"
    convs.write_text("".join(json.dumps({"id": f"c{i}", "turns": [f"Tell me about topic {i}.", "And more?"]}) + "\n"
                             for i in range(10)))
    return validate({
        "experiment": "tiny", "results_dir": str(tmp_path / "results"),
        "target": {"model": str(target_dir), "max_len": 256},
        "tasks": {"t": {"kind": "jsonl", "source": str(convs)}},
        "methods": {"ar": {"kind": "autoregressive"}, "e3": {"kind": "eagle3", "drafter": "d"}},
        "train_data": {"kind": "jsonl", "source": str(convs), "max_samples": 8, "max_turns": 2, "max_new_tokens": 12,
                       "batch_size": 3, "temperature": 0.8},
        "features": {"shards": 2, "dtype": "float32"},
        "drafters": {"d": {"kind": "eagle3", "layers": [1, 2, 3], "draft_vocab": 300, "ttt_length": 3,
                           "train": {"epochs": 3, "batch_sequences": 2, "warmup_steps": 2, "val_sequences": 1,
                                     "eval_every": 2, "save_every": 3, **train}}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })
