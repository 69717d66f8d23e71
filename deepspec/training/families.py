"""`deepspec bench families`: the race between drafter families, each fed and timed the same way.

The bench file names the families (drafters of the experiment that some method decodes with, in the
paper's order, best first), the seeds, the decode shapes (the chain every family decodes, and each
family's best tree, as overrides of the method that decodes with it), overrides common to every
drafter (the validation split, so every family is judged on the same sequences) and one or more
budgets: per family, overrides of its drafter section, e.g. equal training wall time (`train.wall_budget_s`:
every schedule sized to end at the same second, learning rate annealed; with `--probe-pace`, pinned to each
family's steps at a pace timed before any training, shared by its seeds) or DeepSpec's "same data" (every
answer position an anchor, 2 epochs). Every
family and seed trains from the same feature cache, so the training split (a function of the seed)
and the supervised region are shared. Each finished drafter then decodes the same held-out benchmark
prompts through the engine in the shared chain, greedy and sampled at T = 1, and in its family's best
tree, greedy; speedups are against our autoregressive
decoding in the same run; and it is scored teacher-forced on the prompts' own greedy answers, which tells
a drafter that decodes worse than it validates (the benchmark text is not its training distribution) from
an engine that decodes worse than training taught. Reported per budget and family, as mean and range over
seeds: validation chain τ against wall time and tokens seen, chain τ on the prompts' answers, decoded τ and
speedup, and whether the paper's order holds for every seed.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch
import yaml

from deepspec import io, tracking
from deepspec.config import Config, ConfigError, NgramMethod, merge, validate
from deepspec.layout import bench_dir
from deepspec.training.bench import (autoregressive_runs, clocked, decode_tau, pinned_budgets, pinned_fields,
                                     pinned_sentence, recipe_config)

SHAPES = ("chain_t0", "chain_t1", "tree_t0")
LOOKUP_SHAPES = ("hybrid_t0", "lookup_t0")  # with a `lookup` method: it first, the family's tree where it finds nothing
SHAPE_NAMES = {"chain_t0": "chain, T = 0", "chain_t1": "chain, T = 1", "tree_t0": "best tree, T = 0",
               "hybrid_t0": "lookup + tree, T = 0", "lookup_t0": "lookup alone, T = 0"}


def load_bench(path: str | Path, cfg: Config) -> dict[str, Any]:
    """The bench file, checked against the experiment: every family decodes through one of its methods."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config error: bench file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    for key in ("seeds", "order", "chains", "trees", "budgets"):
        if key not in raw:
            raise ConfigError(f"config error: {path}: missing '{key}'")
    families = list(raw["order"])
    for family in families:
        if family not in cfg.drafters:
            raise ConfigError(f"config error: {path}: order: no drafter named {family!r} in the experiment "
                              f"(drafters: {', '.join(cfg.drafters)})")
        if chain_method(cfg, family) is None:
            raise ConfigError(f"config error: {path}: no method of the experiment decodes with drafter {family!r}")
        for shape in ("chains", "trees"):
            if family not in (raw[shape] or {}):
                raise ConfigError(f"config error: {path}: {shape}: nothing for {family!r}")
    for budget, per in raw["budgets"].items():
        missing = [f for f in families if f not in (per or {})]
        if missing:
            raise ConfigError(f"config error: {path}: budgets.{budget}: no overrides for {', '.join(missing)}")
    if not raw["seeds"]:
        raise ConfigError(f"config error: {path}: seeds: at least one seed")
    lookup = raw.get("lookup")
    if lookup is not None and (lookup not in cfg.methods or not isinstance(cfg.methods[lookup], NgramMethod)):
        raise ConfigError(f"config error: {path}: lookup: {lookup!r} is not a prompt-lookup (ngram) method of the experiment")
    return raw


def chain_method(cfg: Config, family: str):
    return next((m for m in cfg.methods.values() if getattr(m, "drafter", None) == family), None)


