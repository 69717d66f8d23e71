"""`deepspec deploy`: a method of this config decoded again in a serving engine users deploy (vLLM's CPU build),
beside that engine's own autoregressive run in the same job, on the same task prompts and chat template.

Per job, in order:
1. vLLM autoregressive, then vLLM with the method's proposer (our drafter in vLLM's layout), each over every
   conversation at one request at a time (later turns see that run's own earlier answers), then a sweep of
   the first-turn prompts at each concurrency level (requests submitted together, `engines.vllm.concurrency`);
2. our engine, autoregressive and with the method as vLLM runs it (trees as the chain of their depth), on
   the same conversations.

Recorded: both engines' outputs and token ids; vLLM's τ from its own spec-decode counters and ours on the
same definition (1 + accepted drafts per drafting round: the bonus token counted, the prefill not); tokens/s
and time per output token against vLLM's own autoregressive run; greedy outputs against vLLM's own
autoregressive outputs (token for token) and against our engine's (the first divergence, weighed by the
target's logits, where they differ). The two vLLM runs are separate engines and cannot interleave sample by
sample as `evaluate` does, so the speedup carries whatever the machine did between them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from deepspec import io, tracking
from deepspec.config import Config, node_hash
from deepspec.config_base import TrainedMethod
from deepspec.decoding.engine import Engine
from deepspec.drafters.build import build_proposer
from deepspec.engines.env import require
from deepspec.engines.vllm_runner import VllmSession, acceptance_by_position, add_counters, tau
from deepspec.evaluation.lossless import EXACT, divergence
from deepspec.evaluation.metrics import drafted_depths
from deepspec.evaluation.runner import run_conversation, sampling_of, task_samples, turn_prompt
from deepspec.layout import deployed_dir, drafters_root, export_dir, log_file


def chain_method(method):
    """The method as vLLM runs it (`TrainedMethod.as_chain`: a tree as the chain of its depth, a block method
    drafting its whole block); untrained methods run as they are."""
    return method.as_chain() if isinstance(method, TrainedMethod) else method


def rounds_tau(turns: list[dict]) -> float | None:
    """Our τ on vLLM's definition: 1 + accepted drafts per round that drafted (prefill and empty rounds out)."""
    drafted = drafted_depths(turns)
    return 1 + sum(drafted) / len(drafted) if drafted else None


def _conversations(session, tok, samples: list[dict], max_new: int, stop: list[int], kwargs: dict, label: str,
                   temperature: float, seed: int):
    """Every sample's turns through one vLLM engine, one request at a time: (turn records per sample, counters)."""
    out, counters = [], {}
    for sample in tqdm(samples, desc=label, unit="sample", dynamic_ncols=True):
        turns: list[dict] = []
        for i in range(len(sample["turns"])):
            prompt = turn_prompt(tok, sample["turns"], [t["text"] for t in turns], i, kwargs)
            r = session.generate([prompt], max_new, stop_token_ids=stop, ignore_eos=True, temperature=temperature,
                                 seed=seed)
            ids = r["token_ids"][0]
            turns.append({"token_ids": ids, "text": tok.decode(ids, skip_special_tokens=True),
                          "new_tokens": len(ids), "wall_time": r["wall_time"]})
            counters = add_counters(counters, r["counters"])
        out.append(turns)
    return out, counters


def _sweep(session, convs: list[list[dict]], prompts: list[list[int]], levels: list[int], max_new: int,
           stop: list[int], temperature: float, seed: int) -> list[dict]:
    """Throughput with `c` requests in flight: the prompts in groups of `c`, each group submitted together.
    One in flight is what the conversations' first turns already measured on the same prompts."""
    rows = []
    for c in levels:
        if c == 1:
            first = [turns[0] for turns in convs[:len(prompts)]]
            outputs, wall = [t["token_ids"] for t in first], sum(t["wall_time"] for t in first)
        else:
            outputs, wall = [], 0.0
            for i in range(0, len(prompts), c):
                r = session.generate(prompts[i:i + c], max_new, stop_token_ids=stop, ignore_eos=True,
                                     temperature=temperature, seed=seed)
                outputs += r["token_ids"]
                wall += r["wall_time"]
        rows.append({"requests": c, "tokens": sum(len(o) for o in outputs), "wall_time": wall, "outputs": outputs})
    return rows


