"""`deepspec bench decode`: our engine against Hugging Face on one fixed real prompt set, methods interleaved.

A benchmark, not a test: it reports ratios measured within one run (the machine is shared and noisy),
plus the verify-cost curve of the target forward, and logs everything to MLflow like any stage.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm import tqdm

from deepspec import io, tracking
from deepspec.config import Config, DraftLMMethod, NgramMethod, SuffixMethod, TaskConfig
from deepspec.data.tasks import chat_ids, load_task
from deepspec.decoding.cost import verify_cost_curve
from deepspec.decoding.engine import Engine
from deepspec.drafters.build import build_proposer
from deepspec.evaluation.runner import drafter_folders
from deepspec.layout import bench_dir, drafters_root, log_file
from deepspec.models import load_target
from deepspec.models.lean import LeanLlama

# Our methods in the benchmark; HF's two are added in `bench_decode`.
OURS: dict[str, Any] = {
    "ours_ar": None,
    "ours_pld_chain": NgramMethod(kind="ngram", ngram_max=3, ngram_min=2, num_draft=4),
    "ours_pld_tree": NgramMethod(kind="ngram", ngram_max=3, ngram_min=2, num_draft=5, branches=3),
    "ours_suffix": SuffixMethod(kind="suffix"),
    "ours_draft_lm_chain": DraftLMMethod(kind="draft_lm", quantize="int8", depth=4, top_k=1, total_tokens=4),
    "ours_draft_lm_tree": DraftLMMethod(kind="draft_lm", quantize="int8", depth=4, top_k=3, total_tokens=10),
}


@dataclass
class Tally:
    new_tokens: int = 0
    wall: float = 0.0
    forwards: int = 0
    draft: float = 0.0
    verify: float = 0.0
    forward: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)
    rounds: dict[str, list[float]] = field(default_factory=dict)  # who drafted -> [rounds, tokens, seconds]
    engine_tau: float | None = None  # another engine's own τ (its spec-decode counters), where it drafts

    @property
    def tps(self) -> float:
        return self.new_tokens / self.wall if self.wall else 0.0


def bench_prompts(tokenizer, n: int, seed: int = 0, template_kwargs: dict | None = None) -> list[list[int]]:
    half = max(1, n // 2)
    mt = load_task("mt_bench", TaskConfig(kind="mt_bench", max_samples=half), seed).samples
    he = load_task("humaneval", TaskConfig(kind="humaneval", max_samples=n - half), seed).samples if n > half else []
    return [chat_ids(tokenizer, [{"role": "user", "content": s["turns"][0]}], template_kwargs) for s in mt + he]


def bench_decode(cfg: Config, n_prompts: int = 8, max_new_tokens: int = 128, threads: int | None = None,
                 methods: list[str] | None = None, out_name: str | None = None) -> dict[str, Any]:
    """`out_name`: the outputs' stem under bench/ (default: decode, or decode_threadsN for a thread sweep)."""
    torch.set_num_threads(threads or cfg.eval.threads or os.cpu_count() or 1)
    with tracking.stage_run(cfg, "bench", "bench decode", bench="decode") as run:
        target = load_target(cfg.target.model, cfg.target.dtype, cfg.target.backend, cfg.target.max_len)
        tok, hf = target.tokenizer, target.loaded.model
        engine = Engine(target.backend, target.loaded.eos_ids)
        prompts = bench_prompts(tok, n_prompts, cfg.eval.seed, cfg.target.chat_template_kwargs)
        runners: dict[str, Callable[[list[int]], tuple[list[int], Any]]] = {}
        eos = target.loaded.eos_ids

        def hf_runner(**kw):
            def go(prompt):
                ids = torch.tensor([prompt])
                with torch.inference_mode():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=eos, pad_token_id=eos[0], **kw)
                return out[0, len(prompt):].tolist(), None
            return go

        def ours_runner(proposer):
            def go(prompt):
                gen = engine.generate(prompt, max_new_tokens, proposer)
                return gen.tokens, gen
            return go

        def wanted(name: str) -> bool:  # the two references always run
            return not methods or name in methods or name in ("hf_generate", "ours_ar")

        runners["hf_generate"] = hf_runner()
        if wanted("hf_prompt_lookup"):
            runners["hf_prompt_lookup"] = hf_runner(prompt_lookup_num_tokens=8)
        for name, method in OURS.items():
            if wanted(name):
                runners[name] = ours_runner(build_proposer(method, target, name) if method is not None else None)
        for name, method in cfg.methods.items():  # this experiment's trained drafters (once they exist)
            folders = drafter_folders(cfg, name).values()
            if folders and all((f / "config.json").is_file() for f in folders) and wanted(f"ours_{name}"):
                runners[f"ours_{name}"] = ours_runner(build_proposer(method, target, name, drafters_root(cfg),
                                                                     methods=cfg.methods))
        names = list(runners)
        for name in names:  # warm-up
            runners[name](prompts[0][:32])
        tallies = {name: Tally() for name in names}
        for i, prompt in enumerate(tqdm(prompts, desc="bench decode", unit="prompt")):
            order = names[i % len(names):] + names[: i % len(names)]  # rotate so no method always goes first
            for name in order:
                t0 = time.perf_counter()
                tokens, gen = runners[name](prompt)
                wall = time.perf_counter() - t0
                t = tallies[name]
                t.new_tokens += len(tokens)
                t.wall += wall
                t.outputs.append(tokens)
                if gen is not None:
                    t.forwards += gen.forwards
                    t.draft += gen.draft_time
                    t.verify += gen.verify_time
                    t.forward += gen.forward_time
                    left = len(tokens) - 1  # after prefill's token; a last round may emit past the end (not kept)
                    for source, n, sec in zip(gen.round_sources[1:], gen.accepted[1:], gen.round_times[1:]):
                        tally = t.rounds.setdefault(source, [0, 0, 0.0])
                        tally[0] += 1
                        tally[1] += min(n, left)
                        tally[2] += sec
                        left -= min(n, left)
        engines = _vllm_tallies(cfg, prompts, max_new_tokens, torch.get_num_threads(), wanted, tallies)
        engines |= _llamacpp_tallies(cfg, prompts, max_new_tokens, torch.get_num_threads(), tallies)
        curve = verify_cost_curve(target.backend)
        result = _summarize(tallies, curve)
        result["engines"] = engines
        result.update({"prompts": len(prompts), "max_new_tokens": max_new_tokens, "threads": torch.get_num_threads()})
        if isinstance(target.backend, LeanLlama):
            result["memory_bound"] = memory_bound(target.backend, curve["chain_1"])
            if target.backend.linear == "onednn":  # the same curve with plain matmuls: what prepacking buys
                plain = verify_cost_curve(LeanLlama(hf, cfg.target.max_len, linear="torch"))
                result["verify_ms_plain"] = plain
                result["verify_ratio_plain"] = {k: v / plain["chain_1"] for k, v in plain.items()}
        text = format_table(result)
        out = bench_dir(cfg)
        stem = out_name or ("decode" if threads is None else f"decode_threads{threads}")  # a sweep keeps each setting
        io.write_json(out / f"{stem}.json", result)
        io.write_text(out / f"{stem}.md", text)
        run.params({"prompts": len(prompts), "max_new_tokens": max_new_tokens, "threads": torch.get_num_threads(),
                    "target": cfg.target.model})
        run.metrics({f"{m}.{k}": v for m, row in result["methods"].items() for k, v in row.items()
                     if isinstance(v, (int, float)) and v is not None}
                    | {f"verify_ms.{k}": v for k, v in curve.items()})
        run.artifact(out / f"{stem}.md")
        run.artifact(out / f"{stem}.json")
        print(text)
    return result