def shape_method(cfg: Config, family: str, overrides: dict[str, Any], where: str):
    """The method that decodes with `family`, with a decode shape's overrides, validated like any method."""
    raw = cfg.model_dump(mode="json")
    name = f"bench-{family}"
    raw["methods"][name] = {**chain_method(cfg, family).model_dump(mode="json"), **(overrides or {})}
    try:
        return validate(raw).methods[name]
    except ConfigError as err:
        raise ConfigError(str(err).replace(f"methods.{name}", where)) from None


def bench_families(cfg: Config, bench_path: str, budgets: list[str] | None = None, n_prompts: int = 8,
                   max_new_tokens: int = 64, threads: int | None = None, probe_rounds: int = 0,
                   out_name: str | None = None) -> dict[str, Any]:
    """The race of the bench file's families under each of `budgets` (default: all); `out_name` is the outputs'
    stem under bench/ (default: families, or families_threadsN)."""
    from deepspec.evaluation.bench import bench_prompts
    from deepspec.features.extract import feature_layers
    from deepspec.models import load_target
    from deepspec.training.teacher_forced import answer_sequences, score_answers
    from deepspec.training.trainer import train

    bench = load_bench(bench_path, cfg)
    budgets = budgets or list(bench["budgets"])
    unknown = [b for b in budgets if b not in bench["budgets"]]
    if unknown:
        raise ConfigError(f"config error: --budget: {', '.join(unknown)} not in {bench_path} "
                          f"(budgets: {', '.join(bench['budgets'])})")
    families, seeds = list(bench["order"]), [int(s) for s in bench["seeds"]]
    lookup = cfg.methods[bench["lookup"]] if bench.get("lookup") else None
    shapes = SHAPES + (LOOKUP_SHAPES if lookup is not None else ())
    methods = {(f, shape): shape_method(cfg, f, bench[shape][f], f"{shape}.{f}") for f in families
               for shape in ("chains", "trees")}
    runs, overrides = {}, {}  # every drafter config validated before any work starts
    for budget in budgets:
        for family in families:
            for seed in seeds:
                key = (budget, family, seed)
                overrides[key] = merge(merge(bench.get("common") or {}, bench["budgets"][budget][family] or {}),
                                       {"train": {"seed": seed}})
                runs[key] = recipe_config(cfg, family, f"{budget}-{family}-s{seed}", overrides[key], None)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    with tracking.stage_run(cfg, "bench", "bench families", bench="families") as run:
        run.params({"families": families, "seeds": seeds, "budgets": budgets, "prompts": n_prompts,
                    "max_new_tokens": max_new_tokens, "bench_file": bench_path})
        target = load_target(cfg.target.model, cfg.target.dtype, cfg.target.backend, cfg.target.max_len)
        prompts = bench_prompts(target.tokenizer, n_prompts, cfg.eval.seed, cfg.target.chat_template_kwargs)
        pinned = pinned_budgets(runs, lambda k, extra: recipe_config(cfg, k[1], f"{k[0]}-{k[1]}-s{k[2]}",
                                                                     merge(overrides[k], extra), None),
                                probe_rounds, lambda k: (k[0], k[1], seeds[0])) if probe_rounds else {}
        rows: dict[str, dict[str, Any]] = {}
        logs: dict[str, list[dict[str, Any]]] = {}
        answers: tuple[list, list, list[int]] | None = None  # the prompts' greedy answers, captured once
        for run_key, (rcfg, name) in runs.items():
            budget, family, seed = run_key
            print(f"[bench families] {budget}: {family}, seed {seed}")
            out = train(rcfg, name)
            torch.set_num_threads(threads or os.cpu_count() or 1)  # training set its own
            log = clocked(io.read_jsonl(out / "train_log.jsonl"), pinned.get(run_key))
            summary = json.loads((out / "metrics.json").read_text())
            ar = autoregressive_runs(target, prompts, max_new_tokens)  # next to each drafter: machine drift hits both
            runs_of = {"chain_t0": (methods[family, "chains"], 0.0, None), "chain_t1": (methods[family, "chains"], 1.0, None),
                       "tree_t0": (methods[family, "trees"], 0.0, None), "hybrid_t0": (methods[family, "trees"], 0.0, lookup),
                       "lookup_t0": (lookup, 0.0, None)}
            decoded = {shape: decode_tau(rcfg, name, runs_of[shape][0], target, prompts, max_new_tokens, ar,
                                         runs_of[shape][1], seed, runs_of[shape][2]) for shape in shapes}
            if answers is None:
                layers = feature_layers(cfg, target.loaded.model.config.num_hidden_layers)
                answers = (*answer_sequences(target, prompts, [tokens for tokens, _ in ar], layers), layers)
            on_answers = score_answers(rcfg, name, target.loaded.model, *answers)
            key = f"{budget}/{family}/{seed}"
            logs[key] = log
            rows[key] = {"budget": budget, "family": family, "seed": seed, "steps": summary["steps"],
                         **pinned_fields(log, pinned.get(run_key)), "tokens_seen": log[-1]["train_tokens_seen"],
                         "val_tau_chain": summary["val_tau_chain"], "val_acc0": summary["val_acc"][0],
                         "answers_tau_chain": on_answers["tau_chain"], "answers_acc0": on_answers["acc"][0],
                         **{f"{shape}.{k}": v for shape, d in decoded.items() for k, v in d.items()}}
        result = {"families": families, "seeds": seeds, "budgets": budgets, "prompts": len(prompts), "shapes": list(shapes),
                  "probe_rounds": probe_rounds,
                  "max_new_tokens": max_new_tokens, "runs": rows, "summary": summarise(rows, families, budgets, shapes),
                  "order": order_holds(rows, families, budgets, seeds)}
        out = bench_dir(cfg)
        stem = out_name or ("families" if threads is None else f"families_threads{threads}")
        result["threads"] = torch.get_num_threads()
        text = format_families(result, f"{stem}.png")
        io.write_json(out / f"{stem}.json", result)
        io.write_text(out / f"{stem}.md", text)
        plot = families_plot(cfg, logs, families, out / f"{stem}.png")
        run.metrics({f"{b}.{f}.{k}": v["mean"] for b, per in result["summary"].items() for f, ks in per.items()
                     for k, v in ks.items() if isinstance(v, dict)})
        for path in (out / f"{stem}.md", out / f"{stem}.json", plot):
            run.artifact(path)
        print(text)
    return result


