"""Real vLLM (its CPU build, in its own environment): an EAGLE-3 drafter and Medusa heads we trained and
exported load and decode there, losslessly, with the τ our engine measures. Needs `deepspec engine setup vllm` first
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


@pytest.fixture(scope="module")
def target_run(tmp_path_factory, vllm_env):
    """A small target (head_dim 64: a size vLLM's CPU attention kernels take), its prompts, and vLLM's own
    autoregressive outputs for them."""
    from deepspec.engines import vllm_runner

    folder = tmp_path_factory.mktemp("vllm")
    target = tiny_llama(vocab=256, layers=4, dtype=torch.float32, hidden=256, heads=4, kv_heads=2, seed=1)
    target.save_pretrained(folder / "target")
    prompts = [torch.randint(0, 256, (8,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(3)]
    ar = vllm_runner.decode(vllm_env, folder / "target", prompts, 40, log=folder / "ar.log", **COMMON)
    return target, folder, prompts, [s["token_ids"] for s in ar["samples"]]


COMMON = dict(threads=2, max_model_len=256, ignore_eos=True, skip_tokenizer_init=True)


def ours(target, proposer, prompts) -> tuple[list[list[int]], list[list[int]], float]:
    """Our AR and speculative outputs, and τ over the drafting rounds (vLLM's definition)."""
    from deepspec.decoding.engine import Engine
    from deepspec.models import make_backend

    engine = Engine(make_backend(target, "lean", 256), stop_ids=[], max_nodes=8)
    ar, spec, rounds, accepted = [], [], 0, 0
    for p in prompts:
        ar.append(engine.generate(p, 40).tokens)
        gen = engine.generate(p, 40, proposer)
        spec.append(gen.tokens)
        drafted = [d for d, n in zip(gen.accepted_depth[1:], gen.proposed[1:]) if n]
        rounds += len(drafted)
        accepted += sum(drafted)
    return ar, spec, 1 + accepted / rounds


def check_in_vllm(vllm_env, folder, prompts, vllm_ar, ours_ar, ours_tau, speculative_config, name):
    from deepspec.engines import vllm_runner

    spec = vllm_runner.decode(vllm_env, folder / "target", prompts, 40, log=folder / f"{name}.log",
                              speculative_config=speculative_config, **COMMON)
    assert [s["token_ids"] for s in spec["samples"]] == vllm_ar  # lossless inside vLLM
    assert vllm_ar == ours_ar  # and both engines decode the same greedy text
    vllm_tau = vllm_runner.tau(spec["counters"])
    assert vllm_tau is not None and abs(vllm_tau - ours_tau) <= 0.10 * ours_tau, (vllm_tau, ours_tau)
    assert vllm_runner.acceptance_by_position(spec["counters"])[0] > 0.5  # above a floor where every draft starts


def test_exported_eagle3_decodes_in_vllm_losslessly_with_our_tau(target_run, vllm_env):
    from deepspec.drafters.eagle3.checkpoint import write_export
    from deepspec.drafters.eagle3.model import Eagle3Drafter
    from deepspec.drafters.eagle3.proposer import Eagle3Proposer

    target, folder, prompts, vllm_ar = target_run
    layers = (1, 2, 3)  # vLLM's EAGLE-3 fuses three target layers
    drafter = Eagle3Drafter.for_target(target, list(layers), torch.arange(256), init_head=True, seed=0, target="tiny",
                                       target_fingerprint="fp", layer_convention="hf_hidden_states_index")
    drafter = fit_eagle3(drafter, target, prompts, layers, steps=150, ttt=DEPTH, new_tokens=48)
    export = write_export(drafter, "vllm", folder / "eagle3-vllm")
    ours_ar, ours_spec, ours_tau = ours(target, Eagle3Proposer(drafter, 256, depth=DEPTH, top_k=1, total_tokens=DEPTH),
                                        prompts)
    assert ours_spec == ours_ar
    assert ours_tau > 2.0  # the drafter is mostly right: a test that passes with every draft rejected proves little
    check_in_vllm(vllm_env, folder, prompts, vllm_ar, ours_ar, ours_tau,
                  {"method": "eagle3", "model": str(export), "num_speculative_tokens": DEPTH}, "eagle3")


def test_exported_medusa_decodes_in_vllm_losslessly_with_our_tau(target_run, vllm_env):
    """Heads with a reduced draft vocabulary (vLLM's token_map) and one shared read-out (original_lm_head)."""
    from deepspec.drafters.medusa.checkpoint import export_medusa
    from deepspec.drafters.medusa.model import MedusaHeads
    from deepspec.drafters.medusa.proposer import MedusaProposer
    from deepspec.models import make_backend
    from deepspec.models.lean import normed_final
    from deepspec.training.targets import soft_targets, training_targets
    from tests.conftest import greedy_distillation_data

    target, folder, prompts, vllm_ar = target_run
    seqs, _ = greedy_distillation_data(target, prompts, new_tokens=48)
    used = torch.tensor(sorted({int(t) for s in seqs for t in s["input_ids"]} | set(range(200))))
    heads = MedusaHeads.for_target(target, used, DEPTH, 1, share_head=True)
    lookup = torch.full((256,), -1, dtype=torch.long)
    lookup[used] = torch.arange(used.numel())
    cached = soft_targets(seqs, target.lm_head.weight.detach().float(), k=16)
    labels = [training_targets(c, s["loss_mask"], lookup, "all") for c, s in zip(cached, seqs)]
    opt = torch.optim.Adam([p for p in heads.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        for s, t in zip(seqs, labels):
            losses, _, _ = heads.medusa_loss(s["final"].float(), s["input_ids"], t["target_idx"], t["target_p"],
                                             t["target_top"], t["weight"], t["trained"], DEPTH)
            sum(0.8**k * x / len(s["input_ids"]) for k, x in enumerate(losses)).backward()
        opt.step()
    export = export_medusa(heads.eval(), "vllm", folder / "medusa-vllm", target.lm_head.weight)
    backend = make_backend(target, "lean", 256)
    proposer = MedusaProposer(heads, 4, lambda h: normed_final(backend, h), top_k=1, total_tokens=DEPTH)
    ours_ar, ours_spec, ours_tau = ours(target, proposer, prompts)
    assert ours_spec == ours_ar
    assert ours_tau > 2.0
    check_in_vllm(vllm_env, folder, prompts, vllm_ar, ours_ar, ours_tau,
                  {"method": "medusa", "model": str(export), "num_speculative_tokens": DEPTH}, "medusa")
