"""The report's deployed section: methods run again in serving engines (`engines:`), from deploy's metrics files.

Two tables and one plot: per method × engine × task, τ from the engine's own counters beside ours on the same
chain and definition, the speedup against the same engine's autoregressive run, losslessness and agreement
with our engine; then throughput and speedup per number of requests in flight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from deepspec.config import Config
from deepspec.layout import deployed_dir, engine_record

Deployed = dict[tuple[str, str, str], dict[str, Any]]


def collect_deployed(cfg: Config) -> Deployed:
    found, missing = {}, []
    for engine, run in cfg.engines.items():
        for method in run.methods:
            for task in cfg.tasks:
                path = deployed_dir(cfg, engine, method, task) / "metrics.json"
                if path.is_file():
                    found[(engine, method, task)] = json.loads(path.read_text())
                else:
                    missing.append(str(path))
    if missing:
        raise FileNotFoundError(f"report needs {len(missing)} deployed metrics file(s) that do not exist, e.g. {missing[0]}")
    return found


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def deployed_tables(deployed: Deployed) -> dict[str, pd.DataFrame]:
    """`summary`: a row per (method, engine, task); `sweep`: a row per (method, engine, task, requests)."""
    rows, sweep = [], []
    for (engine, method, task), m in deployed.items():
        div = m["cross_engine"]["first_divergence"]
        rows.append({
            "method": method, "engine": f"{engine} {m['engine_version']}", "task": task,
            "τ (engine)": _num(m["tau"], ".2f"), "τ (ours, same chain)": _num(m["ours_tau"], ".2f"),
            "Δτ": "–" if m.get("tau_rel_diff") is None else f"{100 * m['tau_rel_diff']:.1f}%",
            "speedup vs its AR": f"{m['speedup']:.2f}×",
            "tok/s (AR)": f"{m['tokens_per_s']:.1f} ({m['baseline_tokens_per_s']:.1f})",
            "= its AR": {True: "yes", False: f"no ({m['lossless']['mismatches']} turns)", None: "n/a"}[m["lossless"]["passed"]],
            "AR = our AR": f"{m['cross_engine']['identical_samples']}/{m['cross_engine']['samples']}"
                           + ("" if div is None else f" (first at turn {div['turn']}, token {div['at']}"
                              + ("" if div.get("logit_gap") is None else f", logit gap {div['logit_gap']:.3f}") + ")"),
        })
        for r in m["concurrency"]:
            sweep.append({"method": method, "engine": engine, "task": task, "requests": r["requests"],
                          "tokens_per_s": r["tokens_per_s"], "baseline_tokens_per_s": r["baseline_tokens_per_s"],
                          "speedup": r["speedup"], "identical": r["identical"]})
    return {"summary": pd.DataFrame(rows), "sweep": pd.DataFrame(sweep)}


def sweep_markdown(sweep: pd.DataFrame) -> str:
    """Speedup (method tok/s / AR tok/s) per requests in flight, one column per level."""
    wide = sweep.assign(cell=[f"{s:.2f}× ({t:.0f} / {b:.0f})" + ("" if same else " ≠")
                              for s, t, b, same in zip(sweep["speedup"], sweep["tokens_per_s"],
                                                       sweep["baseline_tokens_per_s"], sweep["identical"])])
    table = wide.pivot_table(index=["method", "engine", "task"], columns="requests", values="cell", aggfunc="first",
                             sort=False)
    table.columns = [f"{c} in flight" for c in table.columns]
    return table.reset_index().to_markdown(index=False)


def deployed_figure(cfg: Config, deployed: Deployed):
    """Throughput against requests in flight (AR dashed, each method solid) and the speedup, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(cfg.tasks)
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.6 * len(tasks), 5.6), dpi=120, squeeze=False)
    for j, task in enumerate(tasks):
        top, bottom = axes[0][j], axes[1][j]
        ar_drawn = set()
        for (engine, method, t), m in deployed.items():
            if t != task:
                continue
            levels = [r["requests"] for r in m["concurrency"]]
            if engine not in ar_drawn:
                top.plot(levels, [r["baseline_tokens_per_s"] for r in m["concurrency"]], "k--", marker="o", ms=3,
                         label=f"{engine} autoregressive")
                ar_drawn.add(engine)
            top.plot(levels, [r["tokens_per_s"] for r in m["concurrency"]], marker="o", ms=3, label=f"{engine} {method}")
            bottom.plot(levels, [r["speedup"] for r in m["concurrency"]], marker="o", ms=3, label=f"{engine} {method}")
        top.set_title(task, fontsize=9)
        bottom.axhline(1.0, color="grey", lw=0.8, ls="--")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        bottom.set_xlabel("requests in flight", fontsize=8)
    axes[0][0].set_ylabel("output tokens/s (all requests)", fontsize=8)
    axes[1][0].set_ylabel("speedup vs the engine's own AR", fontsize=8)
    axes[0][-1].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def deployed_section(cfg: Config, deployed: Deployed, plot: Path) -> list[str]:
    tabs = deployed_tables(deployed)
    engines = []
    for engine in cfg.engines:
        rec_path = engine_record(cfg, engine)
        rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
        versions = ", ".join(f"{k} {v}" for k, v in rec.get("versions", {}).items())
        threads = sorted({m["threads"] for (e, _, _), m in deployed.items() if e == engine})
        engines.append(f"{engine} ({versions or 'versions not recorded'}; {', '.join(map(str, threads))} threads, "
                       f"the same as our engine's)")
    return [
        "## Deployed: the same methods in a serving engine",
        "",
        f"Engines: {'; '.join(engines)}. Each row is one job: the engine's own autoregressive run, then the method "
        "in the same engine (trained drafters exported to its layout; trees drafted as the chain of their depth), "
        "then our engine on the same conversations. τ is the engine's mean accepted length from its spec-decode "
        "counters (1 + accepted drafts per drafting round: the bonus token counted, the prefill not); *τ (ours, same "
        "chain)* is our engine's on that definition. *= its AR*: greedy outputs token-identical to the engine's own "
        "autoregressive ones. *AR = our AR*: samples where the engine's autoregressive output equals ours.",
        "",
        tabs["summary"].to_markdown(index=False),
        "",
        "Speedup per number of requests in flight (method / autoregressive output tokens per second over the same "
        "first-turn prompts, submitted in groups of that size; ≠: outputs differ from the same engine's one-at-a-time "
        "outputs):",
        "",
        sweep_markdown(tabs["sweep"]),
        "",
        f"![deployed](plots/{plot.name})",
        "",
    ]
