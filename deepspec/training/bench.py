"""`deepspec bench train`: training recipes for one drafter compared on a learning curve.

Every recipe overrides the base drafter's config section (`drafters.<name>`) and trains from the same
feature cache, so the data is held fixed and only the recipe changes. Per recipe it reports the
validation step-0 top-1 accuracy and teacher-forced chain τ against training wall time and tokens, and
the real decode τ of the finished drafter: the engine, lossless, on a fixed held-out prompt set (the
benchmark tasks, never seen in training), with tokens/s against our autoregressive decoding in the same
run. Recipes are read at equal wall time (the shortest recipe's training time) and at their end; with
`--probe-pace`, every wall budget is first pinned to a step count at a pace timed before training
(`pinned_budgets`), and read on that clock.
A recipe already trained with the same config resumes from (or reuses) its checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from deepspec import io, tracking
from deepspec.config import Config, ConfigError, merge, validate
from deepspec.config_base import TrainedMethod
from deepspec.layout import bench_dir, drafters_root


def load_recipes(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(recipe -> drafter overrides, recipe -> the recipe whose probed pace it trains at).

    A recipe's `paced_as: <recipe>` shares that recipe's step count under `--probe-pace`: for runs that
    differ only where the pace cannot (a seed, an option that adds no work), so probe noise does not give
    one of them more steps than the other (`pinned_budgets` refuses one with another batch shape)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config error: recipes file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError(f"config error: {path}: a mapping of recipe name -> drafter overrides is needed")
    recipes = {name: {k: v for k, v in over.items() if k != "paced_as"} for name, over in raw.items()}
    paced = {name: over["paced_as"] for name, over in raw.items() if "paced_as" in over}
    for name, other in paced.items():
        if other not in raw or "paced_as" in raw[other]:  # itself included: it is paced
            raise ConfigError(f"config error: {path}: recipe {name}: paced_as must name another recipe of the file "
                              f"that is paced by its own probes, not {other!r}")
    return recipes, paced


def recipe_config(cfg: Config, base: str, recipe: str, overrides: dict[str, Any], epochs: float | None) -> tuple[Config, str]:
    """The experiment config with one more drafter, `bench-<recipe>`: the base drafter with `overrides`."""
    raw = cfg.model_dump(mode="json")
    drafter = merge(raw["drafters"][base], overrides)
    if epochs is not None:
        drafter["train"]["epochs"] = epochs
    name = f"bench-{recipe}"
    raw["drafters"][name] = drafter
    try:
        return validate(raw), name
    except ConfigError as err:
        raise ConfigError(str(err).replace(f"drafters.{name}", f"recipe {recipe}")) from None


def pinned_budgets(configs: dict[Any, tuple[Config, str]], rebuild: Callable[[Any, dict[str, Any]], tuple[Config, str]],
                   rounds: int, paced_as: Callable[[Any], Any] = lambda key: key) -> dict[Any, tuple[float, float]]:
    """Every run of `configs` with a wall budget (`train.wall_budget_s`) timed in `rounds` interleaved probes,
    then re-configured by `rebuild(key, train overrides)` to a fixed step count: its budget over its lower
    median seconds per step (of two probes the faster: a neighbour only ever slows a probe down). The probes
    run minutes apart at most, so the machine's pace drifting over a long benchmark moves every run's clock
    alike instead of deciding which run gets a fast slot. Runs that differ only where the pace cannot (a
    seed) name one probed run in `paced_as` and share its step count. Returns, per pinned run, the probed
    seconds per step and its clock (budget / steps: the probed pace give or take the rounding to whole
    steps, so that the last step lands on the budget); `configs` is updated in place."""
    from deepspec.training.trainer import step_seconds

    if rounds < 1:
        raise ValueError(f"--probe-pace: {rounds} rounds; pinning budgets needs at least 1 probe round")
    timed = [k for k, (rcfg, name) in configs.items() if rcfg.drafters[name].train.wall_budget_s is not None]
    for key in timed:  # a shared pace is turned into epochs with the pacer's steps per epoch: they must agree
        mine, theirs = (_epoch_shape(*configs[k]) for k in (key, paced_as(key)))
        if mine != theirs:
            raise ConfigError(f"config error: {configs[key][1]}: paced as {configs[paced_as(key)][1]}, but its steps per "
                              f"epoch differ (batch_sequences, sequences per step, val_sequences, train_sequences: "
                              f"{mine} against {theirs}); give it the same batch and data or its own probes")
    probed = list(dict.fromkeys(paced_as(k) for k in timed))
    probes: dict[Any, list[float]] = {k: [] for k in probed}
    per_epoch: dict[Any, float] = {}
    for i in range(rounds):
        for key in probed:
            seconds, per_epoch[key] = step_seconds(*configs[key])
            probes[key].append(seconds)
            print(f"[bench] pace probe {i + 1}/{rounds}, {configs[key][1]}: {seconds:.3f} s/step")
    pinned = {}
    for key in timed:
        rcfg, name = configs[key]
        budget = rcfg.drafters[name].train.wall_budget_s
        pace = float(torch.tensor(probes[paced_as(key)]).median())  # torch: the lower median
        steps = max(1, round(budget / pace))
        epochs = (steps - 0.5) / per_epoch[paced_as(key)]  # the schedule's ceil(epochs x steps per epoch) = steps
        configs[key] = rebuild(key, {"train": {"wall_budget_s": None, "epochs": epochs}})
        pinned[key] = (pace, budget / steps)
        print(f"[bench] {name}: {steps} steps (its {budget:.0f} s budget at {pace:.3f} s/step)")
    return pinned


def _epoch_shape(cfg: Config, name: str) -> tuple[int, int, int, int | None]:
    """What a run's optimizer steps per epoch depend on besides the shared data."""
    tc = cfg.drafters[name].train
    return tc.batch_sequences, tc.sequences_per_step, tc.val_sequences, tc.train_sequences


