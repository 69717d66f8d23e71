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

from deepspec.devices import bf16_autocast, on

SHAPES = {  # Qwen3-8B's, and a tiny one for the CPU
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151_936, seqs=4, seq_len=1024, loss_rows=3584,
               block_ids=[1, 9, 17, 25, 33], eagle_vocab=32_768),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=2048, seqs=2, seq_len=96, loss_rows=64,
                 block_ids=[0, 1, 2], eagle_vocab=512),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any], reps: int = 5) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
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
    hs_ids = [k + 1 for k in shape["block_ids"]]
    seqs = []
    g = torch.Generator().manual_seed(0)
    for _ in range(shape["seqs"]):
        ids = torch.randint(0, shape["vocab_size"], (shape["seq_len"],), generator=g).to(device)
        with torch.no_grad():
            hs = model(ids[None], output_hidden_states=True).hidden_states
        seqs.append({"input_ids": ids, "hidden": torch.cat([hs[i][0] for i in hs_ids], -1),
                     "final": hs[-1][0], "loss_mask": torch.ones_like(ids, dtype=torch.bool)})
    return seqs


def _train_rows(model, shape, device, steps: int) -> list[dict[str, Any]]:
    from deepspec.drafters.registry import KINDS
    from deepspec.training.distributed import Trainable, World
    from deepspec.training.targets import soft_targets, training_targets

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
    }
    rows = []
    for name, (fields, vocab) in recipes.items():
        row: dict[str, Any] = {"part": f"train {name}"}
        try:
            kind = KINDS[name]
            dc = kind.config(kind=name, **fields)
            draft_ids = torch.arange(vocab)
            lookup = torch.full((V,), -1, dtype=torch.long)
            lookup[draft_ids] = torch.arange(vocab)
            labels = [training_targets({k: v.cpu() for k, v in c.items()}, s["loss_mask"].cpu(), lookup, "all")
                      for c, s in zip(cached, seqs)]
            labels = [{k: v.to(device) for k, v in t.items()} for t in labels]
            batch = [{k: v for k, v in s.items() if k != "final"} for s in seqs]
            with on(device):
                drafter = kind.new_drafter(dc, model, None, kind.feature_layers(dc, model.config.num_hidden_layers, name),
                                           draft_ids, [], {}, name)
            trainable = Trainable(drafter.float(), "none", World(device=device), dc.train, 1, amp)
            _reset_peak(device)
            losses, times = [], []
            for step in range(steps):
                t0 = time.perf_counter()
                with bf16_autocast(device, amp), on(device):
                    stats = kind.run_batch(trainable, dc, batch, labels, True, torch.Generator().manual_seed(step))
                trainable.step(dc.train.lr)
                _sync(device)
                times.append(time.perf_counter() - t0)
                losses.append(stats["loss"])
            ok = all(torch.isfinite(torch.tensor(losses)))
            row.update(result="ok" if ok else "non-finite loss", detail=f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
                       f"{sum(p.numel() for p in drafter.parameters() if p.requires_grad) / 1e6:.2f}M trainable",
                       ms=round(1e3 * min(times[1:] or times), 1), peak_gib=_peak_gib(device))
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


def gpu_check(shape_name: str = "8b", steps: int = 4) -> list[dict[str, Any]]:
    """The table's rows: device, each drafter kind's bf16 training steps, the fused loss, the verify curve."""
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
    rows += _train_rows(model, shape, device, steps)
    rows.append(_loss_row(shape, device))
    rows.append(_verify_row(model, device))
    return rows
