"""MLflow tracking: failed stages end FAILED, parallel writers to one sqlite store lose no runs."""

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
