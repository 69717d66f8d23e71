"""How greedy losslessness is judged: byte equality where the arithmetic allows it, near-ties elsewhere.

In float32 on the CPU a verify forward over k rows and k single-row forwards give the same logits
(the lean backend is built for it), so a speculative method's greedy output must equal the
autoregressive one token for token. In bf16, or on a GPU, the kernels for k rows and for one row
round differently, and a logit pair that is tied to within those roundings can flip. There each
committed token is still its own round's argmax; what is checked is that a divergence from the
autoregressive output happens only at a near-tie: a plain forward over the common prefix is rerun and
the gap between the two tokens' logits there must be at most `eval.tie_margin`.
"""

from __future__ import annotations

from typing import Any

import torch

EXACT, NEAR_TIE = "exact", "near_tie"


def lossless_rule(device: torch.device, dtype: torch.dtype) -> str:
    """`exact` for float32/64 on the CPU, `near_tie` on a GPU or in reduced precision."""
    full = dtype in (torch.float32, torch.float64)
    return EXACT if full and torch.device(device).type == "cpu" else NEAR_TIE


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where two token lists differ (the shorter one's length if one is a prefix), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def divergence(backend, prompt: list[int], out: list[int], ref: list[int]) -> dict[str, Any] | None:
    """Where `out` first leaves `ref` (both continuations of `prompt`) and how close the target's logits
    of the two tokens are there, from one plain forward over the common prefix. None when they agree.
    Resets the backend's cache."""
    at = first_difference(out, ref)
    if at is None or at >= min(len(out), len(ref)):  # equal, or one stopped early: no token pair to weigh
        return None if at is None else {"at": at, "tokens": None, "logit_gap": None, "top2_gap": None}
    ids = prompt + ref[:at]
    backend.cache.reset()
    logits, _ = backend.forward(torch.tensor(ids, device=backend.device), torch.arange(len(ids), device=backend.device),
                                logits_rows=slice(len(ids) - 1, len(ids)))
    backend.cache.reset()
    row = logits[0].float()
    top2 = row.topk(2).values
    return {"at": at, "tokens": [out[at], ref[at]], "logit_gap": float((row[out[at]] - row[ref[at]]).abs()),
            "top2_gap": float(top2[0] - top2[1])}


def judge(divergences: list[dict[str, Any] | None], mismatched_turns: int, rule: str, tie_margin: float) -> dict[str, Any]:
    """The lossless verdict from each sample's first divergence (None where the sample matched)."""
    found = [d for d in divergences if d is not None]
    out: dict[str, Any] = {"rule": rule, "mismatches": mismatched_turns, "diverged_samples": len(found)}
    if rule == EXACT:
        out["passed"] = mismatched_turns == 0
        return out
    gaps = [d["logit_gap"] for d in found]
    out.update(tie_margin=tie_margin, max_logit_gap=max((g for g in gaps if g is not None), default=0.0),
               passed=all(g is not None and g <= tie_margin for g in gaps))
    return out
