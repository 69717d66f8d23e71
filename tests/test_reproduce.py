"""Spreads and the reproduction verdict: bootstrap intervals from records, the cell-by-cell comparison with a
reference (matching, τ off, speedup off, missing), the pandas tables, and promoting a run to the reference."""

from __future__ import annotations

import copy
import json

import pytest

from deepspec.config import validate


def _turn(tokens: int, wall: float, forwards: int) -> dict:
    return {"token_ids": [1] * tokens, "new_tokens": tokens, "wall_time": wall, "forwards": forwards, "prefill_time": 0.0,
            "draft_time": 0.0, "verify_time": wall, "forward_time": wall, "accepted": [1] * forwards,
            "proposed": [0] * forwards}


def _records(speeds: list[float]) -> list[dict]:
    """One record per sample: the method at `speed` times the baseline's tokens/s, τ 2."""
    return [{"question_id": i, "outputs": [_turn(40, 1.0 / s, 20)], "baseline": [_turn(40, 1.0, 40)]}
            for i, s in enumerate(speeds)]


def test_spread_brackets_the_point_estimate_and_is_seeded():
    from deepspec.evaluation.metrics import summarize

    m = summarize(_records([1.2, 1.5, 0.9, 1.4, 1.1]), greedy=True, paired=True)
    s = m["spread"]
    lo, hi = s["speedup_ci95"]
    assert lo < m["speedup"] < hi
    assert s["speedup_per_sample"] == pytest.approx({"min": 0.9, "median": 1.2, "max": 1.5})
    assert s["tau_ci95"] == pytest.approx([2.0, 2.0]) and m["tau"] == pytest.approx(2.0)
    assert summarize(_records([1.2, 1.5, 0.9, 1.4, 1.1]), True, True)["spread"] == s  # same records, same interval
    one = summarize(_records([1.3]), True, True)["spread"]
    assert one["speedup_ci95"] == pytest.approx([1.3, 1.3])


def test_speedup_interval_covers_the_true_speedup_about_95_percent_of_the_time():
    """Coverage over 300 simulated runs with a known population speedup (sample speeds s with 1/s uniform on
    [0.5, 1]: the reported ratio of sums estimates 1 / E[1/s] = 4/3). A percentile bootstrap of 20 samples
    covers ~93%; an interval that holds for any bootstrap (the per-sample range) covers ~100%, and one that
    ignores sampling error covers far less; both fail here. Its width shrinks as 1/sqrt(n)."""
    import numpy as np

    from deepspec.evaluation.metrics import summarize

    rng = np.random.default_rng(0)
    truth = 4 / 3

    def interval(n: int) -> list[float]:
        speeds = 1 / rng.uniform(0.5, 1.0, size=n)
        return summarize(_records(list(speeds)), greedy=True, paired=True)["spread"]["speedup_ci95"]

    small = [interval(20) for _ in range(300)]
    covered = np.mean([lo <= truth <= hi for lo, hi in small])
    assert 0.88 <= covered <= 0.98, covered
    ranges = [(1 / rng.uniform(0.5, 1.0, size=20)) for _ in range(300)]
    assert np.mean([r.min() <= truth <= r.max() for r in ranges]) > 0.99  # the control: a range covers always
    large = [interval(80) for _ in range(100)]
    width = np.mean([hi - lo for lo, hi in large]) / np.mean([hi - lo for lo, hi in small])
    assert 0.4 <= width <= 0.6, width  # sqrt(20 / 80) = 0.5


def _cfg(tmp_path, reference):
    return validate({"experiment": "exp", "results_dir": str(tmp_path / "results"),
                     "reproduce": {"reference": str(reference)}, "tasks": {"t": {"kind": "humaneval"}},
                     "methods": {"ar": {"kind": "autoregressive"}, "pld": {"kind": "ngram"}}})


def _metrics(cfg, speeds=(1.2, 1.5, 0.9, 1.4, 1.1)):
    from deepspec.evaluation.metrics import summarize

    out = {}
    for method, paired in (("ar", False), ("pld", True)):
        m = summarize(_records(list(speeds)), greedy=True, paired=paired)
        m.update({"config_hash": cfg.hash(), "target_fingerprint": "fp"})
        out[(method, "t")] = m
    return out


