"""`deepspec report`: tables (markdown, CSV, LaTeX), plots and report.md from the DAG's metrics files."""

from __future__ import annotations

import csv
import io as _io
import json
from pathlib import Path
from typing import Any

from deepspec import io, tracking
from deepspec.config import Config
from deepspec.evaluation.runner import eval_dir


def collect(cfg: Config) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    missing = []
    for method in cfg.methods:
        for task in cfg.tasks:
            path = eval_dir(cfg, method, task) / "metrics.json"
            if path.is_file():
                found[(method, task)] = json.loads(path.read_text())
            else:
                missing.append(str(path))
    if missing:
        raise FileNotFoundError(f"report needs {len(missing)} metrics file(s) that do not exist, e.g. {missing[0]}")
    return found


def _cell(m: dict[str, Any]) -> str:
    flag = "" if m["lossless"]["passed"] in (True, None) else " ✗"
    return f"{m['tau']:.2f} / {m['speedup']:.2f}×{flag}"


def _macro(metrics: dict, method: str, tasks: list[str], key: str) -> float:
    return sum(metrics[(method, t)][key] for t in tasks) / len(tasks)


def tables(cfg: Config, metrics: dict) -> dict[str, str]:
    methods, tasks = list(cfg.methods), list(cfg.tasks)
    head = ["method", *tasks, "mean"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows_csv = [["method", "task", "tau", "speedup", "tokens_per_s", "baseline_tokens_per_s", "lossless", "samples",
                 "new_tokens", "config_hash"]]
    tex = [r"\begin{tabular}{l" + "c" * (len(tasks) + 1) + "}", r"\toprule",
           "Method & " + " & ".join(t.replace("_", r"\_") for t in tasks) + r" & Mean \\", r"\midrule"]
    for method in methods:
        cells = [_cell(metrics[(method, t)]) for t in tasks]
        mean = f"{_macro(metrics, method, tasks, 'tau'):.2f} / {_macro(metrics, method, tasks, 'speedup'):.2f}×"
        md.append("| " + " | ".join([method, *cells, mean]) + " |")
        tex.append(method.replace("_", r"\_") + " & " + " & ".join(c.replace("×", r"$\times$") for c in [*cells, mean]) + r" \\")
        for t in tasks:
            m = metrics[(method, t)]
            rows_csv.append([method, t, f"{m['tau']:.4f}", f"{m['speedup']:.4f}", f"{m['tokens_per_s']:.3f}",
                             f"{m['baseline_tokens_per_s']:.3f}", m["lossless"]["passed"], m["samples"], m["new_tokens"],
                             m["config_hash"]])
    tex += [r"\bottomrule", r"\end{tabular}", f"% config hash {cfg.hash()}"]
    md.append(f"\nτ / speedup vs autoregressive; config hash `{cfg.hash()}`.")
    buf = _io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows_csv)
    split = ["| method | task | tokens/s | prefill | draft | verify | other | outside forwards | acceptance by depth |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        for t in tasks:
            m = metrics[(method, t)]
            s = m["time_split"]
            acc = ", ".join(f"{a:.2f}" for a in m["acceptance_by_depth"][:8]) or "–"
            split.append(f"| {method} | {t} | {m['tokens_per_s']:.1f} | {s['prefill']:.0%} | {s['draft']:.0%} | "
                         f"{s['verify']:.0%} | {s['other']:.0%} | {m.get('overhead_frac', 0.0):.0%} | {acc} |")
    return {"summary.md": "\n".join(md) + "\n", "summary.csv": buf.getvalue(), "summary.tex": "\n".join(tex) + "\n",
            "details.md": "\n".join(split) + "\n"}


def plots(cfg: Config, metrics: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, tasks = list(cfg.methods), list(cfg.tasks)
    paths = []
    for key, label, fname in (("speedup", "wall-clock speedup vs autoregressive (×)", "speedup.png"),
                              ("tau", "mean accepted length τ (tokens / target forward)", "tau.png")):
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks) * max(1, len(methods)) / 2, 3.6), dpi=120)
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            vals = [metrics[(method, t)][key] for t in tasks]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(tasks))]
            bars = ax.bar(xs, vals, width, label=method)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(f"{cfg.experiment}: {key} per task and method", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
        ax.margins(y=0.15)
        fig.tight_layout()
        path = out / fname
        tmp = path.with_name(f".{fname}.tmp.png")
        fig.text(0.99, 0.01, f"config {cfg.hash()}", ha="right", va="bottom", fontsize=6, color="grey")
        fig.savefig(tmp, metadata={"Description": f"deepspec {cfg.experiment} config {cfg.hash()}"})
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths


def build_report(cfg: Config) -> Path:
    with tracking.stage_run(cfg, "report", "report") as run:
        metrics = collect(cfg)
        out = cfg.out_dir
        (out / "tables").mkdir(parents=True, exist_ok=True)
        (out / "plots").mkdir(parents=True, exist_ok=True)
        tab = tables(cfg, metrics)
        written = [io.write_text(out / "tables" / name, text) for name, text in tab.items()]
        written += plots(cfg, metrics, out / "plots")
        any_m = next(iter(metrics.values()))
        hashes = sorted({m["config_hash"] for m in metrics.values()})
        lossless_bad = [f"{k[0]}/{k[1]}" for k, m in metrics.items() if m["lossless"]["passed"] is False]
        text = "\n".join([
            f"# DeepSpec report: `{cfg.experiment}`",
            "",
            f"Target `{cfg.target.model}` (weights {any_m['target_fingerprint']}), {cfg.target.dtype}, "
            f"temperature {cfg.eval.temperature}, up to {cfg.eval.max_new_tokens} new tokens per turn. "
            f"Config hash `{cfg.hash()}` (metrics from {', '.join(hashes)}).",
            "",
            "Cells: **τ / speedup**. τ is tokens committed per target forward (bonus token included, prefill "
            "counted); speedup is tokens/s against the autoregressive baseline measured in the same run, "
            "sample by sample.",
            "",
            tab["summary.md"],
            "Losslessness (greedy, token-identical to the baseline): "
            + ("all methods pass." if not lossless_bad else "**FAILED** for " + ", ".join(lossless_bad) + "."),
            "",
            "![speedup](plots/speedup.png)",
            "",
            "![tau](plots/tau.png)",
            "",
            "## Where the time goes",
            "",
            "Shares of wall time; *outside forwards* is time in neither a target forward nor the drafter "
            "(the engine's own overhead). Acceptance by depth is P(depth d accepted | depth d−1 accepted).",
            "",
            tab["details.md"],
        ])
        report = io.write_text(out / "report.md", text + "\n")
        for path in [*written, report]:
            run.artifact(path, "report")
        run.metrics({f"tau.{m}.{t}": v["tau"] for (m, t), v in metrics.items()}
                    | {f"speedup.{m}.{t}": v["speedup"] for (m, t), v in metrics.items()})
        print(f"[report] {report}\n" + tab["summary.md"])
    return report