def clocked(log: list[dict[str, Any]], pinned: tuple[float, float] | None) -> list[dict[str, Any]]:
    """A pinned run's log on its clock (step x its clock's seconds per step, from `pinned_budgets`; the
    measured time kept as `measured_wall_s`), so it is read and plotted at the pace its steps were sized for."""
    if pinned is None:
        return log
    return [{**r, "wall_s": r["step"] * pinned[1], "measured_wall_s": r["wall_s"]} for r in log]


def _at_wall(log: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """The last validation row reached within `wall` seconds of training."""
    rows = [r for r in log if "val_tau_chain" in r and r["wall_s"] <= wall + 1e-9]
    return rows[-1] if rows else {}


def decode_tau(drafter_cfg: Config, name: str, method, target, prompts: list[list[int]], max_new_tokens: int,
               ar: list[tuple[list[int], float]], temperature: float = 0.0, seed: int = 0, lookup=None) -> dict[str, Any]:
    """τ and tokens/s of the finished drafter `name` decoding with `method` through the engine (tokens/s
    against the autoregressive run `ar`), the share of decode time spent drafting, and, greedy, whether
    every output equals AR's (None when sampled: the χ² tests judge sampled losslessness). `lookup`: a
    prompt-lookup method tried first each round (a hybrid, the drafter where it finds no match)."""
    from deepspec.decoding.engine import Engine
    from deepspec.decoding.verify import Sampling
    from deepspec.drafters.build import build_proposer
    from deepspec.drafters.hybrid import HybridProposer

    engine = Engine(target.backend, target.loaded.eos_ids, Sampling(temperature))
    if hasattr(method, "drafter"):
        method = method.model_copy(update={"drafter": name})
    proposer = build_proposer(method, target, name, drafters_root(drafter_cfg), temperature, seed)
    if lookup is not None:
        proposer = HybridProposer([build_proposer(lookup), proposer])
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    tokens = forwards = 0
    wall = ar_wall = draft = 0.0
    same = True
    for prompt, (ar_tokens, ar_s) in zip(prompts, ar):
        t0 = time.perf_counter()
        gen = engine.generate(prompt, max_new_tokens, proposer, generator)
        wall += time.perf_counter() - t0
        ar_wall += ar_s
        draft += gen.draft_time
        tokens += len(gen.tokens)
        forwards += gen.forwards
        same &= gen.tokens == ar_tokens
    n_ar = sum(len(t) for t, _ in ar)
    return {"decode_tau": tokens / max(forwards, 1), "decode_speedup": (tokens / wall) / (n_ar / ar_wall),
            "draft_share": draft / wall, "lossless": same if temperature == 0 else None}


def autoregressive_runs(target, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], float]]:
    """Our autoregressive decoding of each prompt (after a warm-up): its tokens and wall seconds."""
    from deepspec.decoding.engine import Engine

    engine = Engine(target.backend, target.loaded.eos_ids)
    engine.generate(prompts[0][:32], 8)  # warm-up
    ar = []
    for prompt in prompts:
        t0 = time.perf_counter()
        ar.append((engine.generate(prompt, max_new_tokens).tokens, time.perf_counter() - t0))
    return ar