def test_verdicts(tmp_path):
    from deepspec.reporting.reproduce import compare

    cfg = _cfg(tmp_path, tmp_path / "ref")
    run = _metrics(cfg)
    none = compare(cfg, run)
    assert none.passed is None and none.verdict.startswith("No reference for experiment 'exp'")

    same = compare(cfg, run, copy.deepcopy(run))
    assert same.passed is True and same.verdict.startswith("REPRODUCED: τ matches in all 2 cells (all identical)")
    assert same.table["Δτ"].tolist() == [0.0, 0.0]

    ref = copy.deepcopy(run)
    ref[("pld", "t")]["tau"] += 0.05  # 2.5%: a trained drafter's drift, within the 3% tolerance
    near = compare(cfg, run, ref)
    assert near.passed is True and near.verdict.startswith("REPRODUCED: τ matches in all 2 cells (1 identical, the rest within 3%)")
    ref[("pld", "t")]["tau"] += 0.05  # 5%
    off = compare(cfg, run, ref)
    assert off.passed is False and off.verdict == "NOT REPRODUCED: τ differs by more than 3% in pld/t"

    ref = copy.deepcopy(run)
    ref[("pld", "t")]["speedup"] = 3.0
    ref[("pld", "t")]["spread"]["speedup_ci95"] = [2.8, 3.2]
    slow = compare(cfg, run, ref)
    assert slow.passed is True and slow.verdict.startswith("τ REPRODUCED in all 2 cells")
    assert slow.verdict.endswith("speedup outside the reference's spread in pld/t")

    ref = copy.deepcopy(run)
    ref[("draft", "t")] = ref.pop(("pld", "t"))
    partial = compare(cfg, run, ref)
    assert "pld/t: not in the reference (new cell)" in partial.notes
    assert "in the reference but not in this run: draft/t" in partial.notes
    assert partial.passed is True and len(partial.table) == 1

    ref = copy.deepcopy(run)
    for m in ref.values():
        m["config_hash"] = "000000000000"
    assert any(n.startswith("config differs: reference 000000000000") for n in compare(cfg, run, ref).notes)

    lossy = copy.deepcopy(run)
    lossy[("pld", "t")]["lossless"] = {"passed": False, "mismatches": 1, "checked_turns": 5}
    assert compare(cfg, lossy, run).verdict == "NOT REPRODUCED: lossless check failed in pld/t"