# vLLM's methods in the benchmark (its own prompt lookup with our default's settings), run after ours.
VLLM: dict[str, dict | None] = {
    "vllm_ar": None,
    "vllm_ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 2},
}


def _vllm_tallies(cfg: Config, prompts: list[list[int]], max_new_tokens: int, threads: int, wanted,
                  tallies: dict[str, Tally]) -> dict[str, str]:
    """vLLM's rows, when its environment exists: the same prompts, greedy, the same thread count, one engine
    per method and prompts one at a time. They run after ours (their engine cannot interleave with ours), so
    their ratio to our AR carries the drift of the machine between the two phases."""
    from deepspec.engines import vllm_runner
    from deepspec.engines.env import EngineError, require
    from deepspec.models.loading import resolve

    try:
        env = require("vllm")
    except EngineError as err:
        print(f"[bench] no vLLM rows: {err}")
        return {}
    model = resolve(cfg.target.model)[0]
    for name, spec in VLLM.items():
        if not (wanted(name) or name == "vllm_ar"):
            continue
        print(f"[bench] {name}: vLLM {env.version}, {threads} threads", flush=True)
        log = log_file(cfg, "bench", name)
        try:
            res = vllm_runner.decode(env, model, prompts, max_new_tokens, threads=threads, speculative_config=spec,
                                     max_model_len=cfg.target.max_len, log=log)
        except EngineError as err:  # the engine's rows are an anchor, not the benchmark: say why and go on
            print(f"[bench] {name} skipped: {err} (log: {log})")
            continue
        tallies[name] = Tally(new_tokens=sum(len(x["token_ids"]) for x in res["samples"]),
                              wall=sum(x["wall_time"] for x in res["samples"]),
                              outputs=[x["token_ids"] for x in res["samples"]],
                              engine_tau=vllm_runner.tau(res["counters"]) if spec else None)
    return {"vllm": env.version}