def deploy(cfg: Config, engine: str, method: str, task: str, threads: int | None = None) -> dict[str, Any]:
    from deepspec.models import load_target
    from deepspec.models.loading import resolve

    if engine not in cfg.engines:
        raise ValueError(f"--engine {engine}: not under `engines` in the config (engines: {', '.join(cfg.engines) or 'none'})")
    run_cfg = cfg.engines[engine]
    if method not in run_cfg.methods:
        raise ValueError(f"--method {method}: not in engines.{engine}.methods ({', '.join(run_cfg.methods)})")
    data_path, samples = task_samples(cfg, task)
    export = None
    for drafter in cfg.engine_exports(engine, method):
        export = export_dir(cfg, drafter, engine)
        if not (export / "config.json").is_file():
            raise FileNotFoundError(f"{export}/config.json: drafter {drafter!r} not exported; run "
                                    f"`deepspec export --drafter {drafter} --to {engine}` first")
    m = cfg.methods[method]
    if export is None and getattr(m, "checkpoint", None):
        export = m.checkpoint  # a published checkpoint, in a layout the engine loads
    spec = cfg.engine_spec(engine, method, export)
    env = require(engine)  # a missing engine is one line, before any work
    threads = threads or cfg.eval.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    max_new = cfg.tasks[task].max_new_tokens or cfg.eval.max_new_tokens
    kwargs = cfg.target.chat_template_kwargs
    out = deployed_dir(cfg, engine, method, task)
    out.mkdir(parents=True, exist_ok=True)
    chash = cfg.hash()

    with tracking.stage_run(cfg, "deploy", f"deploy {engine} {method} {task}", engine=engine, method=method,
                            task=task) as run:
        start = time.perf_counter()
        target = load_target(cfg.target.model, cfg.target.dtype, cfg.target.backend, cfg.target.max_len)
        tok, stop = target.tokenizer, list(target.loaded.eos_ids)
        model_folder = resolve(cfg.target.model)[0]
        sweep_prompts = [turn_prompt(tok, s["turns"], [], 0, kwargs) for s in samples[:run_cfg.sweep_prompts]]
        run.tags(tracking.lineage({"task_data": data_path, **({"drafter": Path(export)} if export else {})},
                                  {"method": node_hash(cfg.method_section(method)), "target": cfg.section_hash("target"),
                                   "engines": cfg.section_hash("engines", engine)}))
        sides: dict[str, dict] = {}
        for side, sc in (("baseline", None), ("outputs", spec)):
            label = f"{engine} {'ar' if sc is None else method}/{task}"
            with VllmSession(env, model_folder, threads=threads, speculative_config=sc, dtype=cfg.target.dtype,
                             max_model_len=cfg.target.max_len, seed=cfg.eval.seed,
                             log=log_file(cfg, "deploy", f"{engine}-{method}-{task}-{side}")) as session:
                session.generate(sweep_prompts[:1], 8, stop_token_ids=stop, ignore_eos=True)  # warm-up
                sampling = {"temperature": cfg.eval.temperature, "seed": cfg.eval.seed}
                convs, counters = _conversations(session, tok, samples, max_new, stop, kwargs, label, **sampling)
                sweep = _sweep(session, convs, sweep_prompts, run_cfg.concurrency, max_new, stop, **sampling)
            sides[side] = {"convs": convs, "counters": counters, "sweep": sweep, "version": session.version}
        ours_engine = Engine(target.backend, stop, sampling_of(cfg))
        proposer = build_proposer(chain_method(m), target, method, drafters_root(cfg), cfg.eval.temperature,
                                  cfg.eval.seed, cfg.methods)
        ours: dict[str, list] = {"ours": [], "ours_baseline": []}
        for i, sample in enumerate(tqdm(samples, desc=f"ours {method}/{task}", unit="sample", dynamic_ncols=True)):
            for key, prop in (("ours_baseline", None), ("ours", proposer)):
                ours[key].append(run_conversation(ours_engine, target, sample["turns"], max_new, prop,
                                                  cfg.eval.seed + i, kwargs))

        records = [{"question_id": s["question_id"], "task": task, "method": method, "engine": engine,
                    "config_hash": chash, "turns": s["turns"], "outputs": sides["outputs"]["convs"][i],
                    "baseline": sides["baseline"]["convs"][i],
                    "ours": [{"token_ids": t["token_ids"]} for t in ours["ours"][i]],
                    "ours_baseline": [{"token_ids": t["token_ids"]} for t in ours["ours_baseline"][i]]}
                   for i, s in enumerate(samples)]
        for rec in records:
            rec["cross_engine"] = _first_divergence(target, rec, kwargs)
        metrics = _summarize(records, sides, [t for turns in ours["ours"] for t in turns], cfg.eval.temperature)
        metrics.update({"engine": engine, "engine_version": sides["outputs"]["version"], "method": method,
                        "task": task, "kind": m.kind, "speculative_config": spec, "threads": threads,
                        "config_hash": chash, "engines_hash": cfg.section_hash("engines", engine),
                        "target": cfg.target.model, "target_fingerprint": target.loaded.fingerprint,
                        "max_new_tokens": max_new, "elapsed_s": time.perf_counter() - start})
        io.write_jsonl(out / "records.jsonl", records)
        io.write_json(out / "metrics.json", metrics)
        run.params({"engine": engine, "engine_version": metrics["engine_version"], "method": method, "task": task,
                    "threads": threads, "samples": len(samples), "max_new_tokens": max_new,
                    "concurrency": run_cfg.concurrency, "sweep_prompts": len(sweep_prompts),
                    **{f"speculative_config.{k}": v for k, v in spec.items()}})
        run.metrics({k: v for k, v in (("tau", metrics["tau"]), ("ours_tau", metrics["ours_tau"]),
                                       ("speedup", metrics["speedup"]), ("tokens_per_s", metrics["tokens_per_s"]),
                                       ("baseline_tokens_per_s", metrics["baseline_tokens_per_s"]),
                                       ("lossless_mismatches", metrics["lossless"]["mismatches"]),
                                       ("cross_engine_identical", metrics["cross_engine"]["identical_samples"]))
                     if v is not None})
        for row in metrics["concurrency"]:
            run.metrics({"sweep_tokens_per_s": row["tokens_per_s"], "sweep_baseline_tokens_per_s":
                         row["baseline_tokens_per_s"], "sweep_speedup": row["speedup"]}, step=row["requests"])
        run.tags({"lossless": str(metrics["lossless"]["passed"]), "engine_version": metrics["engine_version"]})
        run.artifact(out / "metrics.json")
        print(f"[deploy] {engine} {metrics['engine_version']} {method}/{task}: " + summary_line(metrics))
    return metrics


