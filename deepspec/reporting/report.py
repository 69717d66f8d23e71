"""`deepspec report`: tables (markdown, CSV, LaTeX), plots and report.md from the DAG's metrics files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepspec import io, tracking
from deepspec.config import Config
from deepspec.drafters.registry import KINDS
from deepspec.layout import drafter_dir, eval_dir, plots_dir, report_file, tables_dir, train_data_file
from deepspec.reporting.reproduce import compare
from deepspec.reporting.tables import head_to_head_frame, long_frame, tables


def lossless_line(metrics: dict, failed: list[str]) -> str:
    """The report's losslessness sentence, naming the rule the cells were judged by: exact, or the near-tie
    rule (a GPU or reduced precision) with its margin and the largest logit gap at a divergence."""
    near = [m["lossless"] for m in metrics.values() if m["lossless"].get("rule") == "near_tie"]
    if near:
        margin = max(x.get("tie_margin", 0.0) for x in near)
        gap = max(x.get("max_logit_gap", 0.0) for x in near)
        diverged = sum(x.get("diverged_samples", 0) for x in near)
        rule = (f"Losslessness (greedy, near-tie rule: output may leave the baseline's only where the two tokens' "
                f"logits differ by at most {margin:g}; {diverged} samples diverge, largest gap {gap:.3f}): ")
    else:
        rule = "Losslessness (greedy, token-identical to the baseline): "
    return rule + ("all methods pass." if not failed else "**FAILED** for " + ", ".join(failed) + ".")


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


def head_to_head_section(cfg: Config, metrics: dict) -> tuple[list[str], str | None]:
    """Every method that decodes with a drafter against the fastest one that needs none (prompt lookup,
    suffix decoding, a draft LM), sample by sample: the question a trained drafter has to answer. Beside
    each, the head-to-head timed within one job for methods that ran a rival (`eval.rivals`)."""
    from deepspec.evaluation.metrics import head_to_head

    baseline = cfg.baseline_method()
    drafted = [m for m in cfg.methods if cfg.method_drafters(m) or cfg.method_checkpoints(m)]
    free = [m for m in cfg.methods if m != baseline and m not in drafted]
    same_job = cfg.eval.rivals
    if not (drafted and free) and not same_job:
        return [], None
    rival = max(free, key=lambda m: sum(metrics[(m, t)]["speedup"] for t in cfg.tasks)) if free else None

    def records(method: str, task: str) -> list[dict[str, Any]]:
        return io.read_jsonl(eval_dir(cfg, method, task) / "records.jsonl")

    theirs = {t: records(rival, t) for t in cfg.tasks} if rival and drafted else {}
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for m in cfg.methods:  # config order; a method's row timed in separate jobs first, then its own job's
        if theirs and m in drafted:
            rows[(m, rival, "separate jobs")] = {t: head_to_head(records(m, t), theirs[t]) for t in cfg.tasks}
        if m in same_job:
            rows[(m, same_job[m], "same job")] = {t: metrics[(m, t)].get("rival") for t in cfg.tasks}
    table = head_to_head_frame(cfg, rows).to_markdown(index=False, disable_numparse=True)
    text = ["## Against the fastest method without a drafter"]
    if theirs:
        text += ["", f"Each method's speedup divided by `{rival}`'s on the same samples (each against the baseline "
                     f"of its own job), with a 95% bootstrap interval that draws the same samples for both: above 1 it "
                     f"is the faster. Their intervals against the baseline in the table above overlap long before "
                     f"this one includes 1, because both move with the same hard and easy samples."]
    if same_job:
        text += ["", "Rows timed in the *same job*: the method's evaluate job ran its rival on every sample too, in "
                     "turn with it and the baseline (`eval.rivals`), and the ratio is of their tokens/s there, free "
                     "of the drift between two jobs."]
    return [*text, "", table, ""], table


def plots(cfg: Config, metrics: dict, out: Path) -> list[Path]:
    """Speedup and τ per task and method, each bar with its 95% bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, tasks = list(cfg.methods), list(cfg.tasks)
    df = long_frame(cfg, metrics)
    paths = []
    for key, label, fname in (("speedup", "wall-clock speedup vs autoregressive (×)", "speedup.png"),
                              ("tau", "mean accepted length τ (tokens / target forward)", "tau.png")):
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks) * max(1, len(methods)) / 2, 3.6), dpi=120)
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            rows = df.loc[method].loc[tasks]
            vals = rows[key].to_numpy()
            err = [vals - rows[f"{key}_lo"].to_numpy(), rows[f"{key}_hi"].to_numpy() - vals]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(tasks))]
            ax.bar(xs, vals, width, label=method, yerr=err, capsize=2, error_kw={"lw": 0.8})
            for x, v, top in zip(xs, vals, rows[f"{key}_hi"].to_numpy()):  # the value above its interval
                ax.annotate(f"{v:.2f}", (x, max(v, top)), xytext=(0, 2), textcoords="offset points", ha="center",
                            fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(f"{cfg.experiment}: {key} per task and method (bars: 95% bootstrap interval over samples)",
                     fontsize=9)
        ax.legend(fontsize=7, frameon=False)
        ax.margins(y=0.15)
        fig.tight_layout()
        paths.append(save_figure(fig, out / fname, cfg))
    return paths


def save_figure(fig, path: Path, cfg: Config) -> Path:
    """Stamp the config hash, write under a temp name, rename."""
    import matplotlib.pyplot as plt

    fig.text(0.99, 0.01, f"config {cfg.hash()}", ha="right", va="bottom", fontsize=6, color="grey")
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, metadata={"Description": f"deepspec {cfg.experiment} config {cfg.hash()}"})
    plt.close(fig)
    tmp.replace(path)
    return path


