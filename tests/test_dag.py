"""The smoke DAG through real Snakemake: tables, plots, report and MLflow runs checked by content."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from deepspec.assets import sha256_file
from deepspec.config import load

ROOT = Path(__file__).resolve().parents[1]


def _snakemake(*args: str, results: Path, config: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        ["snakemake", "--cores", "2", *args, "--configfile", "config/smoke.yaml", "--config", f"results_dir={results}", *config],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=900,
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    proc = _snakemake(results=results)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return results, proc


def test_tables_and_report(smoke_run):
    results, _ = smoke_run
    out = results / "smoke"
    md = (out / "tables/summary.md").read_text().splitlines()
    assert [c.strip() for c in md[0].split("|")[1:-1]] == ["method", "mt_bench", "humaneval", "mean"]
    assert [c.strip() for c in md[2].split("|")[1:-1]][0] == "ar"
    assert md[3].startswith("| pld ") and md[4].startswith("| eagle3 ") and md[5].startswith("| dflash ")
    assert re.search(r"\| \d\.\d\d \(\d\.\d\d–\d\.\d\d\) / \d\.\d\d× \(\d\.\d\d–\d\.\d\d\) \|", md[3]), md[3]
    rows = list(csv.DictReader((out / "tables/summary.csv").open()))
    methods = ("ar", "pld", "eagle3", "dflash", "dspark")
    assert {(r["method"], r["task"]) for r in rows} == {(m, t) for m in methods for t in ("mt_bench", "humaneval")}
    for r in rows:
        assert r["lossless"] == "True"
        assert float(r["tokens_per_s"]) > 0 and int(r["samples"]) == 2
    pld = [r for r in rows if r["method"] == "pld"]
    assert all(float(r["tau"]) > 1.0 for r in pld), "prompt lookup accepted nothing"
    for r in rows:
        if r["method"] != "ar":  # every paired cell carries its spread, bracketing its point estimate
            assert float(r["speedup_lo"]) <= float(r["speedup"]) <= float(r["speedup_hi"])
            assert float(r["speedup_min"]) <= float(r["speedup_median"]) <= float(r["speedup_max"])
    metrics = json.loads((out / "eval/pld/mt_bench/metrics.json").read_text())
    assert metrics["config_hash"] == load(out / "config.yaml").hash()
    assert metrics["lossless"]["checked_turns"] == 4  # 2 questions x 2 turns
    assert metrics["spread"]["samples"] == 2 and len(metrics["spread"]["speedup_ci95"]) == 2
    records = [json.loads(line) for line in (out / "eval/pld/mt_bench/records.jsonl").open()]
    assert [len(r["outputs"]) for r in records] == [2, 2]
    assert all(o["token_ids"] == b["token_ids"] for r in records for o, b in zip(r["outputs"], r["baseline"]))
    report = (out / "report.md").read_text()
    assert "![speedup](plots/speedup.png)" in report and "| pld " in report and "all methods pass" in report
    assert "## Drafter training" in report and "![training eagle3](plots/training_eagle3.png)" in report
    assert report.count("Peak resident memory") == 3  # one line per trained drafter, from its train metrics
    h2h = (out / "tables/head_to_head.md").read_text().splitlines()  # every drafted method against prompt lookup
    assert [c.strip() for c in h2h[0].split("|")[1:-1]] == ["method", "rival", "timed in", "mt_bench", "humaneval"]
    assert [[c.strip() for c in line.split("|")[1:4]] for line in h2h[2:]] == [
        ["eagle3", "pld", "separate jobs"], ["eagle3", "pld", "same job"], ["dflash", "pld", "separate jobs"],
        ["dspark", "pld", "separate jobs"]]
    assert all(re.search(r"\d\.\d\d×.*, faster on [0-2] of 2", line) for line in h2h[2:]), h2h
    # eagle3's job ran prompt lookup too (eval.rivals), in turn with it and the baseline: the same greedy outputs
    rivalled = [json.loads(line) for line in (out / "eval/eagle3/mt_bench/records.jsonl").open()]
    assert all(o["token_ids"] == r["token_ids"] == b["token_ids"] for rec in rivalled
               for o, r, b in zip(rec["outputs"], rec["rival"], rec["baseline"]))
    rival = json.loads((out / "eval/eagle3/mt_bench/metrics.json").read_text())["rival"]
    assert rival["method"] == "pld" and rival["samples"] == 2 and rival["same_outputs"] == 4
    assert "rival" not in json.loads((out / "eval/dflash/mt_bench/metrics.json").read_text())
    assert "## Against the fastest method without a drafter" in report


def test_drafter_pipeline_outputs(smoke_run):
    results, _ = smoke_run
    out = results / "smoke"
    regen = [json.loads(line) for line in (out / "data/train/regenerated.jsonl").open()]
    assert len(regen) == 8 and all(0 < sum(r["loss_mask"]) <= 24 for r in regen)
    assert [r["answer_source"] for r in regen] == ["target"] * 6 + ["dataset"] * 2  # fixed data rides along
    feats = out / "features/packaged_smollm2-135m-instruct"
    manifest = json.loads((feats / "manifest.json").read_text())
    assert manifest["layers"] == [2, 15, 27] and manifest["n_layers"] == 30 and len(manifest["shards"]) == 2
    assert manifest["tokens"] == sum(min(len(r["input_ids"]), 160) for r in regen)
    drafter = out / "drafters/eagle3"
    cfg = json.loads((drafter / "model/config.json").read_text())
    summary = json.loads((drafter / "metrics.json").read_text())
    # Only argmax tokens that occur make the draft vocabulary (capped at 512): a few hundred here.
    assert 20 < cfg["draft_vocab_size"] == summary["draft_vocab"] <= 512 and cfg["aux_layers"] == [2, 15, 27]
    assert summary["supervised_positions"] > summary["assistant_positions"] > 0  # supervise: all
    log = [json.loads(line) for line in (drafter / "train_log.jsonl").open()]
    assert log[-1]["loss"] < log[0]["loss"] and "val_tau_chain" in log[-1]
    assert summary["peak_rss_mb"] == max(r["peak_rss_mb"] for r in log) > 100  # per step, in MiB
    metrics = json.loads((out / "eval/eagle3/humaneval/metrics.json").read_text())
    assert metrics["lossless"]["passed"] is True and metrics["kind"] == "eagle3"
    # Block drafters share the one feature cache; their checkpoints record layers by output convention.
    for name, convention, drafts in (("dflash", "own", 3), ("dspark", "next", 4)):
        cfg = json.loads((out / f"drafters/{name}/model/config.json").read_text())
        assert cfg["target_layer_ids"] == [1, 14, 26] and cfg["label_convention"] == convention
        assert cfg["mask_token_id"] == 16 and cfg["algorithm"] == name
        summary = json.loads((out / f"drafters/{name}/metrics.json").read_text())
        assert len(summary["val_acc"]) == drafts and summary["algorithm"] == name
        m = json.loads((out / f"eval/{name}/mt_bench/metrics.json").read_text())
        assert m["lossless"]["passed"] is True and m["kind"] == "block"
        assert max(max(t["proposed"]) for r in (json.loads(x) for x in (out / f"eval/{name}/mt_bench/records.jsonl").open())
                   for t in r["outputs"]) <= drafts
    calibration = json.loads((out / "drafters/dspark/calibration.json").read_text())
    for rule in ("greedy", "sampled"):
        assert len(calibration[rule]["temperature"]) == len(calibration[rule]["bias"]) == 4
        assert {"before", "temperature_only", "after"} <= set(calibration[rule]["pooled"])


def test_plots_are_real_images(smoke_run):
    import matplotlib.image as mpimg

    results, _ = smoke_run
    for name in ("speedup.png", "tau.png", "acceptance_by_depth.png", "training_eagle3.png", "training_dspark.png",
                 "calibration_dspark.png"):
        img = mpimg.imread(results / "smoke/plots" / name)
        assert img.shape[0] > 200 and img.shape[1] > 300
        assert img[..., :3].std() > 0.05  # not a blank canvas


def test_mlflow_runs(smoke_run):
    from mlflow import MlflowClient

    results, _ = smoke_run
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["deepspec.stage"], []).append(run)
    assert {k: len(v) for k, v in by_stage.items()} == {"pipeline": 1, "prepare": 3, "extract": 2, "feature_manifest": 1,
                                                        "train": 3, "evaluate": 10, "report": 1}
    assert client.get_experiment(exp.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    parent = by_stage["pipeline"][0].info.run_id
    for run in runs:
        assert run.info.status == "FINISHED"
        if run.info.run_id != parent:
            assert run.data.tags["mlflow.parentRunId"] == parent
            assert run.data.tags["deepspec.git_commit"] and len(run.data.tags["deepspec.config_hash"]) == 12
    pld_mt = [r for r in by_stage["evaluate"] if r.data.tags["deepspec.method"] == "pld" and r.data.tags["deepspec.task"] == "mt_bench"]
    assert pld_mt[0].data.metrics["tau"] > 1.0 and pld_mt[0].data.params["method.kind"] == "ngram"
    train = next(r for r in by_stage["train"] if r.data.tags["deepspec.drafter"] == "eagle3")
    history = client.get_metric_history(train.info.run_id, "acc_0")
    assert [m.step for m in history] == list(range(1, len(history) + 1))  # one point per optimizer step
    assert {"loss_0", "loss_2", "lr", "tokens_per_s"} <= set(train.data.metrics)
    arts = [a.path for a in client.list_artifacts(by_stage["report"][0].info.run_id, "report")]
    assert "report/report.md" in arts and "report/speedup.png" in arts
    # Lineage: what each run read, by hash.
    out = results / "smoke"
    task_sha = sha256_file(out / "data/tasks/mt_bench.jsonl")[:16]
    assert pld_mt[0].data.tags["deepspec.input.task_data"] == task_sha
    e3 = [r for r in by_stage["evaluate"] if r.data.tags["deepspec.method"] == "eagle3"]
    assert len({r.data.tags["deepspec.input.drafter"] for r in e3}) == 1
    # The eval section a job is tagged with is its own: only eagle3's jobs time a rival (smoke's eval.rivals).
    eval_tags = {r.data.tags["deepspec.method"]: r.data.tags["deepspec.config.eval"] for r in by_stage["evaluate"]}
    assert len(set(eval_tags.values()) - {eval_tags["eagle3"]}) == 1 and eval_tags["eagle3"] != eval_tags["pld"]
    assert train.data.tags["deepspec.input.feature_manifest"] == sha256_file(
        out / "features/packaged_smollm2-135m-instruct/manifest.json")[:16]
    assert len(train.data.tags["deepspec.config.drafter"]) == 12
    drafter_arts = {a.path for a in client.list_artifacts(train.info.run_id, "drafter")}
    assert drafter_arts == {"drafter/config.json", "drafter/model.safetensors"}
    # The parent run carries the summary for MLflow's compare view.
    parent_run = by_stage["pipeline"][0]
    assert parent_run.data.metrics["tau.pld.mt_bench"] == pld_mt[0].data.metrics["tau"]
    assert "summary_table.json" in {a.path for a in client.list_artifacts(parent)}


def test_fresh_run_reproduces_the_committed_reference(smoke_run):
    """The smoke run against results/reference/smoke (committed): decoding is deterministic, so τ matches."""
    results, _ = smoke_run
    out = results / "smoke"
    verdict = json.loads((out / "tables/reproduction.json").read_text())
    assert verdict["reference"] == "results/reference/smoke"
    assert verdict["passed"] is True, verdict["verdict"]
    assert re.match(r"(τ )?REPRODUCED", verdict["verdict"]), verdict["verdict"]
    report = (out / "report.md").read_text()
    assert "## Reproduction" in report and verdict["verdict"] in report
    table = list(csv.DictReader((out / "tables/reproduction.csv").open()))
    assert len(table) == 10 and all(r["τ match"] == "True" for r in table)


def test_html_report_builds(smoke_run, tmp_path):
    results, _ = smoke_run
    html = tmp_path / "report.html"
    proc = _snakemake("--report", str(html), results=results)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = html.read_text()
    assert "speedup.png" in text and "reproduction.md" in text and "summary.csv" in text


def test_rerun_is_a_no_op_and_bad_config_fails_fast(smoke_run):
    results, _ = smoke_run
    proc = _snakemake("-n", results=results)
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr
    bad = _snakemake("-n", results=results, config=("eval={top_p: 2}",))
    assert bad.returncode != 0
    assert bad.stderr.strip().startswith("config error: eval.top_p: Input should be less than or equal to 1 (got")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_bench_drafters_scores_every_drafter_on_the_evaluation_outputs(smoke_run):
    from deepspec.training.teacher_forced import bench_drafters

    results, _ = smoke_run
    cfg = load(results / "smoke" / "config.yaml")
    result = bench_drafters(cfg)
    assert set(result["tasks"]) == {"mt_bench", "humaneval"}
    for rows in result["tasks"].values():
        assert set(rows) == {"eagle3", "dflash", "dspark"}
        assert len(rows["dflash"]["acc"]) == 3 and len(rows["dspark"]["acc"]) == 4 and len(rows["eagle3"]["acc"]) == 3
        for r in rows.values():
            assert 1.0 <= r["tau_teacher_forced"] <= 1.0 + len(r["acc"]) and len(r["tau_decoded"]) == 1
    table = (results / "smoke/bench/drafters.md").read_text()
    assert "| humaneval | dspark | dspark |" in table
