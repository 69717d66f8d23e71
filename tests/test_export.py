"""Drafters in and out: exports in vLLM's and SGLang's EAGLE-3 layouts round-trip bit-exactly and decode
losslessly; tiny checkpoints in the published layouts load; checkpoints that do not fit fail in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import tiny_llama

LAYERS = 4  # tiny target depth: the EAGLE default aux layers are then [2, 2, 1]
MIDLAYER = {"midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight", "midlayer.post_attention_layernorm.weight",
            "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight",
            "midlayer.self_attn.o_proj.weight", "midlayer.mlp.gate_proj.weight", "midlayer.mlp.up_proj.weight",
            "midlayer.mlp.down_proj.weight"}
# Keys vLLM's / SGLang's LlamaForCausalLMEagle3 read from config.json (a LlamaConfig plus the EAGLE-3 ones).
SERVING_KEYS = {"architectures", "model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_hidden_layers", "rms_norm_eps", "rope_theta", "vocab_size",
                "draft_vocab_size", "hidden_act", "tie_word_embeddings", "max_position_embeddings", "torch_dtype"}


@pytest.fixture(scope="module")
def target():
    return tiny_llama(vocab=64, layers=LAYERS, dtype=torch.float32)


def _drafter(target, layers=(1, 2, 3), seed=0):
    from deepspec.drafters.eagle3.model import Eagle3Drafter

    ids = torch.arange(0, 64, 2)  # a reduced vocabulary, so d2t holds real offsets
    d = Eagle3Drafter.for_target(target, list(layers), ids, init_head=True, seed=seed, target="tiny",
                                 target_fingerprint="fp-tiny", layer_convention="hf_hidden_states_index")
    with torch.no_grad():  # non-trivial norms, so a dropped or swapped norm weight shows
        for name, p in d.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return d


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fmt", ["vllm", "sglang", "hf"])
def test_export_import_round_trip_is_bit_exact(tmp_path, target, fmt):
    from deepspec.drafters.eagle3.checkpoint import import_eagle3, write_export

    drafter = _drafter(target)
    out = write_export(drafter, fmt, tmp_path / fmt)
    back = import_eagle3(out, target, "fp-tiny")
    _same_weights(drafter, back)
    assert back.config["aux_layers"] == [1, 2, 3]
    assert torch.equal(back.draft_to_target, torch.arange(0, 64, 2))


def test_a_full_vocabulary_drafter_exports_without_an_id_map(tmp_path, target):
    """Drafting over the whole vocabulary, engines build no d2t parameter and refuse one in the file."""
    from deepspec.drafters.eagle3.model import Eagle3Drafter
    from deepspec.drafters.eagle3.checkpoint import import_eagle3, write_export

    drafter = Eagle3Drafter.for_target(target, [1, 2, 3], torch.arange(64), init_head=True, seed=0, target="tiny",
                                       target_fingerprint="fp-tiny", layer_convention="hf_hidden_states_index")
    out = write_export(drafter, "vllm", tmp_path / "full")
    assert not {"d2t", "t2d"} & set(load_file(str(out / "model.safetensors")))
    back = import_eagle3(out, target, "fp-tiny")
    _same_weights(drafter, back)
    assert torch.equal(back.draft_to_target, torch.arange(64))


@pytest.mark.parametrize("fmt", ["vllm", "hf"])
def test_fc_input_scale_is_folded_into_fc_on_export(tmp_path, target, fmt):
    """A drafter trained with a per-layer fc input scale exports as plain EAGLE-3 (scale folded into fc's
    columns; no extra key for vLLM/SGLang) and computes the same fused features after the round trip."""
    from deepspec.drafters.eagle3.model import Eagle3Drafter
    from deepspec.drafters.eagle3.checkpoint import import_eagle3, write_export
    from safetensors.torch import load_file

    ids = torch.arange(0, 64, 2)
    d = Eagle3Drafter.for_target(target, [1, 2, 3], ids, seed=0, target_fingerprint="fp-tiny", fc_input_scale=True)
    with torch.no_grad():
        d.fc_in_scale.copy_(torch.tensor([0.5, 0.25, 0.125]).repeat_interleave(target.config.hidden_size))
    out = write_export(d, fmt, tmp_path / fmt)
    back = import_eagle3(out, target, "fp-tiny")
    assert ("fc_in_scale" in load_file(str(out / "model.safetensors"))) == (fmt == "hf")
    x = torch.randn(5, 3 * target.config.hidden_size)
    torch.testing.assert_close(back.fuse(x), d.fuse(x))


def test_serving_layouts_follow_the_engines_conventions(tmp_path, target):
    from deepspec.drafters.eagle3.checkpoint import write_export

    drafter = _drafter(target)
    vllm = write_export(drafter, "vllm", tmp_path / "v", torch.bfloat16)
    sgl = write_export(drafter, "sglang", tmp_path / "s")
    cv, cs = (json.loads((p / "config.json").read_text()) for p in (vllm, sgl))
    for c in (cv, cs):
        assert SERVING_KEYS <= c.keys()
        assert c["architectures"] == ["LlamaForCausalLMEagle3"] and c["num_hidden_layers"] == 1
        assert c["draft_vocab_size"] == 32 and c["vocab_size"] == 64 and c["target_hidden_size"] == 32
        assert c["deepspec"]["target_fingerprint"] == "fp-tiny" and c["deepspec"]["aux_layers"] == [1, 2, 3]
    # vLLM: top-level ids, input of layer k (ours); SGLang: nested ids, output of layer k (ours - 1).
    assert cv["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3] and "eagle_config" not in cv
    assert cs["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert "eagle_aux_hidden_state_layer_ids" not in cs
    assert cv["aux_hidden_state_layer_convention"].startswith("input of layer k")
    assert cs["aux_hidden_state_layer_convention"].startswith("output of layer k")
    w = load_file(str(vllm / "model.safetensors"))
    assert set(w) == {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} | MIDLAYER  # no embed_tokens
    assert w["fc.weight"].dtype == torch.bfloat16 and cv["torch_dtype"] == "bfloat16"
    assert w["d2t"].dtype == torch.int64 and torch.equal(torch.arange(32) + w["d2t"], torch.arange(0, 64, 2))
    assert w["lm_head.weight"].shape == (32, 32) and w["fc.weight"].shape == (32, 96)


def test_imported_drafter_decodes_losslessly_with_acceptance(tmp_path, target):
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.eagle3.proposer import Eagle3Proposer
    from deepspec.drafters.eagle3.checkpoint import import_eagle3, write_export
    from deepspec.models import make_backend

    drafter = import_eagle3(write_export(_drafter(target, layers=(1, 2, 3)), "vllm", tmp_path / "v"), target, None)
    engine = Engine(make_backend(target, "lean", 256), stop_ids=[], max_nodes=16)
    proposer = Eagle3Proposer(drafter, 256, depth=4, top_k=3, total_tokens=10)
    accepted = 0
    for seed in range(3):
        prompt = torch.randint(0, 64, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
        ar = engine.generate(prompt, 40)
        spec = engine.generate(prompt, 40, proposer)
        assert spec.tokens == ar.tokens
        accepted += sum(a - 1 for a in spec.accepted[1:])
    assert accepted > 0, "no drafted token was ever accepted: the test would pass with a broken drafter"


def _published(tmp_path, target, style):
    """A tiny random checkpoint written as the EAGLE authors (pytorch_model.bin, midlayer.*, embed_tokens,
    no layer ids) or SGLang / SpecForge (safetensors, layers.0.*, nested output-of-layer ids, full vocab) do."""
    from deepspec.drafters.eagle3.model import Eagle3Drafter

    torch.manual_seed(3)
    full = style == "sglang"
    ids = torch.arange(64) if full else torch.arange(0, 64, 2)
    aux = [2, 2, 1] if style == "eagle" else [1, 2, 3]
    ref = Eagle3Drafter.for_target(target, aux, ids, init_head=False, seed=3)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": 32,
              "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 64, "draft_vocab_size": len(ids),
              "tie_word_embeddings": False, "torch_dtype": "float32"}
    folder = tmp_path / style
    folder.mkdir()
    if style == "eagle":
        state["embed_tokens.weight"] = target.get_input_embeddings().weight.detach().clone()
        state["t2d"] = state["t2d"].long()
        torch.save(state, folder / "pytorch_model.bin")
    else:
        state = {k.replace("midlayer.", "layers.0."): v for k, v in state.items() if k not in ("d2t", "t2d")}
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [k - 1 for k in aux]}
        save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder, ref


@pytest.mark.parametrize("style", ["eagle", "sglang"])
def test_published_layouts_load(tmp_path, target, style):
    from deepspec.drafters.eagle3.checkpoint import import_eagle3

    folder, ref = _published(tmp_path, target, style)
    drafter = import_eagle3(folder, target, "any-fingerprint")
    _same_weights(ref, drafter)
    assert drafter.config["aux_layers"] == ref.config["aux_layers"]
    hidden = torch.randn(5, 96)
    assert torch.equal(drafter.logits(drafter.fc(hidden)), ref.logits(ref.fc(hidden)))


def test_checkpoints_that_do_not_fit_fail_in_one_line(tmp_path, target):
    from deepspec.drafters.checkpoint import CheckpointError
    from deepspec.drafters.eagle3.checkpoint import import_eagle3, write_export

    out = write_export(_drafter(target), "sglang", tmp_path / "s")
    with pytest.raises(CheckpointError, match=r"config.json: drafter was trained for target weights fp-tiny, these are other$"):
        import_eagle3(out, target, "other")
    wide = tiny_llama(vocab=64, layers=LAYERS, dtype=torch.float32)
    wide.config.hidden_size = 48
    with pytest.raises(CheckpointError, match=r"drafter is for hidden size 32 and vocabulary 64, the target has 48 and 64"):
        import_eagle3(out, wide, None)
    shallow = tiny_llama(vocab=64, layers=2, dtype=torch.float32)
    with pytest.raises(CheckpointError, match=r"drafter is for a 4-layer target, the target has 2"):
        import_eagle3(out, shallow, None)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("deepspec")
    cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [0, 1, 7]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"aux layers \[8\] do not exist in a 4-layer target"):
        import_eagle3(out, target, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"is not an EAGLE-3 drafter"):
        import_eagle3(out, target, None)
    with pytest.raises(CheckpointError, match=r"nowhere/config.json: not found"):
        import_eagle3(tmp_path / "nowhere", target, None)


def test_config_takes_a_checkpoint_or_a_drafter(tmp_path):
    from deepspec.config import ConfigError, validate

    base = {"tasks": {"h": {"kind": "humaneval"}}, "methods": {"ar": {"kind": "autoregressive"}}}
    with pytest.raises(ConfigError, match=r"^config error: methods.e3: set exactly one of 'drafter'"):
        validate(base | {"methods": {"ar": {"kind": "autoregressive"}, "e3": {"kind": "eagle3"}}})
    with pytest.raises(ConfigError, match=r"^config error: methods.e3.checkpoint: no config.json in /nope$"):
        validate(base | {"methods": {"ar": {"kind": "autoregressive"}, "e3": {"kind": "eagle3", "checkpoint": "/nope"}}})


def test_llama3_rope_scaling_is_imported(tmp_path, target):
    """EAGLE-3 drafters for Llama 3.1 carry its llama3 RoPE scaling; dropping it shifts every position."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from deepspec.drafters.eagle3.checkpoint import import_eagle3

    folder, _ = _published(tmp_path, target, "eagle")
    cfg = json.loads((folder / "config.json").read_text())
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg.update(rope_scaling=scaling, max_position_embeddings=512, rope_theta=500000.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    drafter = import_eagle3(folder, target, None)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=8,
                                                            rope_theta=500000.0, rope_scaling=dict(scaling),
                                                            max_position_embeddings=512), "cpu")
    assert torch.allclose(drafter.inv_freq, expected.float())
    plain = 1.0 / (500000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    assert not torch.allclose(drafter.inv_freq, plain)
    assert drafter.config["rope_scaling"]["rope_type"] == "llama3"


def test_a_published_checkpoint_decodes_through_the_method_config(tmp_path, tiny_target_dir):
    """`checkpoint:` in an eagle3 method: the folder is fit-checked against the target and decodes losslessly."""
    from deepspec.drafters.eagle3.config import Eagle3Method
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.build import build_proposer
    from deepspec.drafters.eagle3.model import Eagle3Drafter
    from deepspec.drafters.checkpoint import CheckpointError
    from deepspec.drafters.eagle3.checkpoint import write_export
    from deepspec.models import load_target

    target = load_target(str(tiny_target_dir), max_len=256)
    model = target.loaded.model
    drafter = Eagle3Drafter.for_target(model, [1, 2, 3], torch.arange(0, 4000), target_fingerprint=target.loaded.fingerprint)
    method = Eagle3Method(kind="eagle3", checkpoint=str(write_export(drafter, "sglang", tmp_path / "s")), depth=3,
                          top_k=2, total_tokens=6)
    proposer = build_proposer(method, target, "published")
    engine = Engine(target.backend, target.loaded.eos_ids, max_nodes=16)
    prompt = list(range(100, 120))
    assert engine.generate(prompt, 24, proposer).tokens == engine.generate(prompt, 24).tokens
    other = Eagle3Drafter.for_target(model, [1, 2, 3], torch.arange(0, 4000), target_fingerprint="0123456789abcdef")
    method = method.model_copy(update={"checkpoint": str(write_export(other, "vllm", tmp_path / "v"))})
    with pytest.raises(CheckpointError, match=r"trained for target weights 0123456789abcdef"):
        build_proposer(method, target, "published")
