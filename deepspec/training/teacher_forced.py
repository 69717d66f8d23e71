"""`deepspec bench drafters`: every trained drafter scored teacher-forced on the evaluation outputs.

Validation scores drafters on held-out *training* conversations; decoding runs on the benchmark
tasks. This bench closes the gap: it takes the autoregressive outputs the evaluate stage recorded for
each task (the baseline's token ids, identical to the target's greedy output), captures the target's
features over prompt + output, and scores each drafter with its own training loss code on the output
positions. Per-draft top-1 accuracy and the teacher-forced chain τ then line up with the decoded τ
(a gap between them would be a train / inference mismatch); their differences across drafters show
which draft positions each one wins. `bench families` scores its drafters the same way on its prompts'
answers (`answer_sequences`, `score_answers`).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from deepspec import io, tracking
from deepspec.config import Config


def answer_sequences(target, prompts: list[list[int]], answers: list[list[int]],
                     layers: list[int]) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Prompt + answer sequences with the target's features at `layers` captured over them (the answer
    positions are the ones scored), and their soft targets, as `score_answers` takes them."""
    from deepspec.features.extract import capture
    from deepspec.training.targets import soft_targets

    seqs = []
    for prompt, answer in zip(prompts, answers):
        ids = list(prompt) + list(answer)
        caps = capture(target.backend, ids, layers)
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[len(prompt):] = True
        seqs.append({"input_ids": torch.tensor(ids), "hidden_all": caps.float(), "final": caps[:, -1].float(),
                     "loss_mask": mask})
    return seqs, soft_targets(seqs, target.loaded.model.get_output_embeddings().weight.detach().float(), 64)


def _sequences(cfg: Config, target, task: str, layers: list[int]) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    from deepspec.data.tasks import chat_ids
    from deepspec.layout import eval_dir

    path = next((eval_dir(cfg, m, task) / "records.jsonl" for m in cfg.methods
                 if (eval_dir(cfg, m, task) / "records.jsonl").is_file() and m != cfg.baseline_method()), None)
    if path is None:
        raise FileNotFoundError(f"no evaluation records for task {task!r} under {cfg.out_dir / 'eval'}; run the DAG first")
    records = list(io.read_jsonl(path))
    prompts = [chat_ids(target.tokenizer, [{"role": "user", "content": rec["turns"][0]}], cfg.target.chat_template_kwargs)
               for rec in records]
    answers = [rec["baseline"][0]["token_ids"] for rec in records]  # first turn, the target's own greedy answer
    return answer_sequences(target, prompts, answers, layers)


def score_answers(cfg: Config, name: str, model_hf, seqs: list[dict[str, torch.Tensor]], cached: list[dict[str, torch.Tensor]],
                  layers: list[int]) -> dict[str, Any]:
    """Drafter `name` scored teacher-forced on `answer_sequences` (`cached`: their `soft_targets`) with its own
    loss code: chain τ and top-1 accuracy by draft."""
    from deepspec.drafters.kind import Direct
    from deepspec.drafters.registry import KINDS
    from deepspec.features.extract import drafter_layers, layer_columns
    from deepspec.layout import drafter_model
    from deepspec.training.targets import target_to_draft, training_targets

    dc = cfg.drafters[name]
    kind = KINDS[dc.kind]
    model = kind.load(drafter_model(cfg, name), model_hf)
    model.eval()
    n_layers = model_hf.config.num_hidden_layers
    cols = layer_columns(layers, drafter_layers(cfg, name, n_layers), n_layers)
    mine = [{**s, "hidden": s["hidden_all"][:, cols]} for s in seqs]
    lookup = target_to_draft(model.draft_to_target, model_hf.get_output_embeddings().weight.shape[0])
    labels = [training_targets(c, s["loss_mask"], lookup, "assistant") for c, s in zip(cached, mine)]
    with torch.no_grad():
        r = kind.run_batch(Direct(model), dc, mine, labels, False, None)
    return {"tau_chain": r["tau_chain"], "acc": r["acc_step"]}


def bench_drafters(cfg: Config) -> dict[str, Any]:
    from deepspec.features.extract import feature_layers
    from deepspec.models import load_target
    from deepspec.layout import bench_dir, drafter_model, drafters_root, eval_dir

    names = [n for n in cfg.drafters_in_use() if (drafter_model(cfg, n) / "config.json").is_file()]
    if not names:
        raise FileNotFoundError(f"no trained drafters under {drafters_root(cfg)}; run the DAG first")
    target = load_target(cfg.target.model, cfg.target.dtype, "auto", cfg.target.max_len)
    model_hf = target.loaded.model
    layers = feature_layers(cfg, model_hf.config.num_hidden_layers)
    result: dict[str, Any] = {"tasks": {}}
    with tracking.stage_run(cfg, "bench", "bench drafters") as run:
        for task in cfg.tasks:
            seqs, cached = _sequences(cfg, target, task, layers)
            rows = {}
            for name in names:
                r = score_answers(cfg, name, model_hf, seqs, cached, layers)
                done = [eval_dir(cfg, m, task) / "metrics.json" for m, mc in cfg.methods.items()
                        if getattr(mc, "drafter", None) == name]
                decoded = [json.loads(path.read_text())["tau"] for path in done if path.is_file()]
                rows[name] = {"kind": cfg.drafters[name].kind, "tau_teacher_forced": r["tau_chain"], "acc": r["acc"],
                              "tau_decoded": decoded}
                run.metrics({f"{task}.{name}.tau_teacher_forced": r["tau_chain"]})
            result["tasks"][task] = rows
        out = bench_dir(cfg)
        io.write_json(out / "drafters.json", result)
        io.write_text(out / "drafters.md", format_table(result))
        run.artifact(out / "drafters.md", "bench")
    print(format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = ["Teacher-forced on the evaluation outputs (the target's greedy answers, first turn): chain τ and "
             "top-1 accuracy by draft position; decoded τ from the evaluate stage (every method using the drafter).", "",
             "| task | drafter | kind | chain τ (teacher-forced) | decoded τ | top-1 accuracy by draft |", "|---|---|---|---|---|---|"]
    for task, rows in result["tasks"].items():
        for name, r in rows.items():
            lines.append(f"| {task} | {name} | {r['kind']} | {r['tau_teacher_forced']:.3f} | "
                         f"{', '.join(f'{t:.2f}' for t in r['tau_decoded']) or '–'} | "
                         f"{', '.join(f'{a:.3f}' for a in r['acc'])} |")
    return "\n".join(lines) + "\n"
