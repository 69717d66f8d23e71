"""`deepspec bench memory`: training memory against the size of the feature cache.

The experiment's feature cache is replicated 1x, 4x and 16x by hard links (so the larger caches cost no
disk; the trainer reads every copy as sequences of their own) and every drafter trains the same number of
steps on each, in a process of its own, plus the first drafter under DDP with 2 processes. The measure is
the train metrics' peak resident memory (the largest rank's): the trainer reads the cache a micro-batch at a
time, so it should stay flat while the cache grows. Finished runs are kept in `memory_runs.jsonl`, so an
interrupted bench resumes at the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from deepspec import io, tracking
from deepspec.config import Config, ConfigError, merge, validate
from deepspec.config_base import TrainConfig
from deepspec.features.extract import FeatureCacheError, load_manifest
from deepspec.layout import bench_dir, drafter_dir, features_dir

SCALES = (1, 4, 16)


def replicate_cache(src: Path, dst: Path, times: int) -> dict[str, Any]:
    """A feature cache holding `times` copies of the shards in `src` (hard links where the file system
    allows, else symbolic ones), sharing `src`'s stored soft targets (keyed by shard checksum)."""
    manifest = load_manifest(src, verify=False)
    dst.mkdir(parents=True, exist_ok=True)
    shards = []
    for r in range(times):
        for j, s in enumerate(manifest["shards"]):
            name = f"shard-{r * len(manifest['shards']) + j:05d}.safetensors"
            if not (dst / name).exists():
                try:
                    os.link(src / s["file"], dst / name)
                except OSError:
                    os.symlink((src / s["file"]).resolve(), dst / name)
            shards.append({**s, "file": name})
    (src / "soft_targets").mkdir(exist_ok=True)
    if not (dst / "soft_targets").exists():
        os.symlink((src / "soft_targets").resolve(), dst / "soft_targets")
    out = {**manifest, "shards": shards, "tokens": manifest["tokens"] * times,
           "sequences": manifest["sequences"] * times}
    io.write_json(dst / "manifest.json", out)
    return out


def run_config(cfg: Config, scale: int, sequences: int, drafter: str, ddp: bool, steps: int, root: Path) -> Config:
    """The experiment writing under `root/x<scale>`, with `drafter` trained `steps` steps (no wall budget),
    under DDP with 2 processes when `ddp`."""
    raw = cfg.model_dump(mode="json")
    raw["results_dir"] = str(root / f"x{scale}")
    raw["experiment"] = f"{cfg.experiment}-bench-memory"
    raw["tracking"]["uri"] = tracking.tracking_uri(cfg.results_dir, cfg.tracking.uri)
    tc = raw["drafters"][drafter]["train"]
    over: dict[str, Any] = {"wall_budget_s": None, "eval_every": steps, "save_every": steps}
    if ddp:
        over |= {"distributed": "ddp", "processes": 2, "grad_accum": 1,
                 "global_batch": 2 * tc["batch_sequences"]}
    tc = merge(tc, over)
    schedule = TrainConfig(**tc)
    per_epoch = schedule.steps_per_epoch(schedule.split_sizes(sequences * scale)[1])
    tc["epochs"] = (steps - 0.5) / per_epoch  # the schedule's ceil(epochs x steps per epoch) = steps
    raw["drafters"][drafter]["train"] = tc
    return validate(raw)


