"""This run against the committed reference, cell by cell, with one verdict; and `deepspec reference`,
which makes a finished run the new reference.

The reference lives apart from the DAG's outputs (`results/reference/<experiment>/`), so a fresh clone's
`snakemake --cores all` recomputes everything and the report says whether it reproduced. τ comes from
deterministic decoding: methods without a trained drafter match exactly, and a trained drafter's τ
drifts only as far as its training does (MKL on CPU is not bit-reproducible from run to run), so a cell
matches within the relative `reproduce.tau_tolerance`. A method that cuts its drafts where this machine's
measured costs say they stop paying (`length: cost` or `calibrated`, or a hybrid of one) verifies more nodes
where verifying is cheaper, so its τ moves with the machine: its cell is judged by its drafters' validation
chain τ, within the same tolerance, and its own τ is shown beside. A wall-clock speedup is noisy, so it
matches when its 95% interval overlaps the reference's.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from deepspec import io
from deepspec.config import Config
from deepspec.layout import drafter_dir
from deepspec.reporting.tables import Metrics, fmt_interval, spread_of

# What a reference holds: small, human-readable results, never records or weights; and of each of the config's
# drafters (benches train theirs in the same folder), its metrics and curve.
REFERENCE_FILES = ("report.md", "tables/*", "plots/*.png", "eval/*/*/metrics.json", "deployed/*/*/*/metrics.json",
                   "engines/*.json")
DRAFTER_FILES = ("metrics.json", "train_log.jsonl")


@dataclass
class Reproduction:
    verdict: str  # one line a person reads first
    table: pd.DataFrame | None  # per cell; None without a reference
    notes: list[str]
    passed: bool | None  # None: nothing to compare

    def markdown(self) -> str:
        lines = ["## Reproduction", "", f"**{self.verdict}**", ""]
        lines += [f"- {n}" for n in self.notes]
        if self.table is not None:
            lines += ["", self.table.to_markdown(index=False)]
        return "\n".join(lines) + "\n"


def load_reference(directory: Path) -> Metrics:
    found = {}
    for path in sorted(directory.glob("eval/*/*/metrics.json")):
        found[(path.parent.parent.name, path.parent.name)] = json.loads(path.read_text())
    return found


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def compare(cfg: Config, metrics: Metrics, reference: Metrics | None = None) -> Reproduction:
    """Compare this run's metrics with the reference's (read from `cfg.reference_dir` unless given)."""
    ref_dir = cfg.reference_dir
    if reference is None:
        if not ref_dir.is_dir():
            return Reproduction(f"No reference for experiment '{cfg.experiment}' ({ref_dir} does not exist): nothing "
                                "to compare. `deepspec reference` makes this run the reference.", None, [], None)
        reference = load_reference(ref_dir)
    tol = cfg.reproduce.tau_tolerance
    rows, notes, drift = [], [], []  # drift: notes on cells off by τ, with their drafters' validation τ
    taus = _validation_taus(cfg, ref_dir)
    by_drafter = _drafter_checks(cfg, taus, tol)
    for (method, task), m in metrics.items():
        r = reference.get((method, task))
        if r is None:
            notes.append(f"{method}/{task}: not in the reference (new cell)")
            continue
        ms, rs = spread_of(m), spread_of(r)
        d_tau = m["tau"] - r["tau"]
        acc_run, acc_ref = m.get("acceptance_by_depth", []), r.get("acceptance_by_depth", [])
        d_acc = max((abs(a - b) for a, b in zip(acc_run, acc_ref)), default=0.0)
        if len(acc_run) != len(acc_ref):
            d_acc = max(d_acc, 1.0)  # a depth reached in one run only: acceptance did not reproduce
        speed_ok = _overlap((ms["speedup_lo"], ms["speedup_hi"]), (rs["speedup_lo"], rs["speedup_hi"]))
        judged = by_drafter.get(method)
        tau_ok = _within(m["tau"], r["tau"], tol) if judged is None else judged[1]
        if judged is None and not tau_ok:
            drift.append(_drafter_note(cfg, method, task, d_tau / r["tau"], taus))
        rows.append({"method": method, "task": task, "τ reference": round(r["tau"], 4), "τ this run": round(m["tau"], 4),
                     "Δτ": round(d_tau, 4), "max Δ acceptance": round(d_acc, 4),
                     "τ judged by": "τ" if judged is None else judged[0],
                     "τ match": tau_ok, "τ identical": d_tau == 0,
                     "speedup reference": fmt_interval(r["speedup"], rs["speedup_lo"], rs["speedup_hi"], "×"),
                     "speedup this run": fmt_interval(m["speedup"], ms["speedup_lo"], ms["speedup_hi"], "×"),
                     "speedup within spread": speed_ok,
                     "lossless": m["lossless"]["passed"] in (True, None)})
    missing = sorted(set(reference) - set(metrics))
    if missing:
        notes.append("in the reference but not in this run: " + ", ".join(f"{a}/{b}" for a, b in missing))
    ref_hashes = sorted({r["config_hash"] for r in reference.values()})
    run_hashes = sorted({m["config_hash"] for m in metrics.values()})
    if ref_hashes != run_hashes:
        notes.append(f"config differs: reference {', '.join(ref_hashes)}, this run {', '.join(run_hashes)} "
                     "(τ need not match when the config changed)")
    else:
        notes.append(f"same config as the reference ({', '.join(run_hashes)})")
    timed = sorted({row["method"] for row in rows if row["τ judged by"] != "τ"})
    if timed:
        notes.append(f"{', '.join(timed)}: drafts cut on this machine's measured costs, so τ moves with the machine; "
                     f"judged by their drafters' validation chain τ (within {tol:.0%}), their own τ shown")
    table = pd.DataFrame(rows)
    if table.empty:
        return Reproduction("No cell of this run is in the reference: nothing to compare.", table, notes, None)
    speed_bad, lossy = (_failing(table, col) for col in ("speedup within spread", "lossless"))
    tau_bad = [f"{m}/{t}" + ("" if by == "τ" else f" ({by})")
               for m, t, by, ok in zip(table["method"], table["task"], table["τ judged by"], table["τ match"]) if not ok]
    notes += [n for n in drift if n]
    by_tau = table["τ judged by"] == "τ"
    n, same, by_drafter = len(table), int((table["τ identical"] & by_tau).sum()), int((~by_tau).sum())
    if same < n - by_drafter:
        within = f"{same} identical, the rest within {tol:.0%}"
    else:
        within = f"{same} identical" if by_drafter else "all identical"
    if by_drafter:
        within += f"; {by_drafter} judged by their drafters' validation τ"
    if tau_bad or lossy:
        verdict = "NOT REPRODUCED: " + "; ".join(
            ([f"τ differs by more than {tol:.0%} in {', '.join(tau_bad)}"] if tau_bad else [])
            + ([f"lossless check failed in {', '.join(lossy)}"] if lossy else []))
        passed = False
    elif speed_bad:
        verdict = f"τ REPRODUCED in all {n} cells ({within}); speedup outside the reference's spread in {', '.join(speed_bad)}"
        passed = True
    else:
        verdict = f"REPRODUCED: τ matches in all {n} cells ({within}) and every speedup lies within its spread"
        passed = True
    notes.insert(0, f"reference: {ref_dir}; τ matches within {tol:.0%} of the reference's (exactly, for methods "
                    "without a trained drafter); speedups match when their 95% intervals overlap")
    return Reproduction(verdict, table, notes, passed)


def _within(value: float, reference: float, tol: float) -> bool:
    """`value` within the relative tolerance `tol` of `reference`."""
    return abs(value - reference) <= tol * abs(reference) + 1e-12


def _validation_taus(cfg: Config, ref_dir: Path) -> dict[str, tuple[float, float]]:
    """Per drafter some method decodes with: (this run's, the reference's) validation chain τ, where both sides
    recorded one."""
    taus = {}
    for d in cfg.drafters_in_use():
        run, ref = drafter_dir(cfg, d) / "metrics.json", ref_dir / "drafters" / d / "metrics.json"
        if run.is_file() and ref.is_file():
            run_tau, ref_tau = (json.loads(p.read_text()).get("val_tau_chain") for p in (run, ref))
            if run_tau is not None and ref_tau is not None:
                taus[d] = (run_tau, ref_tau)
    return taus


def _drafter_checks(cfg: Config, taus: dict[str, tuple[float, float]], tol: float) -> dict[str, tuple[str, bool]]:
    """Per method whose drafts are cut on this machine's costs, with drafters trained here: ("drafter validation τ",
    whether every one of them is within `tol` of the reference's). Methods whose drafters lack either side's
    validation τ are left out (judged by τ)."""
    methods = {m: cfg.method_drafters(m) for m in cfg.methods if cfg.method_cuts_on_costs(m)}
    return {m: ("drafter validation τ", all(_within(*taus[d], tol) for d in names))
            for m, names in methods.items() if names and all(d in taus for d in names)}


def _drafter_note(cfg: Config, method: str, task: str, d_rel: float, taus: dict[str, tuple[float, float]]) -> str | None:
    """For a cell whose τ is off: its drafters' validation chain τ beside the reference's, which says whether the
    drafter itself learned differently (a retrained drafter drifts) or only its decoded τ on the task moved."""
    names = cfg.method_drafters(method) if method in cfg.methods else []
    if not names or not all(d in taus for d in names):
        return None
    parts = [f"{d} {taus[d][0]:.3f} against {taus[d][1]:.3f} ({taus[d][0] / taus[d][1] - 1:+.1%})" for d in names]
    return f"{method}/{task}: τ {d_rel:+.1%} against the reference; its drafters' validation chain τ: {', '.join(parts)}"


def _failing(table: pd.DataFrame, column: str) -> list[str]:
    """'method/task' of the cells where a boolean column is False."""
    return [f"{m}/{t}" for m, t, ok in zip(table["method"], table["task"], table[column]) if not ok]


def promote(cfg: Config) -> Path:
    """`deepspec reference`: copy this run's small results over the experiment's reference folder.

    The DAG's outputs are replaced; the committed benchmark results (`bench/`) are kept as they are. A bench's
    tables are committed by copying them there: they come from runs of their own, some renamed or re-read, and
    a run folder also holds every bench ever run in it, so promoting a run for its DAG must neither drop nor
    overwrite them."""
    src = cfg.out_dir
    if not (src / "report.md").is_file():
        raise FileNotFoundError(f"{src / 'report.md'}: no finished run to promote; run the DAG first")
    dst = cfg.reference_dir
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    copied = 0
    drafter_files = tuple(f"drafters/{name}/{file}" for name in cfg.drafters for file in DRAFTER_FILES)
    for pattern in REFERENCE_FILES + drafter_files:
        for path in sorted(src.glob(pattern)):
            if path.is_file() and not path.name.startswith("."):
                _copy(path, tmp / path.relative_to(src))
                copied += 1
    kept = [path for path in sorted((dst / "bench").rglob("*")) if path.is_file()]
    for path in kept:
        _copy(path, tmp / path.relative_to(dst))
    io.replace_dir(tmp, dst)
    print(f"[reference] {copied} files from {src} are now the reference in {dst}; its {len(kept)} committed "
          f"benchmark files (bench/) kept as they were")
    return dst


def _copy(path: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, target)