def acceptance_plot(cfg: Config, metrics: dict, out: Path) -> Path | None:
    """P(depth d accepted | d-1 accepted) per drafting method, one panel per task."""
    import matplotlib.pyplot as plt

    methods = [m for m in cfg.methods if any(metrics[(m, t)]["acceptance_by_depth"] for t in cfg.tasks)]
    if not methods:
        return None
    tasks = list(cfg.tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.4 * len(tasks), 3.2), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in methods:
            acc = metrics[(method, task)]["acceptance_by_depth"]
            ax.plot(range(1, len(acc) + 1), acc, marker="o", ms=3, label=method)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("draft depth", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("P(accepted | parent accepted)", fontsize=8)
    axes[0][-1].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return save_figure(fig, out / "acceptance_by_depth.png", cfg)


def training_plot(cfg: Config, name: str, log: list[dict[str, Any]], out: Path) -> Path:
    """Loss and top-1 accuracy per training-time-test step, and the validation chain τ against tokens seen."""
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    ttt = sum(1 for k in log[0] if k.startswith("acc_"))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=120)
    axes[0].plot(steps, [r["loss"] for r in log], lw=0.8, label="train")
    val = [r for r in log if "val_loss" in r]
    axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", ms=3, label="validation")
    axes[0].set_title("training loss", fontsize=9)
    axes[0].legend(fontsize=7, frameon=False)
    for k in range(ttt):
        axes[1].plot([r["step"] for r in val], [r[f"val_acc_{k}"] for r in val], lw=1, label=f"step {k}")
    axes[1].set_title("validation top-1 accuracy per draft step", fontsize=9)
    axes[1].legend(fontsize=6, frameon=False, ncol=2)
    axes[2].plot([r["train_tokens_seen"] / 1e3 for r in val], [r["val_tau_chain"] for r in val], marker="o", ms=3)
    axes[2].set_title(f"validation chain τ (depth {ttt}) vs training tokens", fontsize=9)
    axes[2].set_xlabel("training tokens seen (thousands)", fontsize=8)
    for ax in axes[:2]:
        ax.set_xlabel("optimizer step", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"drafter {name}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out / f"training_{name}.png", cfg)


def calibration_plot(cfg: Config, name: str, calibration: dict[str, Any], out: Path) -> Path:
    """Reliability diagrams of a DSpark confidence head on held-out blocks, one per acceptance rule: raw,
    temperature only, and the map kept per draft."""
    import matplotlib.pyplot as plt

    rules = list(calibration)
    fig, axes = plt.subplots(1, len(rules), figsize=(3.8 * len(rules), 3.6), dpi=120, squeeze=False)
    for ax, rule in zip(axes[0], rules):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for key, label, marker in (("before", "raw", "o"), ("temperature_only", "temperature", "^"),
                                   ("after", "kept per draft", "s")):
            r = calibration[rule]["pooled"].get(key)
            if r:
                bins = r["bins"]
                ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker=marker, ms=3,
                        label=f"{label}: ECE {r['ece']:.3f}")
        ax.set_xlabel("predicted P(accepted | earlier drafts accepted)", fontsize=8)
        ax.set_ylabel("observed acceptance", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
        ax.set_title(f"{name}: {rule} acceptance (held-out)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out / f"calibration_{name}.png", cfg)


def _maps(cal: dict[str, Any]) -> str:
    """The kept map per draft, short: `1` identity, `T 0.86` temperature, `T 0.78 b 1.12` with a bias."""
    parts = []
    for m, t, b in zip(cal["map"], cal["temperature"], cal["bias"]):
        parts.append("1" if m == "identity" else f"T {t:.2f}" + (f" b {b:+.2f}" if m == "temperature_and_bias" else ""))
    return "[" + ", ".join(parts) + "]"


def _calibration_lines(cfg: Config, name: str, cal: dict[str, Any]) -> list[str]:
    """One line per acceptance rule: held-out ECE / Brier raw, with a temperature, with the map kept per draft."""
    used = "sampled" if cfg.eval.temperature > 0 else "greedy"
    lines = ["Confidence head, calibrated per draft on half the validation split and judged on the other half. "
             "ECE and Brier read raw → sequential temperature scaling → the map kept (identity, temperature, or "
             "temperature and bias, chosen per draft by cross-validation on the fit half):", ""]
    for rule, c in cal.items():
        p = c["pooled"]
        before, temp, after = p["before"], p["temperature_only"], p["after"]
        auroc = f"{before['auroc']:.3f}" if before.get("auroc") is not None else "n/a"
        lines.append(f"- {rule} acceptance{' (this run decodes with it)' if rule == used else ''}, "
                     f"{before['n']} events: ECE {before['ece']:.3f} → {temp['ece']:.3f} → {after['ece']:.3f}, "
                     f"Brier {before['brier']:.3f} → {temp['brier']:.3f} → {after['brier']:.3f}, AUROC {auroc}; "
                     f"kept {_maps(c)}")
    return lines + ["", f"![calibration {name}](plots/calibration_{name}.png)", ""]


def _data_line(cfg: Config, summary: dict) -> str:
    """What the drafter learned from, counted honestly: who wrote the tokens and which positions were scored."""
    meta_path = train_data_file(cfg).with_suffix(".meta.json")
    if not meta_path.is_file() or "supervised_positions" not in summary:
        return ""
    m = json.loads(meta_path.read_text())
    target_written = m.get("target_written_tokens", m["assistant_tokens"])
    dataset = m.get("dataset_answer_tokens", 0)
    prompt = m["tokens"] - target_written - dataset
    how = ("every position (the target's distribution is the label in prompts too)" if summary["supervise"] == "all"
           else "only positions before an answer token")
    return (f"Training data: {m['conversations']} conversations, {m['tokens']} tokens: {target_written} written by the "
            f"target, {dataset} dataset answers kept as they are, {prompt} prompt and template tokens (training and "
            f"validation splits together). Supervised: {how}, {summary['supervised_positions']} positions of the "
            f"training split, {summary['assistant_positions']} of them before an answer token.")


def _training_section(cfg: Config) -> tuple[list[str], list[Path]]:
    lines, paths = [], []
    for name in cfg.drafters_in_use():
        folder = drafter_dir(cfg, name)
        log_path, summary_path = folder / "train_log.jsonl", folder / "metrics.json"
        if not (log_path.is_file() and summary_path.is_file()):
            continue
        log, summary = io.read_jsonl(log_path), json.loads(summary_path.read_text())
        paths.append(training_plot(cfg, name, log, plots_dir(cfg)))
        acc = ", ".join(f"{a:.2f}" for a in summary["val_acc"] if a is not None)
        lines += [f"### Drafter `{name}` ({summary.get('algorithm', 'eagle3')})", "", _data_line(cfg, summary), "",
                  f"{summary['steps']} steps over {summary['train_tokens']} training tokens; fused target layers "
                  f"{summary['layers']} (HF hidden_states indices); draft vocabulary {summary['draft_vocab']} tokens "
                  f"covering {100 * summary['vocab_coverage']:.1f}% of supervised argmaxes. Validation: chain τ "
                  f"{summary['val_tau_chain']:.2f} (teacher-forced, depth {len(summary['val_acc'])}), top-1 accuracy "
                  f"by {KINDS[summary['algorithm']].step_label} [{acc}]."
                  + (f" Peak resident memory {summary['peak_rss_mb']:,.0f} MiB" if "peak_rss_mb" in summary else "")
                  + (f", peak GPU memory {summary['peak_device_mb']:,.0f} MiB" if "peak_device_mb" in summary else "")
                  + ("." if "peak_rss_mb" in summary else ""), "",
                  f"![training {name}](plots/training_{name}.png)", ""]
        cal_path = folder / "calibration.json"
        if cal_path.is_file():
            cal = json.loads(cal_path.read_text())
            paths.append(calibration_plot(cfg, name, cal, plots_dir(cfg)))
            lines += _calibration_lines(cfg, name, cal)
    return lines, paths


def build_report(cfg: Config) -> Path:
    with tracking.stage_run(cfg, "report", "report") as run:
        metrics = collect(cfg)
        tables_out, plots_out = tables_dir(cfg), plots_dir(cfg)
        tables_out.mkdir(parents=True, exist_ok=True)
        plots_out.mkdir(parents=True, exist_ok=True)
        tab = tables(cfg, metrics)
        written = [io.write_text(tables_out / name, text) for name, text in tab.items()]
        written += plots(cfg, metrics, plots_out)
        accept = acceptance_plot(cfg, metrics, plots_out)
        written += [accept] if accept else []
        h2h_lines, h2h_table = head_to_head_section(cfg, metrics)
        if h2h_table is not None:
            written.append(io.write_text(tables_out / "head_to_head.md", h2h_table + "\n"))
        train_lines, train_plots = _training_section(cfg)
        written += train_plots
        deployed_lines, deployed_cells = [], {}
        if cfg.engines:
            from deepspec.reporting.deployed import collect_deployed, deployed_figure, deployed_section, deployed_tables

            deployed = collect_deployed(cfg)
            dplot = save_figure(deployed_figure(cfg, deployed), plots_out / "deployed.png", cfg)
            written.append(dplot)
            dtabs = deployed_tables(deployed)
            written += [io.write_text(tables_out / "deployed.csv", dtabs["summary"].to_csv(index=False)),
                        io.write_text(tables_out / "deployed_sweep.csv", dtabs["sweep"].to_csv(index=False))]
            deployed_lines = deployed_section(cfg, deployed, dplot)
            deployed_cells = {f"deployed.{k}.{e}.{m}.{t}": v[k] for (e, m, t), v in deployed.items()
                              for k in ("tau", "ours_tau", "speedup") if v[k] is not None}
        repro = compare(cfg, metrics)
        if repro.table is not None:
            written.append(io.write_text(tables_out / "reproduction.csv", repro.table.to_csv(index=False)))
        else:
            (tables_out / "reproduction.csv").unlink(missing_ok=True)  # no stale comparison left behind
        written.append(io.write_text(tables_out / "reproduction.md", repro.markdown()))
        written.append(io.write_json(tables_out / "reproduction.json", {
            "verdict": repro.verdict, "passed": repro.passed, "reference": str(cfg.reference_dir),
            "tau_tolerance": cfg.reproduce.tau_tolerance}))
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
            lossless_line(metrics, lossless_bad),
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
            *(["![acceptance by depth](plots/acceptance_by_depth.png)", ""] if accept else []),
            *h2h_lines,
            *deployed_lines,
            *(["## Drafter training", "", *train_lines] if train_lines else []),
            repro.markdown(),
        ])
        report = io.write_text(report_file(cfg), text + "\n")
        for path in [*written, report]:
            run.artifact(path, "report")
        cells = ({f"tau.{m}.{t}": v["tau"] for (m, t), v in metrics.items()}
                 | {f"speedup.{m}.{t}": v["speedup"] for (m, t), v in metrics.items()})
        if repro.passed is not None:
            cells["reproduced"] = float(repro.passed)
        run.metrics(cells | deployed_cells)
        run.tags({"reproduction": repro.verdict[:5000]})
        # The pipeline's parent run carries the summary, so MLflow's compare view lines up whole
        # experiments (and their methods) side by side.
        parent = run.parent()
        if parent is not None:
            parent.metrics(cells)
            parent.table(long_frame(cfg, metrics).reset_index(), "summary_table.json")
            parent.artifact(tables_out / "summary.md")
            parent.tags({"reproduction": repro.verdict[:5000]})
        print(f"[report] {report}\n" + tab["summary.md"] + "\n" + repro.verdict)
        print(f"[report] runs in MLflow: `mlflow ui --backend-store-uri {run.tracker.uri} --host 127.0.0.1`, "
              f"then {run.tracker.runs_url()}")
    return report
