"""Per-(method, task) metrics from evaluation records: tau, acceptance by depth, throughput, speedup, losslessness."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from deepspec.decoding.engine import Generation
from deepspec.evaluation.lossless import EXACT, judge

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def turn_record(gen: Generation, text: str) -> dict[str, Any]:
    return {
        "token_ids": gen.tokens,
        "text": text,
        "new_tokens": len(gen.tokens),
        "stopped": gen.stopped,
        "wall_time": gen.wall_time,
        "prefill_time": gen.prefill_time,
        "draft_time": gen.draft_time,
        "verify_time": gen.verify_time,
        "forward_time": gen.forward_time,
        "forwards": gen.forwards,
        "accepted": gen.accepted,
        "proposed": gen.proposed,
    }


def _totals(turns: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("new_tokens", "wall_time", "prefill_time", "draft_time", "verify_time", "forward_time", "forwards")
    return {k: float(sum(t.get(k, 0.0) for t in turns)) for k in keys}


def drafted_depths(turns: list[dict[str, Any]]) -> list[int]:
    """Drafted tokens accepted in each round that had a draft (the prefill round and empty rounds excluded)."""
    return [a - 1 for t in turns for a, p in zip(t["accepted"][1:], t["proposed"][1:]) if p > 0]


def acceptance_by_depth(turns: list[dict[str, Any]]) -> list[float]:
    """P(depth d accepted | depth d-1 accepted) over rounds that had a draft (the prefill round excluded)."""
    depths = drafted_depths(turns)
    out = []
    d = 1
    while True:
        reached_prev = sum(1 for x in depths if x >= d - 1)
        reached = sum(1 for x in depths if x >= d)
        if reached_prev == 0 or (reached == 0 and d > 1):
            break
        out.append(reached / reached_prev)
        d += 1
    return out


def _per_sample(records: list[dict[str, Any]], key: str) -> dict[str, np.ndarray]:
    """Totals of each sample (all its turns) for one side of the pairing ("outputs" or "baseline")."""
    rows = [_totals(r[key]) for r in records]
    return {k: np.array([row[k] for row in rows]) for k in ("new_tokens", "wall_time", "forwards")}


def _ci95(values: np.ndarray) -> list[float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def spread(records: list[dict[str, Any]], paired: bool) -> dict[str, Any]:
    """How far τ and the speedup can be trusted: a bootstrap over samples (the unit the pairing holds
    fixed) of the same ratio-of-sums statistics `summarize` reports, and per-sample speedups.

    The speedup interval is what a reproduction is judged against: two runs agree when their
    intervals overlap. Seeded, so the same records always give the same interval."""
    m = _per_sample(records, "outputs")
    n = len(records)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))

    def resampled(a: np.ndarray) -> np.ndarray:
        return a[idx].sum(axis=1)

    with np.errstate(divide="ignore", invalid="ignore"):
        out: dict[str, Any] = {
            "unit": "sample", "samples": n, "resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
            "tau_ci95": _ci95(resampled(m["new_tokens"]) / np.maximum(resampled(m["forwards"]), 1)),
        }
        if not paired:
            out.update({"speedup_ci95": [1.0, 1.0], "speedup_per_sample": {"min": 1.0, "median": 1.0, "max": 1.0}})
            return out
        b = _per_sample(records, "baseline")
        tps = resampled(m["new_tokens"]) / resampled(m["wall_time"])
        base_tps = resampled(b["new_tokens"]) / resampled(b["wall_time"])
        per = (m["new_tokens"] / m["wall_time"]) / (b["new_tokens"] / b["wall_time"])
    per = per[np.isfinite(per)]
    out["speedup_ci95"] = _ci95(tps / base_tps)
    out["speedup_per_sample"] = ({"min": float(per.min()), "median": float(np.median(per)), "max": float(per.max())}
                                 if per.size else {"min": 0.0, "median": 0.0, "max": 0.0})
    return out


def _paired_ratio(stat: Callable[[Callable[[np.ndarray], np.ndarray]], np.ndarray], n: int) -> dict[str, Any]:
    """A ratio statistic over n paired samples: `stat(take)` computes it from per-sample arrays reduced by `take`
    (a sum for the point estimate, a bootstrap draw's sums, or no reduction for per-sample values)."""
    idx = np.random.default_rng(BOOTSTRAP_SEED).integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
    per = stat(lambda x: x)
    return {"ratio": float(stat(np.sum)), "ci95": _ci95(stat(lambda x: x[idx].sum(1))), "faster": int((per > 1).sum()),
            "samples": n}


def _rate(side: dict[str, np.ndarray], take) -> np.ndarray:
    return take(side["new_tokens"]) / take(side["wall_time"])


def head_to_head(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Method A's speedup over method B's on the samples both ran, each against the baseline of its own job.

    Two methods' intervals against the baseline overlap long before one is no faster than the other: both
    move with the same hard and easy samples. This is the ratio of their ratio-of-sums speedups with a
    bootstrap that draws the same samples for both, and the samples on which A was the faster. None when
    they share no sample."""
    theirs = {r["question_id"]: r for r in b}
    pairs = [(r, theirs[r["question_id"]]) for r in a if r["question_id"] in theirs]
    if not pairs:
        return None
    a_out, a_base, b_out, b_base = [_per_sample([p[i] for p in pairs], key) for i in (0, 1)
                                    for key in ("outputs", "baseline")]
    return _paired_ratio(lambda take: (_rate(a_out, take) / _rate(a_base, take)) / (_rate(b_out, take) / _rate(b_base, take)),
                         len(pairs))


def rival_head_to_head(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The method against the rival its own job ran on every sample, in turn with it (`eval.rivals`): the ratio
    of their tokens/s with the same paired bootstrap as `head_to_head`, without the baselines of two jobs in it."""
    mine, theirs = _per_sample(records, "outputs"), _per_sample(records, "rival")
    return _paired_ratio(lambda take: _rate(mine, take) / _rate(theirs, take), len(records))


def summarize(records: list[dict[str, Any]], greedy: bool, paired: bool, rule: str = EXACT,
              tie_margin: float = 0.0) -> dict[str, Any]:
    """`rule`: how greedy outputs are judged against the baseline's (`evaluation.lossless`)."""
    turns = [t for r in records for t in r["outputs"]]
    tot = _totals(turns)
    tps = tot["new_tokens"] / tot["wall_time"] if tot["wall_time"] else 0.0
    metrics: dict[str, Any] = {
        "samples": len(records),
        "turns": len(turns),
        "new_tokens": int(tot["new_tokens"]),
        "tau": tot["new_tokens"] / tot["forwards"] if tot["forwards"] else 0.0,
        "tokens_per_s": tps,
        "acceptance_by_depth": acceptance_by_depth(turns),
        "time_split": {
            k: tot[f"{k}_time"] / tot["wall_time"] if tot["wall_time"] else 0.0 for k in ("prefill", "draft", "verify")
        },
    }
    metrics["time_split"]["other"] = max(0.0, 1.0 - sum(metrics["time_split"].values()))
    # Time neither in a target forward nor in the drafter: the engine's own overhead.
    metrics["overhead_frac"] = (
        max(0.0, 1.0 - (tot["forward_time"] + tot["draft_time"]) / tot["wall_time"]) if tot["wall_time"] else 0.0
    )
    if paired:
        base = [t for r in records for t in r["baseline"]]
        btot = _totals(base)
        base_tps = btot["new_tokens"] / btot["wall_time"] if btot["wall_time"] else 0.0
        metrics["baseline_tokens_per_s"] = base_tps
        metrics["speedup"] = tps / base_tps if base_tps else 0.0
        if greedy:
            mismatches = sum(1 for a, b in zip(turns, base) if a["token_ids"] != b["token_ids"])
            # Each sample's first divergence (its later turns continue from different answers); a sample
            # that differs without a recorded divergence counts as failed under the near-tie rule.
            divergences = [None if all(a["token_ids"] == b["token_ids"] for a, b in zip(r["outputs"], r["baseline"]))
                           else r.get("divergence") or {"logit_gap": None} for r in records]
            metrics["lossless"] = {"checked_turns": len(turns), **judge(divergences, mismatches, rule, tie_margin)}
        else:
            metrics["lossless"] = {"checked_turns": 0, "mismatches": 0, "passed": None,
                                   "note": "sampling: equality per sample does not apply; see the distribution tests"}
    else:
        metrics["baseline_tokens_per_s"] = tps
        metrics["speedup"] = 1.0
        metrics["lossless"] = {"checked_turns": len(turns), "mismatches": 0, "passed": True, "note": "baseline"}
    if records and all("rival" in r for r in records):
        rival = _totals([t for r in records for t in r["rival"]])
        rival_tps = rival["new_tokens"] / rival["wall_time"] if rival["wall_time"] else 0.0
        metrics["rival"] = {"tokens_per_s": rival_tps, "tau": rival["new_tokens"] / max(rival["forwards"], 1),
                            "speedup": rival_tps / metrics["baseline_tokens_per_s"] if metrics["baseline_tokens_per_s"] else 0.0,
                            "same_outputs": sum(a["token_ids"] == b["token_ids"] for r in records
                                                for a, b in zip(r["outputs"], r["rival"])),
                            **rival_head_to_head(records)}
    if records:
        metrics["spread"] = spread(records, paired)
    return metrics
