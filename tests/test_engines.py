"""Real vLLM (its CPU build, in its own environment): an EAGLE-3 drafter we trained and exported loads and
decodes there, losslessly, with the τ our engine measures. Needs `deepspec engine setup vllm` first
(`.ci/run` does it); the tests are skipped, and say so, where the environment is missing."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import fit_eagle3, tiny_llama

pytestmark = pytest.mark.engine

DEPTH = 3  # the chain both engines draft


@pytest.fixture(scope="module")
def vllm_env():
    from deepspec.engines.env import find

    env = find("vllm")
    if env is None:
        pytest.skip("vLLM environment missing: run `deepspec engine setup vllm`")
    return env


def test_exported_eagle3_decodes_in_vllm_losslessly_with_our_tau(tmp_path, vllm_env):
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.eagle3 import Eagle3Proposer
    from deepspec.engines import vllm_runner
    from deepspec.export import write_export
    from deepspec.models import make_backend

    # head_dim 64: a size vLLM's CPU attention kernels take
    target = tiny_llama(vocab=256, layers=4, dtype=torch.float32, hidden=256, heads=4, kv_heads=2, seed=1)
    target.save_pretrained(tmp_path / "target")
    prompts = [torch.randint(0, 256, (8,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(3)]
    from deepspec.drafters.eagle3 import Eagle3Drafter

    layers = (1, 2, 3)  # vLLM's EAGLE-3 fuses three target layers
    drafter = Eagle3Drafter.for_target(target, list(layers), torch.arange(256), init_head=True, seed=0, target="tiny",
                                       target_fingerprint="fp", layer_convention="hf_hidden_states_index")
    drafter = fit_eagle3(drafter, target, prompts, layers, steps=150, ttt=DEPTH, new_tokens=48)
    export = write_export(drafter, "vllm", tmp_path / "eagle3-vllm")

    engine = Engine(make_backend(target, "lean", 256), stop_ids=[], max_nodes=8)
    proposer = Eagle3Proposer(drafter, 256, depth=DEPTH, top_k=1, total_tokens=DEPTH)
    ours_ar, ours_spec, rounds, accepted = [], [], 0, 0
    for p in prompts:
        ours_ar.append(engine.generate(p, 40).tokens)
        gen = engine.generate(p, 40, proposer)
        ours_spec.append(gen.tokens)
        drafted = [d for d, n in zip(gen.accepted_depth[1:], gen.proposed[1:]) if n]
        rounds += len(drafted)
        accepted += sum(drafted)
    assert ours_spec == ours_ar
    ours_tau = 1 + accepted / rounds  # over drafting rounds: vLLM's definition
    assert ours_tau > 2.0  # the drafter is mostly right: a test that passes with every draft rejected proves little

    common = dict(threads=2, max_model_len=256, ignore_eos=True, skip_tokenizer_init=True)
    ar = vllm_runner.decode(vllm_env, tmp_path / "target", prompts, 40, log=tmp_path / "ar.log", **common)
    spec = vllm_runner.decode(vllm_env, tmp_path / "target", prompts, 40, log=tmp_path / "eagle3.log",
                       speculative_config={"method": "eagle3", "model": str(export), "num_speculative_tokens": DEPTH},
                       **common)
    vllm_ar = [s["token_ids"] for s in ar["samples"]]
    assert [s["token_ids"] for s in spec["samples"]] == vllm_ar  # lossless inside vLLM
    assert vllm_ar == ours_ar  # and both engines decode the same greedy text
    vllm_tau = vllm_runner.tau(spec["counters"])
    assert vllm_tau is not None and abs(vllm_tau - ours_tau) <= 0.10 * ours_tau, (vllm_tau, ours_tau)
    assert vllm_runner.acceptance_by_position(spec["counters"])[0] > 0.5  # above a floor where every draft starts
