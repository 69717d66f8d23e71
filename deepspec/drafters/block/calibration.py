"""Sequential calibration of DSpark's confidence head, fitted on held-out data.

Draft j's confidence is read as P(draft j accepted | drafts before it accepted), and "accepted" depends on
how the engine decodes, so there are two fits, each kept in the checkpoint and picked by the proposer:

- greedy: draft j is accepted when its argmax equals the target's. Its events are the blocks whose earlier
  drafts were all hits (teacher-forced), labelled hit or miss.
- sampled: a draft drawn from the drafter at T = 1 is accepted with probability 1 - TV(p_draft, p_target).
  Every block is an event at j, weighted by the probability that drafts before j were accepted (the
  product of their 1 - TV) and labelled with its own 1 - TV: the expectation of the sampled event.

Per draft j the calibrated confidence is sigmoid(z / T_j + b_j), fitted by weighted log-loss on one half of
the validation split and judged on the other (ECE, Brier, AUROC, reliability bins). Three maps compete per
draft: the identity, sequential temperature scaling (b = 0, the paper's) and temperature with a bias (Platt
scaling: a temperature alone cannot lift an under-confident top without lifting the bottom too). The one
with the lowest two-fold cross-validated log-loss *within the fit half* is kept, so a head that is already
calibrated (DSpark's is trained toward 1 - TV, the sampled rule's label) is left alone rather than refitted
to noise, and the held-out half stays a clean judge. Sequential temperature scaling is reported either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

RULES = ("greedy", "sampled")
MIN_EVENTS = 10.0  # weighted events below which a draft keeps the identity map
PRIOR = 1.0  # pseudo-events pulling (1/T, b) toward (1, 0): keeps thin late positions from overfitting


def conditional_events(confidence: Tensor, hit: Tensor, valid: Tensor, accept: Tensor | None, rule: str,
                       group: Tensor | None = None) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Per draft j: (logits, labels, weights, groups) of its acceptance events under `rule` (see the module
    doc). Groups are the blocks' sequences (cross-validation folds never split one); without them, every
    other block."""
    valid = valid.bool()
    if rule == "greedy":
        label = hit.float()
    else:
        if accept is None:
            raise ValueError("sampled calibration needs the per-draft acceptance probabilities (1 - TV)")
        label = accept.float().clamp(0.0, 1.0) * valid
    alive = torch.cat([torch.ones_like(label[:, :1]), label[:, :-1].cumprod(-1)], dim=1)
    weight = alive * valid
    group = torch.arange(label.shape[0]) if group is None else group
    out = []
    for j in range(label.shape[1]):
        keep = weight[:, j] > 0
        out.append((confidence[keep, j].double(), label[keep, j].double(), weight[keep, j].double(), group[keep]))
    return out


def fit_logistic(z: Tensor, y: Tensor, w: Tensor, bias: bool) -> tuple[float, float]:
    """(T, b) minimising the weighted log-loss of sigmoid(z / T + b) plus a small prior toward (1, 0).

    Newton's method on (a = 1/T, b): the loss is convex there. A non-positive slope (a head that ranks
    backwards) is clamped, so T stays a temperature."""
    if float(w.sum()) < MIN_EVENTS or float((y * w).sum()) <= 0 or float(((1 - y) * w).sum()) <= 0:
        return 1.0, 0.0
    theta = torch.tensor([1.0, 0.0], dtype=torch.float64)
    x = torch.stack([z, torch.ones_like(z)], dim=1)
    dims = 2 if bias else 1
    x, theta = x[:, :dims], theta[:dims]
    prior = theta.clone()
    reg = PRIOR * torch.eye(dims, dtype=torch.float64)
    for _ in range(50):
        p = torch.sigmoid(x @ theta)
        grad = x.T @ (w * (p - y)) + reg @ (theta - prior)
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + reg
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        theta[0] = theta[0].clamp(min=0.02)
        if float(step.abs().max()) < 1e-9:
            break
    return 1.0 / float(theta[0]), float(theta[1]) if bias else 0.0


MAPS = {"identity": None, "temperature": False, "temperature_and_bias": True}  # name -> fit_logistic's `bias`


def _log_loss(z: Tensor, y: Tensor, w: Tensor, t: float, b: float) -> float:
    return float((w * torch.nn.functional.binary_cross_entropy_with_logits(z / t + b, y, reduction="none")).sum())


def fit_maps(z: Tensor, y: Tensor, w: Tensor, group: Tensor) -> tuple[str, dict[str, tuple[float, float]]]:
    """Every map of MAPS fitted on all these events as (T, b), and the name of the one with the lowest
    two-fold cross-validated log-loss (the simpler one on a tie). Folds split by group (sequence) when
    there are two or more, since sequences differ more than blocks do; otherwise every other event."""
    groups = torch.unique(group)
    fold = (torch.searchsorted(groups, group) % 2) if groups.numel() >= 2 else torch.arange(z.numel()) % 2
    best, best_loss = "identity", None
    for name, bias in MAPS.items():
        loss = 0.0
        for f in (0, 1):
            tr, te = fold != f, fold == f
            t, b = (1.0, 0.0) if bias is None else fit_logistic(z[tr], y[tr], w[tr], bias)
            loss += _log_loss(z[te], y[te], w[te], t, b)
        if best_loss is None or loss < best_loss - 1e-9:
            best, best_loss = name, loss
    return best, {name: (1.0, 0.0) if bias is None else fit_logistic(z, y, w, bias) for name, bias in MAPS.items()}