def pinned_fields(log: list[dict[str, Any]], pinned: tuple[float, float] | None) -> dict[str, Any]:
    """A run's row fields from its `clocked` log: wall time on its clock, the time its steps really took and
    the probed seconds per step (None when its budget was not pinned)."""
    last = log[-1]
    return {"wall_s": last["wall_s"], "measured_wall_s": last.get("measured_wall_s", last["wall_s"]),
            "probe_s_per_step": pinned[0] if pinned is not None else None}


def pinned_sentence(rounds: int, what: str) -> str:
    """The tables' sentence on pinned budgets (empty when nothing was pinned)."""
    if not rounds:
        return ""
    return (f" Each wall budget was pinned to a step count before training, at each {what}'s pace timed in {rounds} "
            f"interleaved probes, and the curves are read on that clock (`train s`): a drift of the machine's speed "
            f"during the run does not change how far a {what} trains.")


def default_drafter(cfg: Config) -> str | None:
    """The first drafter, in the config's own order, that some method decodes with (else the first one)."""
    in_use = cfg.drafters_in_use()
    return next((d for d in cfg.drafters if d in in_use), next(iter(cfg.drafters), None))


def bench_train(cfg: Config, recipes_path: str, drafter: str | None = None, epochs: float | None = None,
                n_prompts: int = 4, max_new_tokens: int = 64, threads: int | None = None,
                probe_rounds: int = 0, out_name: str | None = None) -> dict[str, Any]:
    """`probe_rounds` > 0 pins every wall budget to steps at a pace timed before training (`pinned_budgets`);
    `out_name` is the outputs' stem under bench/ (default: the recipes file's, less its `bench_` prefix)."""
    from deepspec.evaluation.bench import bench_prompts
    from deepspec.models import load_target
    from deepspec.training.trainer import train

    recipes, paced = load_recipes(recipes_path)
    base = drafter or default_drafter(cfg)
    if base not in cfg.drafters:
        raise ValueError(f"--drafter: no drafter named {base!r} (drafters: {', '.join(cfg.drafters) or 'none'})")
    method = next((m for m in cfg.methods.values() if isinstance(m, TrainedMethod) and m.drafter == base), None)
    if method is None:
        raise ValueError(f"bench train: no method decodes with drafter {base!r}, so decode τ has no settings")
    configs = {r: recipe_config(cfg, base, r, over, epochs) for r, over in recipes.items()}  # all validated up front
    torch.set_num_threads(threads or os.cpu_count() or 1)
    with tracking.stage_run(cfg, "bench", "bench train", bench="train") as run:
        run.params({"drafter": base, "recipes": list(recipes), "epochs": epochs, "prompts": n_prompts,
                    "max_new_tokens": max_new_tokens, "recipes_file": recipes_path})
        target = load_target(cfg.target.model, cfg.target.dtype, cfg.target.backend, cfg.target.max_len)
        prompts = bench_prompts(target.tokenizer, n_prompts, cfg.eval.seed, cfg.target.chat_template_kwargs)
        ar = autoregressive_runs(target, prompts, max_new_tokens)
        pinned = pinned_budgets(configs, lambda r, extra: recipe_config(cfg, base, r, merge(recipes[r], extra), None),
                                probe_rounds, lambda r: paced.get(r, r)) if probe_rounds else {}
        rows, logs = {}, {}
        for recipe, (rcfg, name) in configs.items():
            print(f"[bench train] recipe {recipe}: {recipes[recipe] or 'the base recipe'}")
            out = train(rcfg, name)
            logs[recipe] = clocked(io.read_jsonl(out / "train_log.jsonl"), pinned.get(recipe))
            summary = json.loads((out / "metrics.json").read_text())
            last = logs[recipe][-1]
            rows[recipe] = {"overrides": recipes[recipe], "steps": summary["steps"],
                            "train_sequences": summary.get("train_sequences"), "train_tokens": summary["train_tokens"],
                            "draft_vocab": summary["draft_vocab"], **pinned_fields(logs[recipe], pinned.get(recipe)),
                            "tokens_seen": last["train_tokens_seen"], "final_acc0": summary["val_acc"][0],
                            "final_tau_chain": summary["val_tau_chain"],
                            **decode_tau(rcfg, name, method, target, prompts, max_new_tokens, ar)}
        common = min(r["wall_s"] for r in rows.values())
        for recipe, row in rows.items():
            at = _at_wall(logs[recipe], common)
            row.update({"acc0_at_common": at.get("val_acc_0"), "tau_chain_at_common": at.get("val_tau_chain")})
        result = {"drafter": base, "common_wall_s": common, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
                  "probe_rounds": probe_rounds, "recipes": rows}
        out = bench_dir(cfg)
        stem = out_name or Path(recipes_path).stem.removeprefix("bench_")  # bench_train.yaml -> train.{md,json,png}
        text = format_table(result, f"{stem}.png")
        io.write_json(out / f"{stem}.json", result)
        io.write_text(out / f"{stem}.md", text)
        plot = learning_curves(cfg, logs, out / f"{stem}.png", f"{cfg.experiment}: drafter {base}")
        run.metrics({f"{r}.{k}": v for r, row in rows.items() for k, v in row.items() if isinstance(v, (int, float))})
        for path in (out / f"{stem}.md", out / f"{stem}.json", plot):
            run.artifact(path)
        print(text)
    return result


