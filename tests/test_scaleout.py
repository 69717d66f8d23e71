"""Paper and cluster profiles, `deepspec check`'s cost estimate, device claiming, the prepared GPU check."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PAPER = sorted(Path("config/paper").glob("*.yaml"))


def test_paper_profiles_follow_deepspec_table1_protocol():
    from deepspec.config import load

    assert [p.stem for p in PAPER] == ["qwen3_14b", "qwen3_4b", "qwen3_8b"]
    for path in PAPER:
        cfg = load(path)
        assert list(cfg.tasks) == ["gsm8k", "math500", "aime25", "humaneval", "mbpp", "livecodebench", "mt_bench",
                                   "alpaca", "arena_hard_v2"]
        assert [t.max_samples for t in cfg.tasks.values()] == [500, 500, 30, 164, 256, 500, 80, 500, 500]
        assert cfg.eval.temperature == 1.0 and cfg.target.chat_template_kwargs == {"enable_thinking": False}
        assert cfg.methods["eagle3"].depth == 7 and cfg.methods["eagle3"].top_k == 1
        ids = [1, 10, 19, 28, 37] if "14b" in path.stem else [1, 9, 17, 25, 33]
        for name in ("dflash", "dspark"):
            d = cfg.drafters[name]
            assert d.layers == ids and d.num_layers == 5 and d.block_size == 7 and d.draft_vocab is None
        assert cfg.drafters["eagle3"].layers == [i + 1 for i in ids]  # the same states, input convention
        for d in cfg.drafters.values():
            t = d.train
            assert (t.lr, t.warmup_ratio, t.global_batch, t.epochs) == (6e-4, 0.04, 512, 10)


@pytest.mark.parametrize("profile", [None, "profiles/local-gpu", "profiles/slurm"])
def test_paper_profile_dry_runs(profile):
    extra = ["--profile", profile] if profile else []
    if profile == "profiles/slurm":
        pytest.importorskip("snakemake_executor_plugin_slurm")
        extra += ["--default-resources", "slurm_account=acct", "slurm_partition=gpu"]
    done = subprocess.run(["snakemake", "-n", "--configfile", "config/paper/qwen3_8b.yaml", *extra], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout + done.stderr
    assert "extract               512" in out and "evaluate               36" in out
    assert "gpu=8" in out and "mem_mb=512000" in out  # a train job asks for its 8 processes' GPUs
    evaluate = [block for block in out.split("rule ")[1:] if block.startswith("evaluate:")]
    assert len(evaluate) == 36 and all(re.search(r"\bgpu=1\b", b) for b in evaluate)  # each decodes on a GPU of its own


def test_check_prints_the_cost_before_anything_starts():
    done = subprocess.run(["deepspec", "check", "--config", "config/paper/qwen3_8b.yaml"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # 5 fused layers + final state of a 4096-wide target in bf16: 6 * 4096 * 2 + 5 bytes per token.
    assert "49157 bytes/token" in done.stdout and "19.5k steps of 512 sequences on 8 x fsdp2" in done.stdout
    assert "3 methods x 9 tasks (3030 samples)" in done.stdout


def test_check_counts_fixed_data_conversations():
    """Conversations that keep their dataset answers are extracted and trained on: the plan counts them."""
    from deepspec.config import load
    from deepspec.planning import plan

    rows, _ = plan(load("config/fixed_mix.yaml"))
    by = {r["stage"]: r["work"] for r in rows}
    assert "512 conversations" in by["regenerate"] and "1.0k more keep the dataset's answers" in by["regenerate"]
    # (512 + 1024 - 16 for validation) conversations x 1.33 epochs / 4 sequences per step, rounded up as trained
    assert "506 steps of 4 sequences" in by["train eagle3"]


def test_launch_keys_stay_out_of_hashes():
    """Where and how a job runs is not what it computes: the default config still hashes to what its committed
    reference was last made with, launch keys or not (jobs whose sections did not change keep the hash of the
    run that made them, and the report names every one)."""
    import json

    from deepspec.config import load

    base = load("config/default.yaml")
    moved = load("config/default.yaml", ["drafters.eagle3.train.distributed=ddp", "drafters.eagle3.train.processes=4",
                                         "resources.gpus=1", "train_data.concurrency=64"])
    ref = Path("results/reference/default")
    reference = {json.loads(f.read_text())["config_hash"] for f in ref.glob("eval/*/*/metrics.json")}
    report = (ref / "report.md").read_text()
    assert moved.hash() == base.hash() and f"Config hash `{base.hash()}` (metrics from " in report
    assert base.hash() in reference and all(h in report.split("\n\n")[1] for h in reference)
    assert moved.section("drafters", "eagle3") == base.section("drafters", "eagle3")
    assert load("config/default.yaml", ["drafters.eagle3.train.global_batch=8"]).hash() != base.hash()


def test_jobs_claim_different_devices_and_release_them_on_exit(tmp_path):
    from deepspec.devices import claim_slot

    keys = ["gpu-a", "gpu-b"]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from deepspec.devices import claim_slot; "
                               f"print(claim_slot({keys!r}, Path({str(tmp_path)!r})), flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "0"
    assert claim_slot(keys, tmp_path) == 1  # the other device
    with pytest.raises(RuntimeError, match="all 2 visible devices are held by other deepspec jobs"):
        claim_slot(keys, tmp_path)
    holder.kill()
    holder.wait()
    assert claim_slot(keys, tmp_path) == 0  # the lock went with the process


@pytest.mark.slow  # ~90 s: run it (`-m slow`) before spending a lent device's minutes on the script
def test_prepared_gpu_check_runs_end_to_end_on_a_tiny_target():
    from deepspec.gpu_check import gpu_check

    rows = gpu_check("tiny", steps=2)
    parts = [r["part"] for r in rows]
    assert parts[:5] == ["device", "train eagle3", "train dflash", "train dspark", "train medusa"]
    kinds = ("ar", "pld", "suffix", "draft_lm", "eagle3", "dflash", "dspark", "medusa")
    assert [f"decode {k} (random float32)" for k in kinds] == [p for p in parts if "(random" in p]
    assert [f"decode {k} (SmolLM2-135M float32)" for k in kinds[:4]] == [p for p in parts if "(SmolLM2" in p]
    graphs = next(r for r in rows if "CUDA graphs" in r["part"])
    assert graphs["result"] == "skipped"  # needs a CUDA device; every other part runs here
    assert all(r["result"] == "ok" for r in rows if r is not graphs), rows
    real = {r["part"]: r["detail"] for r in rows if "(SmolLM2" in r["part"]}
    assert "2/2 outputs equal, rule exact" in real["decode pld (SmolLM2-135M float32)"]
    assert float(real["decode pld (SmolLM2-135M float32)"].split("tau ")[1].split(",")[0]) > 1.1  # drafts accepted
