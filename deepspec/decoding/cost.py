"""The verify-cost curve: what one target forward costs as the number of new tokens grows.

Draft lengths are chosen against it (a block cut where committed tokens per second peak), and the decode
benchmark reports it, so it lives with decoding rather than with either user.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from deepspec.decoding.timing import synchronize
from deepspec.decoding.tree import DraftTree


def verify_cost_curve(backend, context: int = 256, sizes=(1, 2, 4, 8, 16, 32, 64), reps: int = 7) -> dict[str, float]:
    """Median ms of one target forward over n new tokens at a `context`-token prefix; plus a 16-node tree."""
    cache = backend.cache
    cache.reset()
    backend.forward(torch.randint(0, 1000, (context,)), torch.arange(context))
    cache.commit(context)
    out: dict[str, float] = {}

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        synchronize(backend.device)  # CUDA returns before it finishes
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            synchronize(backend.device)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    for n in sizes:
        ids = torch.randint(0, 1000, (n,))
        out[f"chain_{n}"] = timed(lambda ids=ids: backend.forward(ids, torch.arange(context, context + len(ids))))
    tree = DraftTree(list(range(100, 116)), [-1, -1, -1, -1, 0, 0, 1, 1, 2, 4, 4, 6, 8, 9, 10, 12])
    ids = torch.tensor([5] + tree.tokens)
    mask = tree.attention_mask(context, backend.dtype)
    out["tree_16"] = timed(lambda: backend.forward(ids, tree.positions(context), mask=mask))
    cache.reset()
    return out