def format_table(result: dict[str, Any], plot_name: str = "train.png") -> str:
    import pandas as pd

    t, pinned = result["common_wall_s"], result.get("probe_rounds", 0)
    df = pd.DataFrame([{
        "recipe": r, "overrides": yaml.safe_dump(row["overrides"], default_flow_style=True, width=10_000).strip() if row["overrides"] else "–",
        "steps": row["steps"], "train seqs": row.get("train_sequences") or "–", "train s": f"{row['wall_s']:.0f}",
        **({"probed s/step": _fmt(row["probe_s_per_step"]), "measured train s": f"{row['measured_wall_s']:.0f}"}
           if pinned else {}),
        f"val acc₀ @ {t:.0f} s": _fmt(row["acc0_at_common"]), f"chain τ @ {t:.0f} s": _fmt(row["tau_chain_at_common"]),
        "final val acc₀": _fmt(row["final_acc0"]), "final chain τ": _fmt(row["final_tau_chain"]),
        "decode τ": f"{row['decode_tau']:.2f}", "decode vs AR": f"{row['decode_speedup']:.2f}×",
        "lossless": "yes" if row["lossless"] else "**NO**"} for r, row in result["recipes"].items()])
    return (f"# Training recipes for drafter `{result['drafter']}`\n\nSame feature cache for every recipe."
            f"{pinned_sentence(pinned, 'recipe')} Validation "
            f"metrics are teacher-forced on the held-out split, read at equal training wall time ({t:.0f} s, the "
            f"shortest recipe) and at each recipe's end; decode τ and speed come from the engine on "
            f"{result['prompts']} benchmark prompts ({result['max_new_tokens']} new tokens), against our "
            f"autoregressive decoding in the same run.\n\n" + df.to_markdown(index=False, disable_numparse=True)
            + f"\n\n![learning curves]({plot_name})\n")


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def learning_curves(cfg: Config, logs: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deepspec.reporting.report import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=120)
    for recipe, log in logs.items():
        val = [r for r in log if "val_tau_chain" in r]
        axes[0].plot([r["wall_s"] for r in val], [r["val_acc_0"] for r in val], marker="o", ms=2, label=recipe)
        axes[1].plot([r["wall_s"] for r in val], [r["val_tau_chain"] for r in val], marker="o", ms=2, label=recipe)
        axes[2].plot([r["train_tokens_seen"] / 1e3 for r in val], [r["val_tau_chain"] for r in val], marker="o", ms=2,
                     label=recipe)
    for ax, (ylabel, xlabel) in zip(axes, [("validation step-0 top-1 accuracy", "training wall time (s)"),
                                           ("validation chain τ (teacher-forced)", "training wall time (s)"),
                                           ("validation chain τ (teacher-forced)", "training tokens seen (thousands)")]):
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, cfg)