def test_cost_cut_cells_are_judged_by_their_drafters(tmp_path):
    """A method that cuts drafts on this machine's measured costs (and a hybrid of it) is judged by its drafter's
    validation chain τ, not by its own τ, which moves with the machine; a fixed-length method on the same drafter
    is still judged by τ. Without the drafters' metrics the cost-cut cells fall back to τ (the control)."""
    from deepspec.layout import drafter_dir
    from deepspec.reporting.reproduce import compare

    ref_dir = tmp_path / "ref"
    cfg = validate({"experiment": "exp", "results_dir": str(tmp_path / "results"),
                    "reproduce": {"reference": str(ref_dir)}, "tasks": {"t": {"kind": "humaneval"}},
                    "drafters": {"e3": {"kind": "eagle3"}},
                    "methods": {"ar": {"kind": "autoregressive"}, "pld": {"kind": "ngram"},
                                "fixed": {"kind": "eagle3", "drafter": "e3"},
                                "cut": {"kind": "eagle3", "drafter": "e3", "length": "cost"},
                                "both": {"kind": "hybrid", "methods": ["pld", "cut"]}}})
    run = _metrics(cfg)
    for name in ("fixed", "cut", "both"):
        run[(name, "t")] = copy.deepcopy(run[("pld", "t")])
    ref = copy.deepcopy(run)
    for name in ("cut", "both"):
        ref[(name, "t")]["tau"] *= 1.06  # more nodes verified where verifying was cheaper
    fallback = compare(cfg, run, ref)
    assert fallback.passed is False and fallback.verdict == "NOT REPRODUCED: τ differs by more than 3% in cut/t, both/t"

    def drafter_tau(folder, tau):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps({"val_tau_chain": tau}))

    drafter_tau(drafter_dir(cfg, "e3"), 1.60)
    drafter_tau(cfg.reference_dir / "drafters" / "e3", 1.61)
    judged = compare(cfg, run, ref)
    assert judged.passed is True and judged.verdict.startswith(
        "REPRODUCED: τ matches in all 5 cells (3 identical; 2 judged by their drafters' validation τ)")
    assert dict(zip(judged.table["method"], judged.table["τ judged by"])) == {
        "ar": "τ", "pld": "τ", "fixed": "τ", "cut": "drafter validation τ", "both": "drafter validation τ"}
    assert any(n.startswith("both, cut: drafts cut on this machine's measured costs") for n in judged.notes)
    ref[("fixed", "t")]["tau"] *= 1.06
    off = compare(cfg, run, ref)
    assert off.verdict == "NOT REPRODUCED: τ differs by more than 3% in fixed/t"
    # The failing cell names its drafter's validation τ beside the reference's: here the drafter learned alike.
    assert "fixed/t: τ -5.7% against the reference; its drafters' validation chain τ: e3 1.600 against 1.610 (-0.6%)" \
        in off.notes
    assert not any(n.startswith(("pld/t:", "cut/t:")) for n in off.notes)
    ref[("fixed", "t")]["tau"] = run[("fixed", "t")]["tau"]
    drafter_tau(cfg.reference_dir / "drafters" / "e3", 1.70)
    assert compare(cfg, run, ref).verdict == ("NOT REPRODUCED: τ differs by more than 3% in cut/t (drafter validation "
                                              "τ), both/t (drafter validation τ)")


def test_head_to_head_separates_methods_whose_own_intervals_overlap():
    """Method A 8% faster than B on every sample, samples of very different difficulty: their intervals
    against the baseline overlap, the paired ratio's does not include 1. Controls: B against itself is 1
    with no sample faster, and only the samples both ran are compared."""
    import numpy as np

    from deepspec.evaluation.metrics import head_to_head, summarize

    rng = np.random.default_rng(1)
    b_speeds = list(rng.uniform(0.9, 1.8, size=10))
    a_speeds = [s * 1.08 * rng.uniform(0.98, 1.02) for s in b_speeds]
    a, b = _records(a_speeds), _records(b_speeds)
    a_lo, a_hi = summarize(a, True, True)["spread"]["speedup_ci95"]
    b_lo, b_hi = summarize(b, True, True)["spread"]["speedup_ci95"]
    assert a_lo < b_hi  # overlapping intervals against the baseline
    h = head_to_head(a, b)
    assert h["samples"] == 10 and h["faster"] == 10
    assert 1.05 < h["ci95"][0] <= h["ratio"] <= h["ci95"][1] < 1.11
    same = head_to_head(b, b)
    assert same["ratio"] == pytest.approx(1.0) and same["ci95"] == pytest.approx([1.0, 1.0]) and same["faster"] == 0
    assert head_to_head(a[:4], b[2:])["samples"] == 2
    assert head_to_head(a[:2], b[5:]) is None


def test_rival_timed_in_the_same_job_is_compared_without_the_baselines():
    """A rival run in the method's own job (`eval.rivals`): the ratio of their tokens/s, paired by sample. A method 8%
    faster on every sample has its interval above 1 however noisy the baseline; its rival against itself is 1."""
    import numpy as np

    from deepspec.evaluation.metrics import rival_head_to_head, summarize

    rng = np.random.default_rng(2)
    rival_speeds = list(rng.uniform(0.9, 1.8, size=10))
    records = _records([s * 1.08 * rng.uniform(0.98, 1.02) for s in rival_speeds])
    for rec, s, noise in zip(records, rival_speeds, rng.uniform(0.7, 1.3, size=10)):
        rec["rival"] = _records([s])[0]["outputs"]
        rec["baseline"] = [_turn(40, noise, 40)]  # a baseline that drifts sample to sample moves neither side
    m = summarize(records, True, True)
    r = m["rival"]
    assert r["samples"] == 10 and r["faster"] == 10 and r["same_outputs"] == 10
    assert 1.05 < r["ci95"][0] <= r["ratio"] <= r["ci95"][1] < 1.11
    assert r["speedup"] == pytest.approx(m["speedup"] / r["ratio"])
    assert r["tau"] == pytest.approx(2.0)
    for rec in records:
        rec["rival"] = rec["outputs"]
    same = rival_head_to_head(records)
    assert same["ratio"] == pytest.approx(1.0) and same["ci95"] == pytest.approx([1.0, 1.0]) and same["faster"] == 0
    assert "rival" not in summarize(_records([1.2, 1.3]), True, True)