def _llamacpp_tallies(cfg: Config, prompts: list[list[int]], max_new_tokens: int, threads: int,
                      tallies: dict[str, Tally]) -> dict[str, str]:
    """llama.cpp's autoregressive row, when its environment exists and the target comes from a GGUF: the same
    prompts and thread count on the GGUF itself (its quantized kernels; ours run the weights dequantized)."""
    from deepspec.engines import llamacpp_runner
    from deepspec.engines.env import EngineError, require
    from deepspec.models.loading import gguf_source

    gguf = gguf_source(cfg.target.model)
    try:
        env = require("llamacpp")
    except EngineError as err:
        print(f"[bench] no llama.cpp row: {err}")
        return {}
    if gguf is None:
        print(f"[bench] no llama.cpp row: target.model {cfg.target.model!r} is not a GGUF llama.cpp could load")
        return {}
    print(f"[bench] llamacpp_ar: llama.cpp (xllamacpp {env.version}) on {gguf.name}, {threads} threads", flush=True)
    log = log_file(cfg, "bench", "llamacpp_ar")
    try:
        res = llamacpp_runner.decode(env, gguf, prompts, max_new_tokens, threads=threads, n_ctx=cfg.target.max_len,
                                     log=log)
    except EngineError as err:
        print(f"[bench] llamacpp_ar skipped: {err}")
        return {}
    tallies["llamacpp_ar"] = Tally(new_tokens=sum(len(x["token_ids"]) for x in res["samples"]),
                                   wall=sum(x["wall_time"] for x in res["samples"]),
                                   outputs=[x["token_ids"] for x in res["samples"]])
    return {"llama.cpp": f"xllamacpp {env.version}, {gguf.name}"}


def memory_bound(backend: LeanLlama, one_row_ms: float) -> dict[str, float]:
    """The one-token forward against the rate memory allows: every linear weight and the head read once
    per token, at the read bandwidth measured here (a sum over 512 MB, median of 5)."""
    big = torch.ones(128 * 1024 * 1024)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        big.sum()
        ts.append(time.perf_counter() - t0)
    gbps = big.numel() * 4 / statistics.median(ts) / 1e9
    c = backend.config
    per_layer = c.hidden_size * (backend.n_heads + 2 * backend.n_kv_heads) * backend.head_dim + \
        backend.n_heads * backend.head_dim * c.hidden_size + 3 * c.hidden_size * backend.intermediate
    weight_bytes = (len(backend.layers) * per_layer + c.vocab_size * c.hidden_size) * backend.dtype.itemsize
    bound_ms = weight_bytes / (gbps * 1e9) * 1e3
    return {"read_gb_per_s": gbps, "weight_mb": weight_bytes / 1e6, "bound_ms": bound_ms,
            "bound_tokens_per_s": 1e3 / bound_ms, "one_row_ms": one_row_ms, "one_row_vs_bound": one_row_ms / bound_ms}


