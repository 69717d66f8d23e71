"""The only module that talks to MLflow.

One experiment per config (`experiment` key), one run per stage invocation, grouped under a parent run
per pipeline invocation (Snakemake creates it in `onstart`). Every call retries on sqlite's "database is
locked", so parallel Snakemake jobs do not lose runs; a stage that raises ends its run as FAILED.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

T = TypeVar("T")
PIPELINE_ENV = "DEEPSPEC_PIPELINE_RUN_ID"
# MLflow 3's UI opens an experiment on a GenAI traces overview unless the experiment says it holds
# model-development runs; ours do, so the UI lands on the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri(results_dir: str | Path, configured: str | None = None) -> str:
    """MLFLOW_TRACKING_URI wins, then the config's `tracking.uri`, then sqlite under `results_dir`."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    return f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


def _retry(fn: Callable[[], T], attempts: int = 30) -> T:
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:  # sqlite lock errors surface wrapped in several MLflow exception types
            text = str(err).lower()
            if i == attempts - 1 or not any(s in text for s in ("locked", "busy", "unique constraint", "already exists")):
                raise
            time.sleep(0.2 + 0.1 * i)
    raise AssertionError("unreachable")


@contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return sha + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_root: Path):
        import mlflow
        from mlflow import MlflowClient

        self._mlflow = mlflow
        self.uri = uri
        # A fresh sqlite store is created and migrated on first use; two processes doing that at once
        # corrupt the schema, so first use is serialised by a lock file beside the database.
        with _sqlite_init_lock(uri):
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = _retry(lambda: self._experiment(experiment, artifact_root))

    def _experiment(self, name: str, artifact_root: Path) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
                for k, v in EXPERIMENT_KIND.items():
                    self.client.set_experiment_tag(found.experiment_id, k, v)
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_root.resolve().as_uri(),
                                                 tags=EXPERIMENT_KIND)
        except Exception:
            found = self.client.get_experiment_by_name(name)  # created concurrently by another job
            if found is None:
                raise
            return found.experiment_id

    def start(self, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
        tags = {k: str(v) for k, v in tags.items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = _retry(lambda: self.client.create_run(self.experiment_id, tags=tags, run_name=name))
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            _retry(lambda chunk=items[i : i + 100]: self.client.log_batch(run_id, params=chunk))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 500):
            _retry(lambda chunk=items[i : i + 500]: self.client.log_batch(run_id, metrics=chunk))

    def log_artifact(self, run_id: str, path: str | Path, subdir: str | None = None) -> None:
        """A file, or a whole folder (e.g. a trained drafter) under `subdir`."""
        if Path(path).is_dir():
            _retry(lambda: self.client.log_artifacts(run_id, str(path), subdir))
        else:
            _retry(lambda: self.client.log_artifact(run_id, str(path), subdir))

    def runs_url(self, host: str = "127.0.0.1", port: int = 5000) -> str:
        """Where `mlflow ui` (bound to `host`) shows this experiment's runs table. MLflow 3.17's UI opens in
        its GenAI mode (a traces overview that is empty for us); `workflowType` switches it to model training."""
        return f"http://{host}:{port}/#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"

    def log_table(self, run_id: str, frame, artifact_file: str) -> None:
        """A pandas DataFrame as an MLflow table artifact (shown as a table in the UI)."""
        _retry(lambda: self.client.log_table(run_id, data=frame, artifact_file=artifact_file))

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            _retry(lambda k=k, v=v: self.client.set_tag(run_id, k, str(v)))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        _retry(lambda: self.client.set_terminated(run_id, status))

    def runs(self, filter_string: str = "") -> list:
        return self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=5000)


def tracker_for(cfg) -> Tracker:
    return Tracker(tracking_uri(cfg.results_dir, cfg.tracking.uri), cfg.experiment, Path(cfg.results_dir) / "mlartifacts")


