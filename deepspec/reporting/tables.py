"""The report's tables as pandas DataFrames, written as Markdown, CSV and LaTeX by pandas.

One long frame (a row per method × task, every number with its spread) is the source of all of them:
the wide summary a person reads, the CSV a script reads, and the timing details.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from deepspec.config import Config

Metrics = dict[tuple[str, str], dict[str, Any]]


def spread_of(m: dict[str, Any]) -> dict[str, Any]:
    """The metrics' spread; metrics written before spreads were recorded give point intervals."""
    s = m.get("spread") or {}
    per = s.get("speedup_per_sample") or {}
    return {
        "tau_lo": (s.get("tau_ci95") or [m["tau"]] * 2)[0], "tau_hi": (s.get("tau_ci95") or [m["tau"]] * 2)[1],
        "speedup_lo": (s.get("speedup_ci95") or [m["speedup"]] * 2)[0],
        "speedup_hi": (s.get("speedup_ci95") or [m["speedup"]] * 2)[1],
        "speedup_min": per.get("min", math.nan), "speedup_median": per.get("median", math.nan),
        "speedup_max": per.get("max", math.nan),
    }


def long_frame(cfg: Config, metrics: Metrics) -> pd.DataFrame:
    """One row per (method, task) in config order."""
    rows = []
    for method in cfg.methods:
        for task in cfg.tasks:
            m = metrics[(method, task)]
            rows.append({"method": method, "task": task, "tau": m["tau"], **spread_of(m), "speedup": m["speedup"],
                         "tokens_per_s": m["tokens_per_s"], "baseline_tokens_per_s": m["baseline_tokens_per_s"],
                         "lossless": m["lossless"]["passed"], "samples": m["samples"], "new_tokens": m["new_tokens"],
                         "config_hash": m["config_hash"]})
    df = pd.DataFrame(rows)
    return df.set_index(["method", "task"]).reindex(pd.MultiIndex.from_product([list(cfg.methods), list(cfg.tasks)],
                                                                               names=["method", "task"]))


def fmt_interval(value: float, lo: float, hi: float, suffix: str = "") -> str:
    if math.isclose(lo, hi) and math.isclose(lo, value):
        return f"{value:.2f}{suffix}"
    return f"{value:.2f}{suffix} ({lo:.2f}–{hi:.2f})"


def _cell(row: pd.Series) -> str:
    flag = "" if row["lossless"] in (True, None) else " ✗"
    return (f"{fmt_interval(row['tau'], row['tau_lo'], row['tau_hi'])} / "
            f"{fmt_interval(row['speedup'], row['speedup_lo'], row['speedup_hi'], '×')}{flag}")


def _macro(df: pd.DataFrame, method: str, key: str) -> tuple[float, float, float]:
    """Macro mean over tasks with an interval whose half-width combines the tasks' as independent errors."""
    sub = df.loc[method]
    mean = float(sub[key].mean())
    half = math.sqrt(float((((sub[f"{key}_hi"] - sub[f"{key}_lo"]) / 2) ** 2).sum())) / len(sub)
    return mean, mean - half, mean + half


def summary_frame(cfg: Config, df: pd.DataFrame) -> pd.DataFrame:
    """Methods × tasks (+ macro mean), each cell 'τ (95% interval) / speedup (95% interval)'."""
    wide: dict[str, dict[str, str]] = {}
    for method in cfg.methods:
        row = {task: _cell(df.loc[(method, task)]) for task in cfg.tasks}
        tau, speed = _macro(df, method, "tau"), _macro(df, method, "speedup")
        row["mean"] = f"{fmt_interval(*tau)} / {fmt_interval(*speed, '×')}"
        wide[method] = row
    out = pd.DataFrame.from_dict(wide, orient="index")
    out.index.name = "method"
    return out


def details_frame(cfg: Config, df: pd.DataFrame, metrics: Metrics) -> pd.DataFrame:
    """Where the time goes, the paired baseline's throughput and the per-sample speedup range."""
    rows = []
    for method in cfg.methods:
        for task in cfg.tasks:
            m, r = metrics[(method, task)], df.loc[(method, task)]
            s = m["time_split"]
            per = "–" if math.isnan(r["speedup_min"]) else (
                f"{r['speedup_min']:.2f} / {r['speedup_median']:.2f} / {r['speedup_max']:.2f}")
            rows.append({"method": method, "task": task, "tokens/s": f"{m['tokens_per_s']:.1f}",
                         "baseline tokens/s": f"{m['baseline_tokens_per_s']:.1f}",
                         "speedup per sample (min / median / max)": per,
                         "prefill": f"{s['prefill']:.0%}", "draft": f"{s['draft']:.0%}", "verify": f"{s['verify']:.0%}",
                         "other": f"{s['other']:.0%}", "outside forwards": f"{m.get('overhead_frac', 0.0):.0%}",
                         "acceptance by depth": ", ".join(f"{a:.2f}" for a in m["acceptance_by_depth"][:8]) or "–"})
    return pd.DataFrame(rows)


def head_to_head_frame(cfg: Config, rows: dict[tuple[str, str, str], dict[str, dict[str, Any] | None]]) -> pd.DataFrame:
    """One row per (method, rival, how it was timed), per task: 'ratio (95% interval), faster on k of n samples'."""
    out = []
    for (method, rival, timed), results in rows.items():
        row = {"method": method, "rival": rival, "timed in": timed}
        for task in cfg.tasks:
            r = results.get(task)
            row[task] = "–" if r is None else (f"{fmt_interval(r['ratio'], *r['ci95'], '×')}, faster on "
                                               f"{r['faster']} of {r['samples']}")
        out.append(row)
    return pd.DataFrame(out)


def _csv(df: pd.DataFrame) -> str:
    return df.to_csv(float_format="%.4f", lineterminator="\n")


def tables(cfg: Config, metrics: Metrics) -> dict[str, str]:
    """Every table file of the report, by name."""
    df = long_frame(cfg, metrics)
    summary = summary_frame(cfg, df)
    note = (f"\nτ / speedup vs autoregressive, each with its 95% bootstrap interval over samples; mean: macro "
            f"average over tasks. Config hash `{cfg.hash()}`.")
    tex = summary.rename(index=lambda s: s.replace("_", r"\_"), columns=lambda s: s.replace("_", r"\_"))
    tex = tex.map(lambda c: c.replace("×", r"$\times$").replace("–", "--"))
    return {
        "summary.md": summary.to_markdown(disable_numparse=True) + "\n" + note + "\n",
        "summary.csv": _csv(df),
        "summary.tex": tex.to_latex() + f"% config hash {cfg.hash()}\n",
        "details.md": details_frame(cfg, df, metrics).to_markdown(index=False, disable_numparse=True) + "\n",
    }