def _summarize(tallies: dict[str, Tally], curve: dict[str, float]) -> dict[str, Any]:
    ar, hfg = tallies["ours_ar"], tallies["hf_generate"]
    rows: dict[str, dict[str, Any]] = {}
    for name, t in tallies.items():
        ours = t.forwards > 0
        rows[name] = {
            "tokens_per_s": t.tps,
            "tau": t.new_tokens / t.forwards if ours else t.engine_tau,
            "speedup_vs_ours_ar": t.tps / ar.tps if ar.tps else None,
            "speedup_vs_hf_generate": t.tps / hfg.tps if hfg.tps else None,
            "draft_frac": t.draft / t.wall if ours else None,
            "target_forward_frac": t.forward / t.wall if ours else None,
            "overhead_frac": max(0.0, 1 - (t.forward + t.draft) / t.wall) if ours else None,
            "identical_to_ours_ar": sum(a == b for a, b in zip(t.outputs, ar.outputs)),
            "identical_to_hf_generate": sum(a == b for a, b in zip(t.outputs, hfg.outputs)),
            "new_tokens": t.new_tokens,
            "rounds": {source: {"rounds": n, "tokens_per_round": tokens / n, "ms_per_round": 1e3 * sec / n,
                                "ms_per_token": 1e3 * sec / tokens}
                       for source, (n, tokens, sec) in sorted(t.rounds.items())},
        }
    base = curve["chain_1"]
    return {"methods": rows, "verify_ms": curve, "verify_ratio": {k: v / base for k, v in curve.items()}}


def _rounds_table(result: dict[str, Any]) -> list[str]:
    """Our methods' rounds (after prefill) by who drafted them ("none": a plain one-token step, all of our AR's):
    where each method's time per committed token comes from."""
    rows = [(name, source, r) for name, m in result["methods"].items() for source, r in (m.get("rounds") or {}).items()]
    if all(name == "ours_ar" for name, _, _ in rows):
        return []
    return ["", "Rounds by who drafted them (wall time from drafting to commit):", "",
            "| method | drafted by | rounds | tokens / round | ms / round | ms / token |", "|---|---|---|---|---|---|"] + [
        f"| {name} | {source} | {r['rounds']} | {r['tokens_per_round']:.2f} | {r['ms_per_round']:.1f} | {r['ms_per_token']:.1f} |"
        for name, source, r in rows]


