"""Multi-process training on CPU (gloo): DDP / FSDP2 / DeepSpeed take the same optimizer steps as one
process at the same global batch, and a run stopped at one world size resumes at another."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import pipeline_config

STEPS = 21  # 7 training sequences x 6 epochs in steps of 2


def _prepared(tmp_path, target_dir, drafter: dict | None = None, **train):
    """A feature cache of the tiny target and a config training drafter `d` for STEPS steps of 2 sequences."""
    from deepspec.data.regenerate import regenerate
    from deepspec.features.extract import extract_all

    cfg = pipeline_config(tmp_path, target_dir, epochs=6, batch_sequences=1, global_batch=2, save_every=4,
                        eval_every=5, **train)
    raw = cfg.model_dump(mode="json")
    if drafter is not None:
        raw["drafters"]["d"] = {**drafter, "train": raw["drafters"]["d"]["train"]}
        raw["methods"] = {"ar": {"kind": "autoregressive"}}
    regenerate(cfg)
    extract_all(cfg)
    return raw


def _write(tmp_path, raw: dict, name: str, **train) -> str:
    raw = json.loads(json.dumps(raw))
    raw["drafters"]["d"]["train"].update(train)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _torchrun(config: str, procs: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           "-m", "deepspec.cli", "train", "--config", config, "--drafter", "d", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _log(raw: dict) -> list[dict]:
    from deepspec import io

    return io.read_jsonl(f"{raw['results_dir']}/{raw['experiment']}/drafters/d/train_log.jsonl")


def _close(a: list[float], b: list[float], rel: float = 1e-5) -> float:
    assert len(a) == len(b)
    worst = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
    print(f"largest relative loss difference over {len(a)} steps: {worst:.2e}")
    assert worst <= rel, worst
    return worst


def _reset(raw: dict) -> None:
    import shutil

    shutil.rmtree(f"{raw['results_dir']}/{raw['experiment']}/drafters", ignore_errors=True)


def test_ddp_matches_one_process_and_resumes_at_another_world_size(tmp_path, tiny_target_dir):
    from deepspec.config import load
    from deepspec.training.trainer import train

    raw = _prepared(tmp_path, tiny_target_dir)
    one = load(_write(tmp_path, raw, "one"))
    train(one, "d")
    reference = _log(raw)
    assert len(reference) == STEPS and reference[-1]["loss"] < reference[0]["loss"]

    _reset(raw)
    ddp = _write(tmp_path, raw, "ddp", distributed="ddp", processes=2)
    # `deepspec train` (what the Snakemake rule runs) starts the configured 2 processes itself.
    done = subprocess.run(["deepspec", "train", "--config", ddp, "--drafter", "d"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and "starting 2 processes" in done.stdout, done.stderr[-3000:]
    two = _log(raw)
    _close([r["loss"] for r in two], [r["loss"] for r in reference])
    _close([r["val_loss"] for r in two if "val_loss" in r], [r["val_loss"] for r in reference if "val_loss" in r])

    # Stopped at 2 processes after 10 steps (checkpoint at 8), resumed by 1: the same samples, the same curve.
    _reset(raw)
    stopped = _torchrun(ddp, 2, "--stop-after-steps", "10")
    assert stopped.returncode != 0 and "stopped after 10 steps" in stopped.stderr
    state = json.loads(next((tmp_path / "results").rglob("state.json")).read_text())
    assert state["step"] == 8 and state["world_size"] == 2
    train(one, "d")
    resumed = _log(raw)
    _close([r["loss"] for r in resumed], [r["loss"] for r in reference])
    assert [r["lr"] for r in resumed] == [r["lr"] for r in reference]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["eagle3", "dspark"])
def test_fsdp2_matches_one_process(tmp_path, tiny_target_dir, kind):
    from deepspec.config import load
    from deepspec.training.trainer import train

    drafter = None if kind == "eagle3" else {"kind": "dspark", "layers": [0, 1, 2], "num_layers": 1, "block_size": 4,
                                             "draft_vocab": 300, "num_anchors": 4, "markov_rank": 8}
    raw = _prepared(tmp_path, tiny_target_dir, drafter)
    train(load(_write(tmp_path, raw, "one")), "d")
    reference = _log(raw)
    _reset(raw)
    done = _torchrun(_write(tmp_path, raw, "fsdp2", distributed="fsdp2", processes=2), 2)
    assert done.returncode == 0, done.stderr[-3000:]
    _close([r["loss"] for r in _log(raw)], [r["loss"] for r in reference])


def _deepspeed_reference(tmp_path, tiny_target_dir) -> tuple[dict, list[dict]]:
    from deepspec.config import load
    from deepspec.training.trainer import train

    pytest.importorskip("deepspeed")
    raw = _prepared(tmp_path, tiny_target_dir)
    train(load(_write(tmp_path, raw, "one")), "d")
    return raw, _log(raw)


def test_deepspeed_zero2_trains_as_one_process_and_resumes(tmp_path, tiny_target_dir):
    """DeepSpeed (installed by the README's setup; a skip shows in pytest's summary): ZeRO-2 over 2 gloo processes
    follows the one-process loss curve, and a run killed after step 10 resumes from its step-8 checkpoint onto its
    own curve."""
    raw, reference = _deepspeed_reference(tmp_path, tiny_target_dir)
    _reset(raw)
    config = _write(tmp_path, raw, "zero2", distributed="deepspeed", processes=2, zero_stage=2)
    done = _torchrun(config, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    whole = _log(raw)
    _close([r["loss"] for r in whole], [r["loss"] for r in reference])
    _reset(raw)
    assert _torchrun(config, 2, "--stop-after-steps", "10").returncode != 0
    done = _torchrun(config, 2)
    assert done.returncode == 0 and "resuming at step 8" in done.stdout, done.stderr[-3000:]
    _close([r["loss"] for r in _log(raw)], [r["loss"] for r in whole])


@pytest.mark.slow
def test_deepspeed_zero3_trains_as_one_process(tmp_path, tiny_target_dir):
    """ZeRO-3 (parameters sharded too) over 2 gloo processes follows the one-process loss curve."""
    raw, reference = _deepspeed_reference(tmp_path, tiny_target_dir)
    _reset(raw)
    done = _torchrun(_write(tmp_path, raw, "zero3", distributed="deepspeed", processes=2, zero_stage=3), 2)
    assert done.returncode == 0, done.stderr[-3000:]
    _close([r["loss"] for r in _log(raw)], [r["loss"] for r in reference])