def _first_divergence(target, rec: dict, kwargs: dict) -> dict | None:
    """Where vLLM's autoregressive output first leaves ours, weighed by the target's logits (None: identical)."""
    for t, (theirs, mine) in enumerate(zip(rec["baseline"], rec["ours_baseline"])):
        if theirs["token_ids"] != mine["token_ids"]:
            prompt = turn_prompt(target.tokenizer, rec["turns"], [o["text"] for o in rec["baseline"][:t]], t, kwargs)
            return {"turn": t, **divergence(target.backend, prompt, theirs["token_ids"], mine["token_ids"])}
    return None


def _summarize(records: list[dict], sides: dict, ours_turns: list[dict], temperature: float) -> dict[str, Any]:
    mine = [t for r in records for t in r["outputs"]]
    base = [t for r in records for t in r["baseline"]]

    def rate(turns):
        wall = sum(t["wall_time"] for t in turns)
        return sum(t["new_tokens"] for t in turns) / wall if wall else 0.0

    per_sample = [rate(r["outputs"]) / rate(r["baseline"]) for r in records if rate(r["baseline"])]
    tps, base_tps = rate(mine), rate(base)
    counters = sides["outputs"]["counters"]
    vllm_tau, ours_tau = tau(counters), rounds_tau(ours_turns)
    greedy = temperature == 0
    mismatches = sum(a["token_ids"] != b["token_ids"] for a, b in zip(mine, base))
    diverged = sum(any(a["token_ids"] != b["token_ids"] for a, b in zip(r["outputs"], r["baseline"])) for r in records)
    lossless = ({"rule": EXACT, "checked_turns": len(mine), "mismatches": mismatches, "diverged_samples": diverged,
                 "passed": mismatches == 0} if greedy else
                {"checked_turns": 0, "mismatches": 0, "passed": None, "note": "sampling: equality does not apply"})
    cross = [r["cross_engine"] for r in records]
    sweep = []
    for b, o in zip(sides["baseline"]["sweep"], sides["outputs"]["sweep"]):
        btps = b["tokens"] / b["wall_time"] if b["wall_time"] else 0.0
        otps = o["tokens"] / o["wall_time"] if o["wall_time"] else 0.0
        sweep.append({"requests": b["requests"], "baseline_tokens_per_s": btps, "tokens_per_s": otps,
                      "speedup": otps / btps if btps else 0.0,
                      "baseline_ms_per_token": 1e3 / btps if btps else None, "ms_per_token": 1e3 / otps if otps else None,
                      "identical": o["outputs"] == b["outputs"]})
    return {
        "samples": len(records), "turns": len(mine), "new_tokens": sum(t["new_tokens"] for t in mine),
        "tau": vllm_tau, "ours_tau": ours_tau,
        "tau_rel_diff": abs(vllm_tau - ours_tau) / ours_tau if vllm_tau and ours_tau else None,
        "acceptance_by_depth": acceptance_by_position(counters), "counters": counters,
        "tokens_per_s": tps, "baseline_tokens_per_s": base_tps, "speedup": tps / base_tps if base_tps else 0.0,
        "ms_per_token": 1e3 / tps if tps else None, "baseline_ms_per_token": 1e3 / base_tps if base_tps else None,
        "speedup_per_sample": ({"min": float(np.min(per_sample)), "median": float(np.median(per_sample)),
                                "max": float(np.max(per_sample))} if per_sample else None),
        "lossless": lossless,
        "cross_engine": {"samples": len(records), "identical_samples": sum(c is None for c in cross),
                         "first_divergence": next((c for c in cross if c is not None), None)},
        "concurrency": sweep,
    }


def summary_line(m: dict) -> str:
    tau_part = (f"tau {m['tau']:.2f} (ours {m['ours_tau']:.2f} on the same chain)" if m["tau"] and m["ours_tau"]
                else "no drafts accepted" if m["tau"] else "nothing drafted")
    lossless = {True: "PASS", False: f"FAIL ({m['lossless']['mismatches']} turns differ)", None: "n/a"}[m["lossless"]["passed"]]
    sweep = ", ".join(f"{r['requests']}: {r['speedup']:.2f}x" for r in m["concurrency"])
    return (f"{tau_part}, {m['tokens_per_s']:.1f} tok/s, speedup {m['speedup']:.2f}x vs its own AR at "
            f"{m['baseline_tokens_per_s']:.1f} tok/s, lossless {lossless}, same output as our engine in "
            f"{m['cross_engine']['identical_samples']}/{m['cross_engine']['samples']} samples; "
            f"speedup by requests in flight {sweep}")
