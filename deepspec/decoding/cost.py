"""The verify-cost curve: what one target forward costs as the number of new tokens grows, and the draft size
chosen against it.

Draft sizes are cut where expected committed tokens per second peak (a block's drafts, an EAGLE tree's nodes),
and the decode benchmark reports the curve, so both live with decoding rather than with any one drafter.
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


def proposer_verify_ms(backend, max_rows: int) -> list[float]:
    """This machine's verify cost of 1 .. `max_rows` new rows (ms), as a proposer's cost cut reads it."""
    sizes = tuple(range(1, max_rows + 1))
    curve = verify_cost_curve(backend, context=128, sizes=sizes, reps=5)
    return [curve[f"chain_{n}"] for n in sizes]


def best_cut(accept: list[float], draft_ms: float, verify_ms: list[float], least: int = 0) -> int:
    """How many drafts to verify: argmax_n (1 + sum_{i<n} accept_i) / (draft_ms + verify_ms[n]), n >= `least`.

    `accept` are the drafts' probabilities of being accepted, each no larger than the one before (a chain's running
    product; an ancestor-closed tree's nodes by falling score), so every prefix is a draft the verifier can take;
    `verify_ms[k]` is the cost of k + 1 rows, and longer drafts than the curve reaches cost its last entry's.
    """
    best, best_rate, expected = least, -1.0, 1.0 + sum(accept[:least])
    for n in range(least, len(accept) + 1):
        if n > least:
            expected += accept[n - 1]
        rate = expected / (draft_ms + verify_ms[min(n, len(verify_ms) - 1)])
        if rate > best_rate:
            best, best_rate = n, rate
    return best