def summarise(rows: dict[str, dict[str, Any]], families: list[str], budgets: list[str], shapes) -> dict[str, Any]:
    """Per budget and family: mean, min and max over seeds of each metric; lossless over every greedy run."""
    metrics = ("val_tau_chain", "answers_tau_chain", "wall_s", "tokens_seen",
               *(f"{s}.{k}" for s in shapes for k in ("decode_tau", "decode_speedup", "draft_share")))
    out: dict[str, Any] = {}
    for budget in budgets:
        for family in families:
            runs = [r for r in rows.values() if r["budget"] == budget and r["family"] == family]
            cell: dict[str, Any] = {m: {"mean": statistics.fmean(r[m] for r in runs), "min": min(r[m] for r in runs),
                                        "max": max(r[m] for r in runs)} for m in metrics}
            cell["lossless"] = all(r[f"{s}.lossless"] for r in runs for s in shapes if not s.endswith("_t1"))
            out.setdefault(budget, {})[family] = cell
    return out


def order_holds(rows: dict[str, dict[str, Any]], families: list[str], budgets: list[str], seeds: list[int]) -> dict[str, Any]:
    """Whether `families` (the paper's order, best first) is non-increasing in validation and decoded τ,
    for every seed, per budget."""
    out: dict[str, Any] = {}
    for budget in budgets:
        for metric in ("val_tau_chain", "answers_tau_chain", "chain_t0.decode_tau", "chain_t1.decode_tau"):
            per_seed = [[rows[f"{budget}/{f}/{s}"][metric] for f in families] for s in seeds]
            out.setdefault(budget, {})[metric] = all(all(a >= b for a, b in zip(v, v[1:])) for v in per_seed)
    return out


