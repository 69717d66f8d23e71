"""`deepspec bench gpu`: the prepared check for a CUDA device, one table in a few minutes, no download.

On a randomly initialised target of Qwen3-8B's shape (bf16), it trains each drafter kind for a few
steps (EAGLE-3 over a 32k draft vocabulary, DFlash / DSpark over the full 151,936), compares the Triton
loss with the torch path at DSpark's [3,584 x 151,936], and measures the target's verify-cost curve.
Each part reports its own failure in the table instead of stopping the others. `--shape tiny` runs
the same code on the CPU in seconds (the test suite does), so the script is known to work before a
device is lent.
"""

from __future__ import annotations

import time
import traceback
from typing import Any, Callable

import torch

from deepspec.decoding.timing import synchronize
from deepspec.devices import bf16_autocast, on

SHAPES = {  # Qwen3-8B's, and a tiny one for the CPU
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151_936, seqs=4, seq_len=1024, loss_rows=3584,
               block_ids=[1, 9, 17, 25, 33], eagle_vocab=32_768),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=2048, seqs=2, seq_len=96, loss_rows=64,
                 block_ids=[0, 1, 2], eagle_vocab=512),
}


def _timed(device: torch.device, fn: Callable[[], Any], reps: int = 5) -> float:
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / reps * 1e3


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _target(shape: dict[str, Any], device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size")
    cfg = AutoConfig.for_model("qwen3", **{k: shape[k] for k in keys}, max_position_embeddings=4096,
                               tie_word_embeddings=False)
    torch.manual_seed(0)
    with on(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()


def _data(model, shape: dict[str, Any], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Random sequences with every hidden state ([T, layers + 1, H], as HF numbers them): each kind reads the
    columns its `feature_layers` names, as the feature cache serves them."""
    seqs = []
    g = torch.Generator().manual_seed(0)
    for _ in range(shape["seqs"]):
        ids = torch.randint(0, shape["vocab_size"], (shape["seq_len"],), generator=g).to(device)
        with torch.no_grad():
            hs = model(ids[None], output_hidden_states=True).hidden_states
        seqs.append({"input_ids": ids, "states": torch.stack([h[0] for h in hs], 1), "final": hs[-1][0],
                     "loss_mask": torch.ones_like(ids, dtype=torch.bool)})
    return seqs


def _train_rows(model, shape, device, steps: int, trained: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
    """Each drafter kind's training steps; the drafters that trained go to `trained` (the decode rows use them)."""
    from deepspec.drafters.registry import KINDS
    from deepspec.training.distributed import Trainable, World
    from deepspec.training.targets import soft_targets, target_to_draft, training_targets

    amp = device.type == "cuda"
    seqs = _data(model, shape, device)
    head = model.get_output_embeddings().weight.detach().float()
    cached = soft_targets(seqs, head, k=64)
    V = shape["vocab_size"]
    hs_ids = [k + 1 for k in shape["block_ids"]]
    block = {"layers": shape["block_ids"], "num_layers": 5, "num_anchors": 64, "loss_gamma": 4.0, "mask_token_id": V - 1}
    recipes = {  # the paper profiles' shapes: (drafter config, draft vocabulary)
        "eagle3": ({"layers": hs_ids, "ttt_length": 7}, shape["eagle_vocab"]),
        "dflash": (block, V),
        "dspark": ({**block, "markov_rank": 256}, V),
        "medusa": ({"heads": 4}, shape["eagle_vocab"]),
    }
    rows = []
    for name, (fields, vocab) in recipes.items():
        row: dict[str, Any] = {"part": f"train {name}"}
        try:
            kind = KINDS[name]
            dc = kind.config(kind=name, **fields)
            draft_ids = torch.arange(vocab)
            lookup = target_to_draft(draft_ids, V)
            labels = [training_targets({k: v.cpu() for k, v in c.items()}, s["loss_mask"].cpu(), lookup, "all")
                      for c, s in zip(cached, seqs)]
            labels = [{k: v.to(device) for k, v in t.items()} for t in labels]
            layers = kind.feature_layers(dc, model.config.num_hidden_layers, name)
            batch = [{"input_ids": s["input_ids"], "loss_mask": s["loss_mask"], "hidden": s["states"][:, layers]}
                     for s in seqs]
            with on(device):
                drafter = kind.new_drafter(dc, model, None, layers, draft_ids, [], {}, name)
            trainable = Trainable(drafter.float(), "none", World(device=device), dc.train, 1, amp)
            _reset_peak(device)
            losses, times = [], []
            for step in range(steps):
                t0 = time.perf_counter()
                with bf16_autocast(device, amp), on(device):
                    stats = kind.run_batch(trainable, dc, batch, labels, True, torch.Generator().manual_seed(step))
                trainable.step(dc.train.lr)
                synchronize(device)
                times.append(time.perf_counter() - t0)
                losses.append(stats["loss"])
            ok = all(torch.isfinite(torch.tensor(losses)))
            row.update(result="ok" if ok else "non-finite loss", detail=f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
                       f"{sum(p.numel() for p in drafter.parameters() if p.requires_grad) / 1e6:.2f}M trainable",
                       ms=round(1e3 * min(times[1:] or times), 1), peak_gib=_peak_gib(device))
            trained[name] = drafter.eval()
        except Exception as err:  # one part's failure must not hide the others
            row.update(result="failed", detail=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
            traceback.print_exc()
        rows.append(row)
    return rows


def _loss_row(shape, device) -> dict[str, Any]:
    from deepspec.kernels.soft_loss import soft_target_losses, triton_usable

    row: dict[str, Any] = {"part": f"fused loss [{shape['loss_rows']} x {shape['vocab_size']}]"}
    try:
        n, V, k = shape["loss_rows"], shape["vocab_size"], 64
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn(n, V, device=device, generator=g)
        idx = torch.randint(0, V, (n, k), device=device, generator=g)
        p = torch.softmax(torch.randn(n, k, device=device, generator=g), -1)
        results = {}
        for use_triton in ([True, False] if triton_usable(logits) else [False]):
            x = logits.clone().requires_grad_(True)
            ce, l1 = soft_target_losses(x * 1.0, idx, p, use_triton=use_triton)
            (ce.sum() + l1.sum()).backward()
            results[use_triton] = (ce.detach(), l1.detach(), x.grad)
            ms = _timed(device, lambda: (lambda c, d: (c.sum() + d.sum()).backward())(
                *soft_target_losses(logits.clone().requires_grad_(True) * 1.0, idx, p, use_triton=use_triton)), reps=3)
            row[f"ms_{'triton' if use_triton else 'torch'}"] = round(ms, 1)
        if True in results:
            rel = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in zip(results[True], results[False]))
            row.update(result="ok" if rel < 1e-4 else "mismatch", detail=f"triton vs torch: max rel diff {rel:.1e}")
        else:
            row.update(result="ok", detail="torch path only (Triton does not run here)")
        row["ms"] = row.get("ms_triton", row.get("ms_torch"))
    except Exception as err:
        row.update(result="failed", detail=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
        traceback.print_exc()
    return row


def _verify_row(model, device) -> dict[str, Any]:
    from deepspec.decoding.cost import verify_cost_curve
    from deepspec.models import make_backend

    row: dict[str, Any] = {"part": "verify cost (ms per target forward at a 512-token context)"}
    try:
        with on(device):
            curve = verify_cost_curve(make_backend(model, "auto", 2048), context=512)
        row.update(result="ok", detail=", ".join(f"{k}: {ms:.1f}" for k, ms in curve.items()), ms=round(curve["chain_1"], 1))
    except Exception as err:
        row.update(result="failed", detail=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
        traceback.print_exc()
    return row


def _graphed_verify_row(model, device, context: int = 512, widths=(1, 8, 16)) -> dict[str, Any]:
    """The verify cost with each chain width's forward captured once as a CUDA graph and replayed: what the
    host's launch overhead costs the engine (the paper's chain of 7 verifies 8 rows)."""
    from deepspec.models import make_backend

    row: dict[str, Any] = {"part": f"verify cost with CUDA graphs (ms at a {context}-token context)"}
    if device.type != "cuda":
        row.update(result="skipped", detail="CUDA graphs need a CUDA device")
        return row
    try:
        with on(device):
            backend = make_backend(model, "lean", 2048)
            backend.forward(torch.randint(0, 1000, (context,)), torch.arange(context))
            backend.cache.commit(context)
            parts = []
            for w in widths:
                ids, pos = torch.randint(0, 1000, (w,)), torch.arange(context, context + w)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        backend.forward(ids, pos)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    backend.forward(ids, pos)
                eager, replay = _timed(device, lambda: backend.forward(ids, pos), 20), _timed(device, graph.replay, 20)
                parts.append(f"chain_{w}: {eager:.2f} eager / {replay:.2f} graph")
        row.update(result="ok", detail=", ".join(parts), ms=round(replay, 2))
    except Exception as err:
        row.update(result="failed", detail=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
        traceback.print_exc()
    return row


# How each drafter kind's method decodes in the check: the paper's chain of 7.
CHAIN_OF_7 = {"eagle3": {"kind": "eagle3", "depth": 7, "top_k": 1, "total_tokens": 7}, "dflash": {"kind": "block"},
              "dspark": {"kind": "block"}, "medusa": {"kind": "medusa"}}


def _decode(backend, proposers: dict[str, Any], prompts: list[list[int]], new_tokens: int,
            label: str) -> list[dict[str, Any]]:
    """Every proposer against the autoregressive run on `backend`: tau, tokens/s, and losslessness by the rule
    the device and dtype call for (`evaluation.lossless`), with the largest logit gap at a divergence."""
    from deepspec.config import EvalConfig
    from deepspec.decoding.engine import Engine
    from deepspec.evaluation.lossless import divergence, judge, lossless_rule

    engine = Engine(backend, stop_ids=[], max_nodes=64)
    rule = lossless_rule(backend.device, backend.dtype)

    def run(proposer) -> tuple[list[list[int]], float, int, float]:
        outs, tokens, forwards, seconds, syncs = [], 0, 0, 0.0, 0
        for p in prompts:
            engine.generate(p, 8, proposer)  # warm-up
            gen = engine.generate(p, new_tokens, proposer)
            outs.append(gen.tokens)
            tokens, forwards, seconds = tokens + len(gen.tokens), forwards + gen.forwards, seconds + gen.wall_time
        if backend.device.type == "cuda":  # host syncs per round, as torch counts them
            import warnings

            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    gen = engine.generate(prompts[0], 32, proposer)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            syncs = len(caught) / max(gen.forwards, 1)
        return outs, tokens / seconds, forwards, syncs

    rows = []
    try:
        ref, ar_tps, _, ar_syncs = run(None)
        rows.append({"part": f"decode ar ({label})", "result": "ok", "detail": f"{ar_tps:.1f} tok/s"
                     + (f", {ar_syncs:.1f} host syncs per round" if ar_syncs else ""), "ms": round(1e3 / ar_tps, 2)})
    except Exception as err:
        traceback.print_exc()
        return [{"part": f"decode ar ({label})", "result": "failed", "detail": f"{type(err).__name__}: {err}"[:200]}]
    for name, proposer in proposers.items():
        row: dict[str, Any] = {"part": f"decode {name} ({label})"}
        try:
            outs, tps, forwards, syncs = run(proposer)
            exact = sum(o == r for o, r in zip(outs, ref))
            verdict = judge([divergence(backend, p, o, r) for o, r, p in zip(outs, ref, prompts)], len(ref) - exact,
                            rule, EvalConfig().tie_margin)
            tau = sum(map(len, outs)) / forwards
            row.update(result="ok" if verdict["passed"] else "NOT LOSSLESS",
                       detail=f"tau {tau:.2f}, {tps:.1f} tok/s ({tps / ar_tps:.2f}x ar), {exact}/{len(ref)} outputs "
                              f"equal, rule {rule}" + (f", largest logit gap at a divergence {verdict['max_logit_gap']:.3f}"
                                                       if verdict.get("diverged_samples") else "")
                              + (f", {syncs:.1f} host syncs per round" if syncs else ""),
                       ms=round(1e3 / tps, 2))
        except Exception as err:
            row.update(result="failed", detail=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
            traceback.print_exc()
        rows.append(row)
    return rows


def _proposers(backend, model, trained: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """Prompt lookup, suffix decoding, a 2-layer draft of the target itself, and each trained kind (chain of 7)."""
    from types import SimpleNamespace

    from deepspec.config import NgramMethod, SuffixMethod
    from deepspec.drafters.build import build_proposer
    from deepspec.drafters.draft_lm import DraftLMProposer
    from deepspec.drafters.registry import KINDS
    from deepspec.models.lean import LeanLlama

    out: dict[str, Any] = {"pld": build_proposer(NgramMethod(kind="ngram", num_draft=7)),
                           "suffix": build_proposer(SuffixMethod(kind="suffix")),
                           "draft_lm": DraftLMProposer(LeanLlama(model, backend.cache.max_len, n_layers=2), 7, 1, 7)}
    target = SimpleNamespace(backend=backend)
    for name, drafter in trained.items():
        kind = KINDS[name]
        method = kind.method(drafter=name, **CHAIN_OF_7[name])
        with on(backend.device):
            out[name] = kind.proposer(method, drafter.to(backend.device, backend.dtype), target, 0.0, 0)
    return out


def _decode_rows(model, shape, device, trained: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
    """Every proposer on the random target (its prompts repeat a random span, so copying drafters accept)."""
    from deepspec.models import make_backend

    try:
        g = torch.Generator().manual_seed(1)
        spans = [torch.randint(0, shape["vocab_size"], (48,), generator=g).tolist() for _ in range(2)]
        prompts = [span * 3 for span in spans]
        with on(device):
            backend = make_backend(model, "lean", 1024)
            proposers = _proposers(backend, model, trained)
        return _decode(backend, proposers, prompts, 96, f"random {next(model.parameters()).dtype}".replace("torch.", ""))
    except Exception as err:
        traceback.print_exc()
        return [{"part": "decode (random target)", "result": "failed", "detail": f"{type(err).__name__}: {err}"[:200]}]


def _real_target_rows(device) -> list[dict[str, Any]]:
    """The packaged real target in float32: prompt lookup, suffix decoding and a 2-layer draft of itself
    against its autoregressive output. Skipped where the packaged model cannot be had offline."""
    from deepspec.data.tasks import chat_ids
    from deepspec.models import load_target

    try:
        target = load_target("packaged:smollm2-135m-instruct", "float32", "lean", 1024, device)
    except Exception as err:
        return [{"part": "decode (real target)", "result": "skipped",
                 "detail": f"packaged target unavailable: {type(err).__name__}: {str(err).splitlines()[0][:120]}"}]
    questions = ["Write a Python function that returns the n-th Fibonacci number, with a docstring.",
                 "Repeat this list back in reverse order: apple, pear, plum, fig, kiwi, lime."]
    prompts = [chat_ids(target.tokenizer, [{"role": "user", "content": q}]) for q in questions]
    with on(device):
        proposers = _proposers(target.backend, target.loaded.model, {})
    return _decode(target.backend, proposers, prompts, 96, "SmolLM2-135M float32")


def gpu_check(shape_name: str = "8b", steps: int = 4) -> list[dict[str, Any]]:
    """The table's rows: device, each drafter kind's bf16 training steps, the fused loss, the verify curve (eager
    and graphed), every proposer decoding on the random target and on the real small one."""
    shape = SHAPES[shape_name]
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if shape_name == "8b" and device.type != "cuda":
        raise RuntimeError("bench gpu: no CUDA device here; `--shape tiny` runs the same check on the CPU")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    t0 = time.perf_counter()
    model = _target(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = [{"part": "device", "result": "ok", "detail": f"{name}, torch {torch.__version__}, target "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M params ({shape_name}, random init) in "
             f"{time.perf_counter() - t0:.0f} s"}]
    trained: dict[str, torch.nn.Module] = {}
    rows += _train_rows(model, shape, device, steps, trained)
    rows.append(_loss_row(shape, device))
    rows.append(_verify_row(model, device))
    rows.append(_graphed_verify_row(model, device))
    rows += _decode_rows(model, shape, device, trained)
    del model, trained
    rows += _real_target_rows(device)
    return rows


def main() -> None:
    """`python -m deepspec.gpu_check [--shape 8b|tiny] [--out table.md]`: the check without MLflow (torch,
    transformers, pydantic and pandas), as a bare GPU machine runs it; the table as `bench gpu` writes it."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8b", choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = p.parse_args()
    import pandas as pd

    table = pd.DataFrame(gpu_check(args.shape, args.steps)).astype(object).fillna("").to_markdown(index=False)
    print(table)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
