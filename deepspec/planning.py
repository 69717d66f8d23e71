"""`deepspec check`: what a config will cost before anything starts (upper bounds, from the config alone).

The target's shape comes from its config.json when the model is on this machine, else from a table of
the paper targets (no download). Sizes are upper bounds: every conversation at its token caps."""

from __future__ import annotations

from typing import Any

from deepspec.config import Config

# (layers, hidden size, vocabulary) of targets whose config may not be on this machine.
KNOWN_SHAPES = {
    "Qwen/Qwen3-4B": (36, 2560, 151_936),
    "Qwen/Qwen3-8B": (36, 4096, 151_936),
    "Qwen/Qwen3-14B": (40, 5120, 151_936),
    "packaged:smollm2-135m-instruct": (30, 576, 49_152),
}


def target_shape(model: str) -> tuple[int, int, int] | None:
    if model in KNOWN_SHAPES:
        return KNOWN_SHAPES[model]
    from pathlib import Path

    path = Path(model) / "config.json"
    if path.is_file():
        import json

        c = json.loads(path.read_text())
        c = c.get("text_config", c)
        return c["num_hidden_layers"], c["hidden_size"], c["vocab_size"]
    return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{int(n)}"


def plan(cfg: Config) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (stage, work, size) and notes."""
    from deepspec.features.extract import bytes_per_token, drafter_layers, feature_layers

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    td = cfg.train_data
    shape = target_shape(cfg.target.model)
    if shape is None:
        notes.append(f"target {cfg.target.model!r}: shape unknown here (no local config.json); sizes left out")
    drafters = cfg.drafters_in_use()
    if drafters:
        convs = td.max_samples
        where = f"{td.servers and len(td.servers) or 0} server(s)" if td.backend == "openai" else f"in process ({td.backend})"
        if convs is None:
            notes.append(f"train_data.max_samples is null: every conversation of {td.source or 'the packaged ShareGPT'}; "
                         "the bounds below are per million conversations")
            convs = 1_000_000
        written = convs * td.max_turns * td.max_new_tokens
        per_conv = min(cfg.features.max_len, td.max_turns * (td.max_prompt_tokens + td.max_new_tokens))
        fixed = td.dataset_samples  # fixed data: read by the target at extraction, never generated
        tokens = (convs + fixed) * per_conv
        rows.append({"stage": "regenerate", "work": f"{_count(convs)} conversations x {td.max_turns} turn(s), "
                     f"<= {_count(written)} tokens written by the target, {where}"
                     + (f"; {_count(fixed)} more keep the dataset's answers" if fixed else ""),
                     "size": _size(tokens * 8)})
        if shape is not None:
            n_layers, hidden, vocab = shape
            layers = feature_layers(cfg, n_layers)
            per_token = bytes_per_token(len(layers), hidden, cfg.features.dtype)
            rows.append({"stage": "extract", "work": f"<= {_count(tokens)} tokens through the target in "
                         f"{cfg.features.shards} shards; hidden_states {layers} + final, {cfg.features.dtype}",
                         "size": f"<= {_size(tokens * per_token)} ({per_token} bytes/token)"})
            topk = max(cfg.drafters[d].soft_top_k for d in drafters)
            rows.append({"stage": "soft targets", "work": f"top-{topk} of the target's distribution per token",
                         "size": f"<= {_size(tokens * topk * 6)}"})
        train_seqs = convs + fixed
        for name in drafters:
            dc = cfg.drafters[name]
            tc = dc.train
            steps = tc.total_steps(tc.split_sizes(train_seqs)[1])
            procs = f"{tc.processes} x {tc.distributed}" if tc.processes > 1 else "1 process"
            layer_note = f", layers {drafter_layers(cfg, name, shape[0])}" if shape else ""
            rows.append({"stage": f"train {name}", "work": f"{dc.kind}: {tc.epochs:g} epochs = {_count(steps)} steps of "
                         f"{tc.sequences_per_step} sequences on {procs}{layer_note}", "size": ""})
    samples = {name: t.max_samples for name, t in cfg.tasks.items()}
    unknown = [n for n, s in samples.items() if s is None]
    known = sum(s for s in samples.values() if s)
    methods = [m for m in cfg.methods if m != cfg.baseline_method()]
    runs = 1 + sum(2 + (m in cfg.eval.rivals) for m in methods)  # each job: its method, the baseline, any rival
    gen = known * cfg.eval.max_new_tokens * runs
    rows.append({"stage": "evaluate", "work": f"{len(methods)} methods x {len(cfg.tasks)} tasks ({known} samples"
                 f"{' + all of ' + ', '.join(unknown) if unknown else ''}), <= {_count(gen)} generated tokens per turn "
                 f"(T = {cfg.eval.temperature:g})", "size": ""})
    for engine, run in cfg.engines.items():
        rows.append({"stage": f"deploy ({engine})", "work": f"{len(run.methods)} methods x {len(cfg.tasks)} tasks in "
                     f"{engine}, each beside its autoregressive run and ours; {len(run.concurrency)} concurrency levels "
                     f"up to {max(run.concurrency)} over <= {run.sweep_prompts} prompts per task; its environment "
                     f"is made once under the cache (`deepspec engine setup {engine}`)", "size": ""})
    return rows, notes


def format_plan(cfg: Config) -> str:
    import pandas as pd

    rows, notes = plan(cfg)
    text = pd.DataFrame(rows).to_markdown(index=False)
    return text + "".join(f"\n- {n}" for n in notes)