def start_pipeline(cfg) -> str:
    """Parent run for one pipeline invocation; its id reaches the stages through DEEPSPEC_PIPELINE_RUN_ID."""
    tracker = tracker_for(cfg)
    return tracker.start(f"pipeline {cfg.experiment}", {"deepspec.stage": "pipeline", "deepspec.config_hash": cfg.hash(), "deepspec.git_commit": git_commit()})


def end_pipeline(cfg, run_id: str, ok: bool) -> None:
    tracker_for(cfg).end(run_id, "FINISHED" if ok else "FAILED")


class StageRun:
    """Handle given to a stage: log params, metrics, artifacts into its run."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id

    def params(self, params: dict[str, Any]) -> None:
        self.tracker.log_params(self.run_id, params)

    def metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step)

    def artifact(self, path: str | Path, subdir: str | None = None) -> None:
        self.tracker.log_artifact(self.run_id, path, subdir)

    def tags(self, tags: dict[str, str]) -> None:
        self.tracker.set_tags(self.run_id, tags)

    def table(self, frame, artifact_file: str) -> None:
        self.tracker.log_table(self.run_id, frame, artifact_file)

    def parent(self) -> "StageRun | None":
        """The pipeline run this stage belongs to (None when run outside Snakemake)."""
        parent_id = self.tracker.client.get_run(self.run_id).data.tags.get("mlflow.parentRunId")
        return StageRun(self.tracker, parent_id) if parent_id else None


class NoRun(StageRun):
    """A stage run that records nothing: what the other ranks of a multi-process stage log to."""

    def __init__(self) -> None:
        pass

    def params(self, params: dict[str, Any]) -> None:
        pass

    def metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        pass

    def artifact(self, path: str | Path, subdir: str | None = None) -> None:
        pass

    def tags(self, tags: dict[str, str]) -> None:
        pass

    def table(self, frame, artifact_file: str) -> None:
        pass

    def parent(self) -> None:
        return None


def lineage(files: dict[str, str | Path] | None = None, sections: dict[str, str] | None = None) -> dict[str, str]:
    """Tags naming what a stage read: `deepspec.input.<name>` = sha256 (16 hex) of each file (or, for a
    folder, of its files in name order), `deepspec.config.<name>` = hash of each config section."""
    from deepspec.assets import sha256_file

    tags = {}
    for name, path in (files or {}).items():
        path = Path(path)
        if path.is_dir():
            digest = hashlib.sha256("".join(f"{f.relative_to(path)}:{sha256_file(f)}\n" for f in sorted(path.rglob("*"))
                                            if f.is_file()).encode()).hexdigest()
        else:
            digest = sha256_file(path)
        tags[f"deepspec.input.{name}"] = digest[:16]
    tags.update({f"deepspec.config.{k}": v for k, v in (sections or {}).items()})
    return tags


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Snakemake stops jobs with SIGTERM; turn it into KeyboardInterrupt so the run can end KILLED."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def stage_run(cfg, stage: str, name: str | None = None, enabled: bool = True, **tags: str) -> Iterator[StageRun]:
    """One MLflow run for one stage invocation, ended FINISHED; KILLED when interrupted (Ctrl-C, or
    SIGTERM from Snakemake); FAILED when the stage raises. `enabled=False` (ranks other than 0 of a
    multi-process stage) records nothing."""
    if not enabled:
        yield NoRun()
        return
    tracker = tracker_for(cfg)
    all_tags = {
        "deepspec.stage": stage,
        "deepspec.config_hash": cfg.hash(),
        "deepspec.git_commit": git_commit(),
        "deepspec.experiment": cfg.experiment,
        **{f"deepspec.{k}": v for k, v in tags.items()},
    }
    run_id = tracker.start(name or stage, all_tags, os.environ.get(PIPELINE_ENV) or None)
    try:
        with _sigterm_as_interrupt():
            yield StageRun(tracker, run_id)
    except KeyboardInterrupt:
        tracker.end(run_id, "KILLED")
        raise
    except BaseException:
        tracker.end(run_id, "FAILED")
        raise
    tracker.end(run_id, "FINISHED")
