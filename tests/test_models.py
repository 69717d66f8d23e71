"""Target loading: packaged GGUF offline through a cache, local folders, clear errors; lean forward = HF forward."""

from __future__ import annotations

import pytest
import torch

from deepspec.models import ModelLoadError, load_model, make_backend
from deepspec.models.hf_backend import HFBackend
from deepspec.models.lean import LeanLlama

from conftest import REAL_MODEL, tiny_llama


def test_packaged_model_loads_offline_from_cache(real_target, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    loaded = load_model(REAL_MODEL)
    assert "converting" not in capsys.readouterr().out  # the converted folder is reused, no de-quantisation
    assert loaded.model.config.model_type == "llama" and loaded.model.config.num_hidden_layers == 30
    assert loaded.fingerprint == real_target.loaded.fingerprint and len(loaded.fingerprint) == 16
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.eos_ids) == ["<|im_end|>"]
    assert isinstance(real_target.backend, LeanLlama)


def test_local_folder_and_errors(tmp_path, real_target):
    tiny_llama(dtype=torch.float32).save_pretrained(tmp_path / "m")
    real_target.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.model.config.num_hidden_layers == 2 and len(loaded.fingerprint) == 16
    assert loaded.fingerprint == load_model(str(tmp_path / "m")).fingerprint

    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="folder without config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="unknown packaged model 'nope'"):
        load_model("packaged:nope")
    with pytest.raises(ModelLoadError, match=r"cannot load 'no-such-org/no-such-model': not a local model"):
        load_model("no-such-org/no-such-model")


def test_lean_forward_matches_hf_logits():
    model = tiny_llama()
    lean = LeanLlama(model, 128)
    ids = torch.randint(0, 64, (20,))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    logits, _ = lean.forward(ids, torch.arange(20))
    torch.testing.assert_close(logits, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_lean_forward_other_llama_families(model_type):
    model = tiny_llama(model_type=model_type)
    if model_type == "qwen3":  # non-trivial q/k norms so that their use is tested
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    lean = make_backend(model, "auto", 64)
    assert isinstance(lean, LeanLlama)
    ids = torch.randint(0, 64, (12,))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    # HF takes RMSNorm statistics in float32 even for float64 models, so the fused q/k/v matmul's last-bit
    # differences can round differently there; wrong architecture handling gives errors of order 1e-1.
    torch.testing.assert_close(lean.forward(ids, torch.arange(12))[0], ref, rtol=1e-5, atol=1e-5)


def test_backend_choice():
    model = tiny_llama(model_type="llama")
    assert isinstance(make_backend(model, "hf", 64), HFBackend)
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    assert isinstance(make_backend(gpt2, "auto", 64), HFBackend)
    with pytest.raises(ModelLoadError, match="^target.backend: 'lean' supports"):
        make_backend(gpt2, "lean", 64)
    with pytest.raises(ModelLoadError, match="^train_data.backend: 'lean' supports"):  # regeneration's own key
        make_backend(gpt2, "lean", 64, key="train_data.backend")


@pytest.mark.parametrize("model_type,dtype", [("llama", torch.float64), ("qwen3", torch.float64), ("llama", torch.float32)])
def test_lean_batched_generation_equals_one_sequence_at_a_time(model_type, dtype):
    """Regeneration's batched KV cache (right-aligned prompts, per-row positions, finished rows dropped
    mid-run) writes what our single-sequence greedy decoding writes, row by row (float32: through the
    oneDNN-packed weights where available)."""
    from deepspec.decoding.engine import Engine

    model = tiny_llama(model_type=model_type, layers=3, dtype=dtype)
    lean = LeanLlama(model, 128)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 9, 5, 14, 1, 7)]
    engine = Engine(lean, stop_ids=[])
    singles = [engine.generate(p, 20).tokens for p in prompts]
    # Stop tokens chosen so that rows finish at different steps (and the batch compacts).
    stops = sorted({s[i] for s, i in zip(singles, (2, 5, 11))})
    batched = lean.generate_batch(prompts, 20, stops)
    for single, got in zip(singles, batched):
        cut = next((i + 1 for i, t in enumerate(single) if t in stops), len(single))
        assert got == single[:cut]
    assert sum(len(b) < 20 for b in batched) >= 3  # several rows did stop early


def test_onednn_packed_linear_matches_plain_matmuls():
    """The prepacked oneDNN weights compute the same forward as plain matmuls (float32 rounding apart),
    for one row and for several, and the engine's greedy output is unchanged."""
    from deepspec.decoding.engine import Engine
    from deepspec.models.lean import onednn_available

    if not onednn_available():
        pytest.skip("no oneDNN in this torch build")
    model = tiny_llama(dtype=torch.float32, layers=3)
    plain, packed = LeanLlama(model, 128, linear="torch"), LeanLlama(model, 128, linear="onednn")
    assert packed.linear == "onednn" and plain.linear == "torch"
    ids = torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(1))
    for n in (1, 4, 20):
        plain.cache.reset()
        packed.cache.reset()
        torch.testing.assert_close(packed.forward(ids[:n], torch.arange(n))[0], plain.forward(ids[:n], torch.arange(n))[0],
                                   rtol=1e-4, atol=1e-4)
    prompt = ids[:6].tolist()
    assert Engine(packed, []).generate(prompt, 30).tokens == Engine(plain, []).generate(prompt, 30).tokens
    with pytest.raises(ValueError, match="float32 model"):
        LeanLlama(tiny_llama(), 64, linear="onednn")
