"""`deepspec bench loss`: peak memory and time of one forward + backward of the soft-target losses, naive
([N, V] log-probabilities) against fused (the logits and two numbers per row), each in a fresh process.

CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak resident set above its baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

_ONE = """
import json, resource, sys, time, torch
from deepspec.kernels.soft_loss import reference_losses, soft_target_losses
variant, n, v, k, dtype, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
torch.manual_seed(0)
idx = torch.randint(0, v, (n, k), device=device)
p = torch.softmax(torch.randn(n, k, device=device), -1)
h = torch.randn(n, 64, device=device, dtype=getattr(torch, dtype))
w = (torch.randn(64, v, device=device, dtype=getattr(torch, dtype)) * 0.1).requires_grad_(True)
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
logits = h @ w  # [N, V]: what a drafter's head writes
ce, l1 = (reference_losses if variant == "naive" else soft_target_losses)(logits, idx, p)
(ce.sum() + l1.sum()).backward()
if device == "cuda":
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
print(json.dumps({"peak_bytes": peak, "seconds": time.perf_counter() - t0}))
"""


def bench_loss(rows: int = 3584, vocab: int = 151_936, k: int = 64, dtype: str = "float32",
               device: str = "cpu") -> list[dict[str, Any]]:
    """One row per variant: peak memory over the inputs (GiB) and seconds for forward + backward."""
    out = []
    logits_gib = rows * vocab * {"float32": 4, "bfloat16": 2, "float16": 2}[dtype] / 2**30
    for variant in ("naive", "fused"):
        done = subprocess.run([sys.executable, "-c", _ONE, variant, str(rows), str(vocab), str(k), dtype, device],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"bench loss ({variant}): {done.stderr.strip().splitlines()[-1]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        out.append({"loss": variant, "rows": rows, "vocab": vocab, "dtype": dtype, "device": device,
                    "peak GiB": round(r["peak_bytes"] / 2**30, 2), "peak / logits": round(r["peak_bytes"] / 2**30 / logits_gib, 2),
                    "seconds": round(r["seconds"], 2)})
    return out