def test_tables_carry_spreads(tmp_path):
    from deepspec.reporting.tables import tables

    cfg = _cfg(tmp_path, tmp_path / "ref")
    tab = tables(cfg, _metrics(cfg))
    md = tab["summary.md"].splitlines()
    assert [c.strip() for c in md[0].split("|")[1:-1]] == ["method", "t", "mean"]
    pld = next(line for line in md if line.startswith("| pld"))
    assert "2.00 / 1.18× (" in pld  # τ exact here (no interval), speedup with its interval
    csv = tab["summary.csv"].splitlines()
    assert csv[0].startswith("method,task,tau,tau_lo,tau_hi,speedup_lo,speedup_hi,speedup_min,speedup_median,speedup_max,speedup,")
    assert "baseline tokens/s" in tab["details.md"] and "0.90 / 1.20 / 1.50" in tab["details.md"]
    assert r"\begin{tabular}" in tab["summary.tex"] and r"$\times$" in tab["summary.tex"]


def test_promote_copies_only_small_results(tmp_path):
    from deepspec import io
    from deepspec.reporting.reproduce import promote

    cfg = validate({"experiment": "exp", "results_dir": str(tmp_path / "results"),
                    "reproduce": {"reference": str(tmp_path / "ref")}, "tasks": {"t": {"kind": "humaneval"}},
                    "methods": {"ar": {"kind": "autoregressive"}}, "drafters": {"d": {"kind": "eagle3"}}})
    with pytest.raises(FileNotFoundError, match="no finished run to promote"):
        promote(cfg)
    out = cfg.out_dir
    io.write_text(out / "report.md", "# r\n")
    io.write_json(out / "eval/pld/t/metrics.json", {"tau": 2.0})
    io.write_text(out / "eval/pld/t/records.jsonl", "{}\n")
    io.write_text(out / "drafters/d/model/model.safetensors", "weights")
    io.write_json(out / "drafters/d/metrics.json", {"steps": 3})
    io.write_json(out / "drafters/bench-d-s0/metrics.json", {"steps": 2})  # a bench's, not the DAG's
    io.write_text(out / "plots/tau.png", "png")
    dst = promote(cfg)
    files = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert files == ["drafters/d/metrics.json", "eval/pld/t/metrics.json", "plots/tau.png", "report.md"]
    assert json.loads((dst / "eval/pld/t/metrics.json").read_text()) == {"tau": 2.0}

    # a second promotion replaces the DAG's outputs and keeps the committed benchmarks as they are
    io.write_text(dst / "bench/curated.md", "re-read\n")
    io.write_text(out / "bench/curated.md", "as the run wrote it\n")
    io.write_text(out / "bench/stale.md", "an old bench of the run folder\n")
    (out / "plots/tau.png").unlink()
    dst = promote(cfg)
    files = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert files == ["bench/curated.md", "drafters/d/metrics.json", "eval/pld/t/metrics.json", "report.md"]
    assert (dst / "bench/curated.md").read_text() == "re-read\n"


def test_a_run_may_not_write_over_its_reference(tmp_path):
    from deepspec.config import ConfigError

    with pytest.raises(ConfigError, match=r"^config error: results_dir: .* would write this run over its committed reference$"):
        validate({"experiment": "exp", "results_dir": str(tmp_path / "ref"), "reproduce": {"reference": str(tmp_path / "ref")},
                  "tasks": {"t": {"kind": "humaneval"}}, "methods": {"ar": {"kind": "autoregressive"}}})