def format_table(result: dict[str, Any]) -> str:
    def f(v, spec):
        return "–" if v is None else format(v, spec)

    n = result["prompts"]
    lines = [
        f"## Decode benchmark: {n} prompts, up to {result['max_new_tokens']} new tokens, {result['threads']} threads",
        "",
        "| method | tokens/s | τ | vs our AR | vs HF generate | draft | target fwd | overhead | = our AR | = HF generate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["methods"].items():
        lines.append(
            f"| {name} | {r['tokens_per_s']:.1f} | {f(r['tau'], '.2f')} | {f(r['speedup_vs_ours_ar'], '.2f')}× | "
            f"{f(r['speedup_vs_hf_generate'], '.2f')}× | {f(r['draft_frac'], '.0%')} | {f(r['target_forward_frac'], '.0%')} | "
            f"{f(r['overhead_frac'], '.0%')} | {r['identical_to_ours_ar']}/{n} | {r['identical_to_hf_generate']}/{n} |"
        )
    lines += _rounds_table(result)
    if result.get("engines", {}).get("vllm"):
        lines += ["", f"vllm_* rows: vLLM {result['engines']['vllm']} (CPU build, eager, its own environment) on the same "
                  "prompts and thread count, after our methods; their τ is vLLM's own over drafting rounds "
                  "(1 + accepted / drafts), ours counts every target forward."]
    if result.get("engines", {}).get("llama.cpp"):
        lines += ["", f"llamacpp_ar: llama.cpp ({result['engines']['llama.cpp']}) on the same prompts and thread "
                  "count, after our methods, computing with the GGUF's quantized kernels (ours run its weights "
                  "dequantized to the target dtype), so its outputs follow ours until the first near-tie."]
    lines += ["", "Verify cost of one target forward (256-token context):", "",
              "| new tokens | " + " | ".join(k.replace("chain_", "").replace("tree_16", "tree 16") for k in result["verify_ms"]) + " |",
              "|---|" + "---|" * len(result["verify_ms"]),
              "| ms | " + " | ".join(f"{v:.1f}" for v in result["verify_ms"].values()) + " |",
              "| × one token | " + " | ".join(f"{v:.2f}" for v in result["verify_ratio"].values()) + " |"]
    if "verify_ms_plain" in result:
        lines += ["| ms, plain matmuls | " + " | ".join(f"{v:.1f}" for v in result["verify_ms_plain"].values()) + " |",
                  "| × one token, plain | " + " | ".join(f"{v:.2f}" for v in result["verify_ratio_plain"].values()) + " |",
                  "", "The first two rows use the engine's oneDNN-prepacked weights; the last two the plain "
                  "torch matmuls."]
    if "memory_bound" in result:
        m = result["memory_bound"]
        lines += ["", f"One-token forward: {m['one_row_ms']:.1f} ms ({1e3 / m['one_row_ms']:.1f} tokens/s). Memory "
                  f"bound: {m['weight_mb']:.0f} MB of weights read once per token at {m['read_gb_per_s']:.1f} GB/s "
                  f"(measured read bandwidth) = {m['bound_ms']:.1f} ms ({m['bound_tokens_per_s']:.1f} tokens/s); the "
                  f"forward takes {m['one_row_vs_bound']:.2f}× that."]
    return "\n".join(lines) + "\n"


def bench_extract(cfg: Config, sequences: int = 16, threads: int | None = None) -> dict[str, Any]:
    """`deepspec bench extract`: feature extraction against a plain target forward over the same tokens.

    Per sequence, interleaved: the plain forward (next-token logits, nothing kept), HF's own forward with
    `output_hidden_states` (how a naive extractor gets features), and our extraction (captured layers +
    normed final state converted to the cache dtype, plus its share of writing the shard)."""
    import tempfile

    from safetensors.torch import save_file

    from deepspec.layout import train_data_file
    from deepspec.features.extract import DTYPES, capture, feature_layers

    src = train_data_file(cfg)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: training data missing; run `deepspec prepare --train` first")
    rows = io.read_jsonl(src)[:sequences]
    torch.set_num_threads(threads or cfg.eval.threads or os.cpu_count() or 1)
    target = load_target(cfg.target.model, cfg.target.dtype, cfg.target.backend, max(cfg.target.max_len, cfg.features.max_len))
    be, hf = target.backend, target.loaded.model
    layers = feature_layers(cfg, be.config.num_hidden_layers) or [2]
    dtype = DTYPES[cfg.features.dtype]
    seqs = [r["input_ids"][: cfg.features.max_len] for r in rows]
    times = {"plain_forward": 0.0, "hf_output_hidden_states": 0.0, "extract": 0.0}
    kept = []
    with tracking.stage_run(cfg, "bench", "bench extract") as run:
        capture(be, seqs[0], layers)  # warm-up
        for ids in tqdm(seqs, desc="bench extract", unit="seq", dynamic_ncols=True):
            x = torch.tensor(ids)
            t0 = time.perf_counter()
            be.cache.reset()
            be.forward(x, torch.arange(len(ids)), logits_rows=slice(-1, None))
            be.cache.reset()
            t1 = time.perf_counter()
            with torch.inference_mode():
                hf(input_ids=x[None], output_hidden_states=True, use_cache=False)
            t2 = time.perf_counter()
            kept.append(capture(be, ids, layers).to(dtype))
            times["extract"] += time.perf_counter() - t2
            times["plain_forward"] += t1 - t0
            times["hf_output_hidden_states"] += t2 - t1
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            save_file({"hidden": torch.cat(kept)}, f"{tmp}/shard.safetensors")
            times["extract"] += time.perf_counter() - t0
        tokens = sum(len(s) for s in seqs)
        result = {"sequences": len(seqs), "tokens": tokens, "layers": layers, "dtype": cfg.features.dtype,
                  "threads": torch.get_num_threads(),
                  "tokens_per_s": {k: tokens / v for k, v in times.items()},
                  "extract_vs_plain_forward": times["plain_forward"] / times["extract"]}
        text = "\n".join([
            f"## Feature extraction benchmark: {len(seqs)} sequences, {tokens} tokens, layers {layers} + final, "
            f"{cfg.features.dtype}, {result['threads']} threads", "",
            "| path | tokens/s | vs plain forward |", "|---|---|---|",
            *[f"| {k} | {tokens / v:.0f} | {times['plain_forward'] / v:.2f}× |" for k, v in times.items()],
            "", "Extraction includes converting to the cache dtype and writing the shard.", ""])
        out = bench_dir(cfg)
        io.write_text(out / "extract.md", text)
        io.write_json(out / "extract.json", result)
        run.metrics({f"tokens_per_s.{k}": v for k, v in result["tokens_per_s"].items()}
                    | {"extract_vs_plain_forward": result["extract_vs_plain_forward"]})
        run.artifact(out / "extract.md")
        print(text)
    return result


def bench_regenerate(cfg: Config, prompts: int = 32, max_new_tokens: int | None = None,
                     threads: int | None = None) -> dict[str, Any]:
    """`deepspec bench regenerate`: HF's batched `generate` against our lean forward over a batched KV
    cache, on the same training prompts (the first planned batch) and settings, greedy. Reports generated
    tokens/s of each and how many answers are token-identical (batched fp32 matmuls may round differently,
    so a few answers can part ways late; both are the target's own greedy text)."""
    from deepspec.data.tasks import chat_ids
    from deepspec.data.regenerate import hf_generate_batch, load_conversations, plan_batches

    td = cfg.train_data.model_copy(update={"max_samples": prompts, "dataset_samples": 0, "batch_size": prompts})
    new = max_new_tokens or td.max_new_tokens
    torch.set_num_threads(threads or cfg.eval.threads or os.cpu_count() or 1)
    target = load_target(cfg.target.model, cfg.target.dtype, "hf", cfg.target.max_len)
    model, tok = target.loaded.model, target.tokenizer
    convs = load_conversations(td)[0]
    batch = plan_batches(convs, td, tok, cfg.target.chat_template_kwargs)[0][0]
    ids = [chat_ids(tok, [{"role": "user", "content": c["turns"][0]}], cfg.target.chat_template_kwargs) for c in batch]
    pad = tok.pad_token_id if tok.pad_token_id is not None else target.loaded.eos_ids[0]
    lean = LeanLlama(model, max(len(p) for p in ids) + new + 1)
    with tracking.stage_run(cfg, "bench", "bench regenerate") as run:
        lean.generate_batch(ids[:2], 4, target.loaded.eos_ids)  # warm-up
        t0 = time.perf_counter()
        hf = hf_generate_batch(model, ids, new, target.loaded.eos_ids, pad, 0.0, 0)
        t1 = time.perf_counter()
        ours = lean.generate_batch(ids, new, target.loaded.eos_ids)
        t2 = time.perf_counter()
        result = {"prompts": len(ids), "max_new_tokens": new, "threads": torch.get_num_threads(),
                  "prompt_tokens": sum(map(len, ids)),
                  "tokens_per_s": {"hf_generate": sum(map(len, hf)) / (t1 - t0), "lean_batched": sum(map(len, ours)) / (t2 - t1)},
                  "seconds": {"hf_generate": t1 - t0, "lean_batched": t2 - t1},
                  "identical_answers": sum(a == b for a, b in zip(hf, ours))}
        result["speedup"] = result["seconds"]["hf_generate"] / result["seconds"]["lean_batched"]
        text = "\n".join([
            f"## Regeneration benchmark: {len(ids)} training prompts in one batch, up to {new} new tokens, greedy, "
            f"{result['threads']} threads", "",
            "| path | seconds | generated tokens/s | vs HF generate |", "|---|---|---|---|",
            *[f"| {k} | {result['seconds'][k]:.1f} | {v:.0f} | {result['seconds']['hf_generate'] / result['seconds'][k]:.2f}× |"
              for k, v in result["tokens_per_s"].items()],
            "", f"{result['identical_answers']} of {len(ids)} answers token-identical between the two.", ""])
        out = bench_dir(cfg)
        io.write_text(out / "regenerate.md", text)
        io.write_json(out / "regenerate.json", result)
        run.metrics({f"tokens_per_s.{k}": v for k, v in result["tokens_per_s"].items()} | {"speedup": result["speedup"]})
        run.artifact(out / "regenerate.md")
        print(text)
    return result
