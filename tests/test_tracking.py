"""MLflow tracking: failed stages end FAILED, interrupted ones KILLED, parallel writers to one sqlite store lose no runs."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from deepspec import tracking
from deepspec.config import validate

from conftest import REAL_MODEL


def _cfg(results):
    return validate({"experiment": "trk", "results_dir": str(results), "target": {"model": REAL_MODEL},
                     "tasks": {"h": {"kind": "humaneval"}}, "methods": {"ar": {"kind": "autoregressive"}}})


def _client(results):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("trk")
    return client, exp.experiment_id


def test_failed_stage_ends_failed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run(cfg, "evaluate", method="ar", task="h") as run:
            run.metrics({"tau": 1.5})
            raise RuntimeError("boom")
    client, exp = _client(tmp_path)
    (r,) = client.search_runs([exp])
    assert r.info.status == "FAILED" and r.data.metrics["tau"] == 1.5
    assert r.data.tags["deepspec.method"] == "ar" and r.data.tags["deepspec.config_hash"] == cfg.hash()


def _writer(results: str, k: int) -> None:
    from pathlib import Path

    cfg = _cfg(Path(results))
    for i in range(5):
        with tracking.stage_run(cfg, "evaluate", f"w{k}-{i}") as run:
            run.metrics({"i": i})
            run.params({"k": k})


def test_parallel_writers_lose_no_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs)
    client, exp = _client(tmp_path)
    runs = client.search_runs([exp], max_results=100)
    assert sorted(r.info.run_name for r in runs) == sorted(f"w{k}-{i}" for k in range(4) for i in range(5))
    assert all(r.info.status == "FINISHED" for r in runs)


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.tracking_uri(tmp_path, "http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x.db")
    assert tracking.tracking_uri(tmp_path, "http://127.0.0.1:5000") == "sqlite:////tmp/x.db"


_SLEEPER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_tracking import _cfg
from deepspec import tracking
with tracking.stage_run(_cfg(Path({results!r})), "train") as run:
    run.metrics({{"step": 1}})
    print("started", flush=True)
    time.sleep(120)
"""


def test_sigterm_ends_the_run_killed(tmp_path, monkeypatch):
    """Snakemake stops a job with SIGTERM: its run must end KILLED (not FAILED, not left RUNNING)."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = _SLEEPER.format(tests=str(Path(__file__).parent), results=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert proc.returncode != 0
    client, exp = _client(tmp_path)
    (r,) = client.search_runs([exp])
    assert r.info.status == "KILLED" and r.data.metrics["step"] == 1


def test_experiment_lands_on_runs_and_lineage_hashes_inputs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "task.jsonl"
    data.write_text('{"question_id": 1}\n')
    folder = tmp_path / "drafter"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    tags = tracking.lineage({"task_data": data, "drafter": folder}, {"method": "abc"})
    import hashlib

    assert tags["deepspec.input.task_data"] == hashlib.sha256(data.read_bytes()).hexdigest()[:16]
    (folder / "config.json").write_text("{ }")  # any change to the folder changes its hash
    assert tracking.lineage({"drafter": folder})["deepspec.input.drafter"] != tags["deepspec.input.drafter"]
    assert tags["deepspec.config.method"] == "abc"
    cfg = _cfg(tmp_path)
    with tracking.stage_run(cfg, "evaluate"):
        pass
    client, exp = _client(tmp_path)
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
