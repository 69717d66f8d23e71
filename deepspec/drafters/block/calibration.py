"""Sequential temperature scaling of DSpark's confidence head, fitted on held-out data.

Draft j's confidence is read as P(draft j accepted | drafts before it accepted), so each position is
fitted on the blocks whose earlier drafts were all accepted (teacher-forced, greedy acceptance: the
draft's argmax equals the target's). One temperature per position divides the logit; it is chosen on
one half of the validation split and judged on the other (ECE, Brier, AUROC, reliability bins).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

GRID = torch.exp(torch.linspace(-2.5, 2.5, 201))  # temperatures 0.08 .. 12


def conditional_events(logits: Tensor, hit: Tensor, valid: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per draft j: (logits, accepted) of blocks whose drafts before j were all accepted and j is scored."""
    before = torch.ones_like(hit[:, :1])
    alive = torch.cat([before, hit[:, :-1].long().cumprod(-1).bool()], dim=1)
    keep = alive & valid
    return [(logits[keep[:, j], j], hit[keep[:, j], j].float()) for j in range(hit.shape[1])]


def _nll(z: Tensor, y: Tensor) -> Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y.expand_as(z), reduction="none").mean(-1)


def fit_temperatures(events: list[tuple[Tensor, Tensor]]) -> list[float]:
    temps = []
    for z, y in events:
        if z.numel() < 10 or y.min() == y.max():
            temps.append(1.0)
            continue
        losses = _nll(z[None, :] / GRID[:, None], y[None, :])
        temps.append(float(GRID[int(losses.argmin())]))
    return temps


def auroc(p: Tensor, y: Tensor) -> float | None:
    pos, neg = p[y > 0.5], p[y <= 0.5]
    if pos.numel() == 0 or neg.numel() == 0:
        return None
    ranks = torch.cat([pos, neg]).argsort().argsort().double() + 1
    return float((ranks[: pos.numel()].sum() - pos.numel() * (pos.numel() + 1) / 2) / (pos.numel() * neg.numel()))


def reliability(p: Tensor, y: Tensor, bins: int = 10) -> dict[str, Any]:
    """ECE, Brier and the reliability bins (mean confidence, accuracy, count) of probabilities p vs outcomes y."""
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(p, edges[1:-1])
    rows, ece = [], 0.0
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        if n:
            conf, acc = float(p[m].mean()), float(y[m].mean())
            ece += n / p.numel() * abs(conf - acc)
            rows.append({"bin": b, "confidence": conf, "accuracy": acc, "count": n})
    return {"ece": ece, "brier": float(((p - y) ** 2).mean()), "auroc": auroc(p, y), "bins": rows, "n": int(p.numel())}


def calibrate(fit: dict[str, Tensor], held_out: dict[str, Tensor]) -> dict[str, Any]:
    """Temperatures fitted on `fit`, and per-position plus pooled metrics on `held_out`, before and after."""
    temps = fit_temperatures(conditional_events(fit["confidence"], fit["hit"], fit["valid"]))
    ev = conditional_events(held_out["confidence"], held_out["hit"], held_out["valid"])
    per = []
    pooled = {"before": ([], []), "after": ([], [])}
    for j, ((z, y), t) in enumerate(zip(ev, temps)):
        if z.numel() == 0:
            continue
        before, after = torch.sigmoid(z), torch.sigmoid(z / t)
        per.append({"draft": j, "temperature": t, "n": int(z.numel()), "accept_rate": float(y.mean()),
                    "before": {k: v for k, v in reliability(before, y).items() if k != "bins"},
                    "after": {k: v for k, v in reliability(after, y).items() if k != "bins"}})
        for key, p in (("before", before), ("after", after)):
            pooled[key][0].append(p)
            pooled[key][1].append(y)
    overall = {k: reliability(torch.cat(p), torch.cat(y)) for k, (p, y) in pooled.items() if p}
    return {"temperatures": temps, "per_draft": per, "pooled": overall}