def bench_memory(cfg: Config, steps: int = 12, scales: tuple[int, ...] = SCALES, drafters: list[str] | None = None,
                 ddp_drafter: str | None = None, ddp: bool = True) -> dict[str, Any]:
    """Peak RSS of every (drafter, launcher) at every cache scale (DDP: `ddp_drafter`, by default the first
    drafter, unless not `ddp`); the table and plot under bench/."""
    src = features_dir(cfg)
    if not (src / "manifest.json").is_file():
        raise FeatureCacheError(f"{src}/manifest.json: no feature cache to scale; run the experiment's extract jobs "
                                f"first (snakemake --cores all extract)")
    names = drafters or cfg.drafters_in_use()
    unknown = [d for d in names if d not in cfg.drafters]
    if unknown or not names:
        raise ConfigError(f"config error: --drafters: {', '.join(unknown) or 'none'} not drafters of the experiment "
                          f"(drafters: {', '.join(cfg.drafters) or 'none'})")
    ddp_drafter = ddp_drafter or names[0]
    manifest = load_manifest(src)
    root = bench_dir(cfg) / "memory"
    runs = [(d, False) for d in names] + ([(ddp_drafter, True)] if ddp else [])
    plan = {(scale, d, under): run_config(cfg, scale, manifest["sequences"], d, under, steps, root)
            for scale in scales for d, under in runs}  # every config checked before any work
    done_file = root / "memory_runs.jsonl"
    done = {(r["scale"], r["drafter"], r["ddp"]): r for r in io.read_jsonl_prefix(done_file)
            if r.get("steps_asked") == steps}
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for (scale, name, under_ddp), run_cfg in tqdm(plan.items(), desc="bench memory", unit="run", dynamic_ncols=True):
        if (scale, name, under_ddp) in done:
            continue
        replicate_cache(src, features_dir(run_cfg), scale)
        shutil.rmtree(drafter_dir(run_cfg, name), ignore_errors=True)  # a fresh process, a fresh measure
        path = io.write_text(root / f"x{scale}-{name}{'-ddp' if under_ddp else ''}.yaml",
                             yaml.safe_dump(run_cfg.model_dump(mode="json"), sort_keys=False))
        log = logs / path.with_suffix(".log").name
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            code = subprocess.call([sys.executable, "-m", "deepspec.cli", "train", "--config", str(path),
                                    "--drafter", name], stdout=fh, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if code:
            raise RuntimeError(f"bench memory: training {name} at {scale}x failed (exit {code}); see {log}")
        metrics = json.loads((drafter_dir(run_cfg, name) / "metrics.json").read_text())
        row = {"scale": scale, "drafter": name, "kind": cfg.drafters[name].kind, "ddp": under_ddp, "steps_asked": steps,
               "steps": metrics["steps"], "cache_gib": scale * sum(s["bytes"] for s in manifest["shards"]) / 2**30,
               "tokens": scale * manifest["tokens"], "peak_rss_mb": metrics["peak_rss_mb"],
               "wall_s": time.perf_counter() - t0}
        done[(scale, name, under_ddp)] = row
        with open(done_file, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    rows = [done[key] for key in plan]
    result = {"steps": steps, "scales": list(scales), "rows": rows}
    with tracking.stage_run(cfg, "bench", "bench memory", bench="memory") as run:
        run.params({"steps": steps, "scales": list(scales), "drafters": names, "ddp_drafter": ddp_drafter,
                    "cache_tokens": manifest["tokens"]})
        table = format_memory(result)
        md = io.write_text(bench_dir(cfg) / "memory.md", table)
        io.write_json(bench_dir(cfg) / "memory.json", result)
        plot = memory_plot(cfg, rows, bench_dir(cfg) / "memory.png")
        for r in rows:
            run.metrics({f"peak_rss_mb.{r['drafter']}{'.ddp' if r['ddp'] else ''}": r["peak_rss_mb"]}, step=r["scale"])
        for p in (md, bench_dir(cfg) / "memory.json", plot):
            run.artifact(p, "bench")
    print(table)
    return result


def growth(rows: list[dict[str, Any]]) -> dict[tuple[str, bool], float]:
    """Per (drafter, ddp): peak RSS at the largest scale over that at the smallest, minus one."""
    out = {}
    for key in dict.fromkeys((r["drafter"], r["ddp"]) for r in rows):
        mine = sorted((r for r in rows if (r["drafter"], r["ddp"]) == key), key=lambda r: r["scale"])
        out[key] = mine[-1]["peak_rss_mb"] / mine[0]["peak_rss_mb"] - 1
    return out


def format_memory(result: dict[str, Any]) -> str:
    import pandas as pd

    rows, scales = result["rows"], result["scales"]
    gib = {r["scale"]: r["cache_gib"] for r in rows}
    table = []
    for (name, ddp), g in growth(rows).items():
        mine = {r["scale"]: r for r in rows if (r["drafter"], r["ddp"]) == (name, ddp)}
        first = mine[scales[0]]
        table.append({"drafter": name, "kind": first["kind"], "launcher": "ddp x2" if ddp else "one process",
                      **{f"{s}x ({_size(gib[s])})": f"{mine[s]['peak_rss_mb']:.0f}" for s in scales},
                      f"{scales[-1]}x vs {scales[0]}x": f"{100 * g:+.1f}%", "flat (within 10%)": "yes" if abs(g) <= 0.10 else "**NO**"})
    return (f"# Training memory against the feature cache's size\n\nPeak resident memory (MiB, the largest rank's) "
            f"of {result['steps']} training steps per run, each run a fresh process; the cache replicated "
            f"{', '.join(f'{s}x' for s in scales)} (hard links).\n\n"
            + pd.DataFrame(table).to_markdown(index=False, disable_numparse=True) + "\n\n![peak RSS](memory.png)\n")


def _size(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def memory_plot(cfg: Config, rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepspec.reporting.report import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for name, ddp in dict.fromkeys((r["drafter"], r["ddp"]) for r in rows):
        mine = sorted((r for r in rows if (r["drafter"], r["ddp"]) == (name, ddp)), key=lambda r: r["scale"])
        ax.plot([r["cache_gib"] for r in mine], [r["peak_rss_mb"] / 1024 for r in mine], marker="o", ms=3, lw=1,
                label=f"{name}{' (ddp x2)' if ddp else ''}")
    top = max(r["cache_gib"] for r in rows)
    ax.plot([0, top], [0, top], ":", color="grey", lw=1, label="the cache itself")
    ax.set_xlabel("feature cache (GiB)", fontsize=8)
    ax.set_ylabel("peak RSS (GiB)", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(f"{cfg.experiment}: training memory against cache size", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, cfg)
