"""`deepspec evaluate`: one method on one task, paired sample by sample with the autoregressive baseline.

The baseline runs in the same process on the same samples, alternating which goes first, so machine
noise hits both alike and the speedup is a ratio measured within one run. A method with a rival
(`eval.rivals`) has the rival run in turn with both: a head-to-head free of the drift between jobs.
Greedy outputs are compared token by token (the losslessness check). Finished samples are appended to
a partial file, so a killed run resumes where it stopped; the final records and metrics are renamed
into place at the end.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from deepspec import io, tracking
from deepspec.config import Config, HybridMethod, node_hash
from deepspec.config_base import TrainedMethod
from deepspec.data.tasks import chat_ids
from deepspec.decoding.engine import Engine
from deepspec.decoding.verify import Sampling
from deepspec.drafters.build import build_proposer
from deepspec.devices import job_device
from deepspec.evaluation.lossless import NEAR_TIE, divergence, lossless_rule
from deepspec.evaluation.metrics import summarize, turn_record
from deepspec.models.attention import sdpa_label
from deepspec.layout import drafter_model, drafters_root, eval_dir, task_file
from deepspec.models import Target, load_target


def sampling_of(cfg: Config) -> Sampling:
    return Sampling(cfg.eval.temperature, cfg.eval.top_k, cfg.eval.top_p)


def turn_prompt(tok, turns: list[str], answers: list[str], turn: int, template_kwargs: dict | None = None) -> list[int]:
    """The prompt ids of turn `turn`: the user turns so far, each earlier one followed by its answer."""
    messages: list[dict[str, str]] = []
    for i in range(turn + 1):
        messages.append({"role": "user", "content": turns[i]})
        if i < turn:
            messages.append({"role": "assistant", "content": answers[i]})
    return chat_ids(tok, messages, template_kwargs)


def run_conversation(engine: Engine, target: Target, turns: list[str], max_new_tokens: int, proposer, seed: int,
                     template_kwargs: dict | None = None) -> list[dict]:
    """All turns of one sample; each later turn sees this method's own earlier answers."""
    tok = target.tokenizer
    outputs: list[dict] = []
    for i in range(len(turns)):
        prompt = turn_prompt(tok, turns, [o["text"] for o in outputs], i, template_kwargs)
        gen = engine.generate(prompt, max_new_tokens, proposer, engine.generator(seed * 1000 + i))
        outputs.append(turn_record(gen, tok.decode(gen.tokens, skip_special_tokens=True)))
    return outputs


def sample_divergence(target: Target, rec: dict, template_kwargs: dict | None) -> dict | None:
    """The first divergence of a sample's outputs from its baseline's, weighed by the target (`lossless.divergence`)."""
    for t, (mine, base) in enumerate(zip(rec["outputs"], rec["baseline"])):
        if mine["token_ids"] != base["token_ids"]:
            prompt = turn_prompt(target.tokenizer, rec["turns"], [o["text"] for o in rec["outputs"]], t, template_kwargs)
            return {"turn": t, **divergence(target.backend, prompt, mine["token_ids"], base["token_ids"])}
    return None


def drafter_folders(cfg: Config, method: str) -> dict[str, Path]:
    """The drafter checkpoint folders a method decodes with, by the method that reads each (a hybrid's are
    its parts'; none for methods without a drafter)."""
    m = cfg.methods[method]
    if isinstance(m, HybridMethod):
        return {k: v for part in m.methods for k, v in drafter_folders(cfg, part).items()}
    if not isinstance(m, TrainedMethod):
        return {}
    return {method: Path(m.checkpoint) if m.checkpoint else drafter_model(cfg, m.drafter)}


def _load_partial(path: Path, config_hash: str) -> dict[Any, dict]:
    return {r["question_id"]: r for r in io.read_jsonl_prefix(path) if r.get("config_hash") == config_hash}


def task_samples(cfg: Config, task: str) -> tuple[Path, list[dict]]:
    """A task's prepared file and samples, or a one-line error before any work."""
    if task not in cfg.tasks:
        raise ValueError(f"task {task!r} is not in the config (tasks: {', '.join(cfg.tasks)})")
    data_path = task_file(cfg, task)
    if not data_path.is_file():
        raise FileNotFoundError(f"{data_path}: task data missing; run `deepspec prepare` first")
    return data_path, io.read_jsonl(data_path)