def auroc(p: Tensor, y: Tensor, w: Tensor | None = None) -> float | None:
    """P(score of an accepted event > score of a rejected one), events weighted (soft labels count on both
    sides: w·y as accepted, w·(1 - y) as rejected); ties count one half."""
    w = torch.ones_like(p) if w is None else w
    pos, neg = (w * y).double(), (w * (1 - y)).double()
    if float(pos.sum()) <= 0 or float(neg.sum()) <= 0:
        return None
    values, inverse = torch.unique(p, return_inverse=True)  # sorted ascending
    pos_g = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inverse, pos)
    neg_g = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inverse, neg)
    below = torch.cumsum(neg_g, 0) - neg_g
    return float((pos_g * (below + 0.5 * neg_g)).sum() / (pos.sum() * neg.sum()))


def reliability(p: Tensor, y: Tensor, w: Tensor | None = None, bins: int = 10) -> dict[str, Any]:
    """ECE, Brier and the reliability bins (mean confidence, acceptance, weight) of probabilities p vs outcomes y."""
    w = torch.ones_like(p) if w is None else w
    edges = torch.linspace(0, 1, bins + 1, dtype=p.dtype)
    which = torch.bucketize(p, edges[1:-1])
    total = float(w.sum())
    rows, ece = [], 0.0
    for b in range(bins):
        m = which == b
        n = float(w[m].sum())
        if n > 0:
            conf, acc = float((w[m] * p[m]).sum()) / n, float((w[m] * y[m]).sum()) / n
            ece += n / total * abs(conf - acc)
            rows.append({"bin": b, "confidence": conf, "accuracy": acc, "count": n})
    return {"ece": ece, "brier": float((w * (p - y) ** 2).sum()) / total, "auroc": auroc(p, y, w), "bins": rows,
            "n": int(p.numel()), "weight": total}


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "bins"}


def calibrate_rule(fit: dict[str, Tensor], held_out: dict[str, Tensor], rule: str) -> dict[str, Any]:
    """One acceptance rule: the maps fitted on `fit` and their per-draft and pooled metrics on `held_out`."""
    fit_ev = conditional_events(fit["confidence"], fit["hit"], fit["valid"], fit.get("accept"), rule, fit.get("sequence"))
    held_ev = conditional_events(held_out["confidence"], held_out["hit"], held_out["valid"], held_out.get("accept"), rule)
    fitted = [fit_maps(z, y, w, g) for z, y, w, g in fit_ev]
    temp_only = [fits["temperature"][0] for _, fits in fitted]
    chosen = [(name, *fits[name]) for name, fits in fitted]
    per, pooled = [], {k: ([], [], []) for k in ("before", "temperature_only", "after")}
    for j, ((z, y, w, _), t0, (name, t, b)) in enumerate(zip(held_ev, temp_only, chosen)):
        if z.numel() == 0:
            continue
        probs = {"before": torch.sigmoid(z), "temperature_only": torch.sigmoid(z / t0), "after": torch.sigmoid(z / t + b)}
        per.append({"draft": j, "map": name, "temperature": t, "bias": b, "temperature_only": t0, "n": int(z.numel()),
                    "weight": float(w.sum()), "accept_rate": float((w * y).sum() / w.sum()),
                    **{k: _summary(reliability(p, y, w)) for k, p in probs.items()}})
        for k, p in probs.items():
            for acc, v in zip(pooled[k], (p, y, w)):
                acc.append(v)
    overall = {k: reliability(torch.cat(p), torch.cat(y), torch.cat(w)) for k, (p, y, w) in pooled.items() if p}
    return {"map": [m for m, _, _ in chosen], "temperature": [t for _, t, _ in chosen], "bias": [b for _, _, b in chosen],
            "temperature_only": temp_only, "per_draft": per, "pooled": overall}


def calibrate(fit: dict[str, Tensor], held_out: dict[str, Tensor]) -> dict[str, Any]:
    """Both acceptance rules (sampled only when the blocks carry their 1 - TV)."""
    rules = [r for r in RULES if r == "greedy" or ("accept" in fit and "accept" in held_out)]
    return {rule: calibrate_rule(fit, held_out, rule) for rule in rules}


def fit_drafter(model, dc: Any, seqs: list[dict], labels: list[dict]) -> dict[str, Any] | None:
    """Calibrate a trained drafter's confidence head on validation sequences: fitted on one half and judged on
    the other (halves of the sequences; alternate blocks when there is one sequence). The fitted temperature
    and bias go into the model's buffers; returns `calibrate`'s record, or None when there is too little data."""
    from deepspec.drafters.block.loss import run_batch
    from deepspec.drafters.kind import Direct

    model.eval()
    with torch.no_grad():
        if len(seqs) >= 2:
            half = len(seqs) // 2
            fit = run_batch(Direct(model), seqs[:half], labels[:half], dc, False, None, keep=True).get("kept")
            held = run_batch(Direct(model), seqs[half:], labels[half:], dc, False, None, keep=True).get("kept")
        else:
            kept = run_batch(Direct(model), seqs, labels, dc, False, None, keep=True).get("kept")
            fit = held = None
            if kept is not None and kept["hit"].shape[0] >= 2:
                fit = {k: v[0::2] for k, v in kept.items()}
                held = {k: v[1::2] for k, v in kept.items()}
    if fit is None or held is None:
        return None
    result = calibrate(fit, held)
    for r, rule in enumerate(RULES):
        if rule in result:
            model.confidence_temperature[r] = torch.tensor(result[rule]["temperature"])
            model.confidence_bias[r] = torch.tensor(result[rule]["bias"])
    return result