def _cell(stat: dict[str, float], fmt: str = "{:.3f}", suffix: str = "") -> str:
    if stat["min"] == stat["max"]:
        return fmt.format(stat["mean"]) + suffix
    return f"{fmt.format(stat['mean'])}{suffix} ({fmt.format(stat['min'])}–{fmt.format(stat['max'])})"


def format_families(result: dict[str, Any], plot_name: str = "families.png") -> str:
    import pandas as pd

    order = " ≥ ".join(result["families"])
    lines = [f"# Drafter families under one budget\n\nSame feature cache, training split and supervised region for "
             f"every family; {len(result['seeds'])} seeds ({', '.join(map(str, result['seeds']))}); each cell is the "
             f"mean over seeds with the range in brackets. Validation τ is teacher-forced (chain) on the held-out split, "
             f"and again on the benchmark prompts' own greedy answers (every answer position an anchor): where the "
             f"two differ, the benchmark text is not the training distribution; "
             f"decoded τ and speed come from the engine on {result['prompts']} benchmark prompts "
             f"({result['max_new_tokens']} new tokens, {result['threads']} threads), against our autoregressive "
             f"decoding in the same run.{pinned_sentence(result.get('probe_rounds', 0), 'family')}\n"]
    shapes = result["shapes"]
    for budget in result["budgets"]:
        training, decoding = [], []
        for family in result["families"]:
            c = result["summary"][budget][family]
            training.append({"family": family, "train s": _cell(c["wall_s"], "{:.0f}"),
                             "tokens seen (k)": _cell({k: v / 1e3 for k, v in c["tokens_seen"].items()}, "{:.0f}"),
                             "val chain τ": _cell(c["val_tau_chain"]),
                             "chain τ on the prompts' answers": _cell(c["answers_tau_chain"]),
                             "lossless (every greedy run)": "yes" if c["lossless"] else "**NO**"})
            for s in shapes:
                decoding.append({"family": family, "decode": SHAPE_NAMES[s], "τ": _cell(c[f"{s}.decode_tau"], "{:.2f}"),
                                 "speedup": _cell(c[f"{s}.decode_speedup"], "{:.2f}", "×"),
                                 "drafting share": _cell(c[f"{s}.draft_share"], "{:.2f}")})
        holds = result["order"][budget]
        names = {"val_tau_chain": "validation τ", "answers_tau_chain": "τ on the prompts' answers"}
        verdict = "; ".join(f"{names.get(m, m.replace('.decode_tau', ' decoded τ'))}: "
                            f"{'holds' if ok else 'does not hold'}" for m, ok in holds.items())
        lines.append(f"## Budget `{budget}`\n\n" + pd.DataFrame(training).to_markdown(index=False, disable_numparse=True)
                     + "\n\n" + pd.DataFrame(decoding).to_markdown(index=False, disable_numparse=True)
                     + f"\n\nOrder {order}, for every seed: {verdict}.\n")
    lines.append(f"![validation τ against training wall time and tokens]({plot_name})\n")
    return "\n".join(lines)


def families_plot(cfg: Config, logs: dict[str, list[dict[str, Any]]], families: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepspec.reporting.report import save_figure

    colours = dict(zip(families, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    budgets = list(dict.fromkeys(k.split("/")[0] for k in logs))
    styles = dict(zip(budgets, ["-", "--", ":", "-."]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    labelled = set()
    for key, log in logs.items():
        budget, family, _ = key.split("/")
        val = [r for r in log if "val_tau_chain" in r]
        label = None if (budget, family) in labelled else f"{family} ({budget})"
        labelled.add((budget, family))
        for ax, x in zip(axes, ([r["wall_s"] for r in val], [r["train_tokens_seen"] / 1e3 for r in val])):
            ax.plot(x, [r["val_tau_chain"] for r in val], styles[budget], color=colours[family], marker="o", ms=2,
                    lw=1, label=label)
    for ax, xlabel in zip(axes, ("training wall time (s)", "training tokens seen (thousands)")):
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("validation chain τ (teacher-forced)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle(f"{cfg.experiment}: drafter families, one line per seed", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, cfg)