def evaluate(cfg: Config, method: str, task: str, threads: int | None = None) -> dict[str, Any]:
    if method not in cfg.methods:
        raise ValueError(f"method {method!r} is not in the config (methods: {', '.join(cfg.methods)})")
    data_path, samples = task_samples(cfg, task)
    torch.set_num_threads(threads or cfg.eval.threads or os.cpu_count() or 1)
    baseline = cfg.baseline_method()
    paired = method != baseline
    max_new = cfg.tasks[task].max_new_tokens or cfg.eval.max_new_tokens
    out = eval_dir(cfg, method, task)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "records.jsonl.partial"
    chash = cfg.hash()

    with tracking.stage_run(cfg, "evaluate", f"evaluate {method} {task}", method=method, task=task) as run:
        device = job_device(1 if cfg.resources.gpus else 0)  # a GPU of this node no other deepspec job holds
        target = load_target(cfg.target.model, cfg.target.dtype, cfg.target.backend, cfg.target.max_len, device)
        engine = Engine(target.backend, target.loaded.eos_ids, sampling_of(cfg))
        rule = lossless_rule(device, target.backend.dtype)
        proposer = build_proposer(cfg.methods[method], target, method, drafters_root(cfg), cfg.eval.temperature,
                                  cfg.eval.seed, cfg.methods)
        base_proposer = build_proposer(cfg.methods[baseline], target)
        rival = cfg.eval.rivals.get(method)
        rival_proposer = None if rival is None else build_proposer(
            cfg.methods[rival], target, rival, drafters_root(cfg), cfg.eval.temperature, cfg.eval.seed, cfg.methods)
        folders = drafter_folders(cfg, method) | (drafter_folders(cfg, rival) if rival else {})
        drafters = {"drafter": f for f in folders.values()} if len(folders) == 1 else \
            {f"drafter.{k}": f for k, f in folders.items()}
        run.tags(tracking.lineage({"task_data": data_path, **drafters},
                                  {"method": node_hash(cfg.method_section(method)), "target": cfg.section_hash("target"),
                                   "eval": node_hash(cfg.eval_section(method))}))
        run.params({"method": method, "task": task, "baseline": baseline, "rival": rival or "", "max_new_tokens": max_new,
                    "samples": len(samples), "target": cfg.target.model, "target_fingerprint": target.loaded.fingerprint,
                    "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p, "top_k": cfg.eval.top_k,
                    "threads": torch.get_num_threads(), "device": str(device), "dtype": cfg.target.dtype,
                    "sdpa": sdpa_label(device), "lossless_rule": rule,
                    **{f"method.{k}": v for k, v in cfg.methods[method].model_dump().items()}})
        # Warm-up: first calls pay one-off allocation costs that would bias whichever method runs first.
        warm = chat_ids(target.tokenizer, [{"role": "user", "content": "Hello"}], cfg.target.chat_template_kwargs)
        engine.generate(warm, 8, proposer)
        engine.generate(warm, 8, base_proposer)
        if rival_proposer is not None:
            engine.generate(warm, 8, rival_proposer)

        done = _load_partial(partial, chash)
        io.write_jsonl(partial, list(done.values()))  # only whole rows of this config: appending follows a full line
        records = []
        start = time.perf_counter()
        bar = tqdm(samples, desc=f"{method}/{task}", unit="sample", dynamic_ncols=True)
        with open(partial, "a", encoding="utf-8") as fh:
            for i, sample in enumerate(bar):
                qid = sample["question_id"]
                if qid in done:
                    records.append(done[qid])
                    for key, prop in (("outputs", proposer), ("rival", rival_proposer)):
                        if hasattr(prop, "remember"):  # its earlier outputs, as the interrupted run saw them
                            for turn in done[qid].get(key, []):
                                prop.remember(turn["token_ids"])
                    continue
                rec = {"question_id": qid, "task": task, "category": sample.get("category"), "method": method,
                       "config_hash": chash, "turns": sample["turns"]}
                seed = cfg.eval.seed + i
                order = [("outputs", proposer), ("baseline", base_proposer)] if paired else [("outputs", proposer)]
                if rival_proposer is not None:  # three in turn: each goes first, second and third equally often
                    order.append(("rival", rival_proposer))
                    order = order[i % 3:] + order[: i % 3]
                elif i % 2:
                    order.reverse()
                for key, prop in order:
                    rec[key] = run_conversation(engine, target, sample["turns"], max_new, prop, seed,
                                                cfg.target.chat_template_kwargs)
                if paired and engine.sampling.greedy and rule == NEAR_TIE:
                    rec["divergence"] = sample_divergence(target, rec, cfg.target.chat_template_kwargs)
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                records.append(rec)
                m = summarize(records, engine.sampling.greedy, paired, rule, cfg.eval.tie_margin)
                bar.set_postfix(tau=f"{m['tau']:.2f}", speedup=f"{m['speedup']:.2f}x", tok_s=f"{m['tokens_per_s']:.1f}")
        bar.close()

        metrics = summarize(records, engine.sampling.greedy, paired, rule, cfg.eval.tie_margin)
        metrics.update({"method": method, "task": task, "kind": cfg.methods[method].kind, "baseline": baseline,
                        "device": str(device), "dtype": cfg.target.dtype, "sdpa": sdpa_label(device),
                        "config_hash": chash, "target": cfg.target.model, "target_fingerprint": target.loaded.fingerprint,
                        "max_new_tokens": max_new, "elapsed_s": time.perf_counter() - start})
        if rival:
            metrics["rival"] = {"method": rival, **metrics["rival"]}
        if getattr(proposer, "chosen", None):  # a hybrid: rounds each of its methods drafted (warm-up included)
            metrics["rounds_drafted_by"] = dict(proposer.chosen)
        io.write_jsonl(out / "records.jsonl", records)
        partial.unlink(missing_ok=True)
        io.write_json(out / "metrics.json", metrics)
        flat = {"tau": metrics["tau"], "tokens_per_s": metrics["tokens_per_s"], "speedup": metrics["speedup"],
                "baseline_tokens_per_s": metrics["baseline_tokens_per_s"], "new_tokens": metrics["new_tokens"],
                "lossless_mismatches": metrics["lossless"]["mismatches"],
                **dict(zip(("tau_ci95_lo", "tau_ci95_hi"), metrics["spread"]["tau_ci95"])),
                **dict(zip(("speedup_ci95_lo", "speedup_ci95_hi"), metrics["spread"]["speedup_ci95"])),
                **{f"speedup_sample_{k}": v for k, v in metrics["spread"]["speedup_per_sample"].items()},
                **{f"time_frac_{k}": v for k, v in metrics["time_split"].items()},
                **{f"accept_depth_{d + 1}": a for d, a in enumerate(metrics["acceptance_by_depth"])}}
        if rival:
            r = metrics["rival"]
            flat.update({"rival_ratio": r["ratio"], "rival_ci95_lo": r["ci95"][0], "rival_ci95_hi": r["ci95"][1],
                         "rival_speedup": r["speedup"]})
        run.metrics(flat)
        run.tags({"lossless": str(metrics["lossless"]["passed"])})
        run.artifact(out / "metrics.json")
        lossless = metrics["lossless"]
        verdict = "n/a" if lossless["passed"] is None else ("PASS" if lossless["passed"] else f"FAIL ({lossless['mismatches']} turns differ)")
        if lossless.get("rule") == NEAR_TIE and lossless.get("diverged_samples"):
            verdict += (f" by the near-tie rule ({lossless['diverged_samples']} samples diverge, largest logit gap "
                        f"{lossless['max_logit_gap']:.3f}, margin {lossless['tie_margin']})")
        lo, hi = metrics["spread"]["speedup_ci95"]
        print(f"[evaluate] {method}/{task}: tau {metrics['tau']:.2f}, {metrics['tokens_per_s']:.1f} tok/s, "
              f"speedup {metrics['speedup']:.2f}x (95% {lo:.2f}-{hi:.2f}) vs {baseline} at "
              f"{metrics['baseline_tokens_per_s']:.1f} tok/s, lossless {verdict}")
        if rival:
            r = metrics["rival"]
            print(f"[evaluate] {method}/{task} against {rival} in this job: {r['ratio']:.3f}x (95% {r['ci95'][0]:.3f}-"
                  f"{r['ci95'][1]:.3f}), faster on {r['faster']} of {r['samples']} samples; {rival} {r['speedup']:.2f}x")
    return metrics
