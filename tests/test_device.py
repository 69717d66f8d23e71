"""The device-aware engine's logic on the CPU: the code path CUDA takes (device and dtype as parameters,
caches as module buffers, the folded grouped-query attention, device generators, event-free timing on the
CPU) and the near-tie rule that judges greedy losslessness wherever byte equality cannot hold."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from deepspec.decoding.engine import Engine
from deepspec.decoding.timing import RegionTimer
from deepspec.evaluation.lossless import EXACT, NEAR_TIE, divergence, judge, lossless_rule
from deepspec.evaluation.metrics import summarize
from deepspec.models import make_backend
from deepspec.models.attention import attend, fold_mask, sdpa_label
from deepspec.models.lean import KVCache
from tests.conftest import tiny_llama
from tests.test_decoding import OracleTreeProposer


@pytest.mark.parametrize("n,S", [(2, 40), (3, 300), (8, 300), (13, 700), (64, 900)])
def test_folded_gqa_attention_matches_grouped(n, S):
    """A masked call folds query groups into rows (the form CUDA's fused kernels accept); on the CPU it gives
    exactly what the grouped call gives from 4 rows up, and agrees to float rounding below."""
    torch.manual_seed(n)
    q, k, v = torch.randn(1, 9, n, 64), torch.randn(1, 3, S, 64), torch.randn(1, 3, S, 64)
    mask = torch.zeros(n, S)
    mask[:, S - n:] = torch.full((n, n), float("-inf")).triu(1)
    mask[1, 3] = float("-inf")  # an arbitrary masked cell, as a tree mask has
    grouped = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], enable_gqa=True)
    folded = attend(q, k, v, mask[None, None])
    assert torch.equal(folded, grouped) if n >= 4 else torch.allclose(folded, grouped, atol=2e-6, rtol=0)
    expanded = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                              attn_mask=mask[None, None])
    torch.testing.assert_close(attend(q, k, v, mask[None, None]), expanded)  # head h reads kv head h // 3
    once = fold_mask(mask[None, None], 3)  # what a forward hands every layer: the same rows as folding per call
    assert once.shape == (1, 1, 3 * n, S) and torch.equal(attend(q, k, v, once), folded)


def test_caches_are_module_buffers_that_move_with_to():
    cache = KVCache(2, 1, 4, 16, torch.float32, "cpu")  # [layers, kv_heads, max_len, head_dim]
    assert {name for name, _ in cache.named_buffers()} == {"k", "v"}
    cache.length = 2
    cache.k[0, 0, 4] = 1.0  # scratch row 2 (past the 2 committed)
    cache.commit(3, [0, 2])  # keep scratch rows 0 and 2: row 2 moves to position 3, by index
    assert cache.length == 4 and cache.k[0, 0, 3].sum() == 4 and cache.k[0, 0, 2].sum() == 0
    moved = cache.to(torch.float64)
    assert moved.k.dtype == moved.v.dtype == torch.float64 and moved.length == 4


def test_region_timer_sums_regions_on_the_cpu():
    timer = RegionTimer(torch.device("cpu"))
    for _ in range(3):
        with timer.region("a"):
            sum(range(20_000))
    with timer.region("b"):
        pass
    seconds = timer.seconds()
    assert set(seconds) == {"a", "b"} and seconds["a"] > seconds["b"] >= 0


def test_rule_by_device_and_dtype():
    assert lossless_rule(torch.device("cpu"), torch.float32) == EXACT
    assert lossless_rule(torch.device("cpu"), torch.float64) == EXACT
    assert lossless_rule(torch.device("cpu"), torch.bfloat16) == NEAR_TIE
    assert lossless_rule(torch.device("cuda", 0), torch.float32) == NEAR_TIE
    assert sdpa_label(torch.device("cuda", 0)) == "flash>efficient>cudnn>math"


def test_bf16_engine_accepts_drafts_and_every_divergence_is_weighed():
    """The engine in bf16 (the dtype the paper profiles evaluate in): an oracle's drafts are accepted, and the
    near-tie rule weighs a divergence by the target's own logits; a divergence to a far-off token fails it."""
    model = tiny_llama(vocab=64, layers=2, dtype=torch.bfloat16, seed=5)
    backend = make_backend(model, "lean", 256)
    engine = Engine(backend, stop_ids=[], max_nodes=16)
    prompt = [3, 1, 4, 1, 5]
    ref = engine.generate(prompt, 30).tokens
    gen = engine.generate(prompt, 30, OracleTreeProposer(prompt + ref, 64, random.Random(0)))
    assert max(gen.accepted) > 1
    d = divergence(backend, prompt, gen.tokens, ref)
    assert d is None or d["logit_gap"] <= 0.25, d  # the speculative output leaves the plain one only at a near-tie

    with torch.no_grad():
        logits = model(torch.tensor([prompt + ref[:6]])).logits[0, -1].float()
    ranked = logits.argsort(descending=True).tolist()
    assert ranked[0] == ref[6]
    for other, passes in ((ranked[1], None), (ranked[-1], False)):
        out = ref[:6] + [other]
        d = divergence(backend, prompt, out, ref)
        assert d["at"] == 6 and d["tokens"] == [other, ref[6]]
        assert d["logit_gap"] == pytest.approx(float(logits[ref[6]] - logits[other]), abs=0.07)
        verdict = judge([d], 1, NEAR_TIE, 0.25)
        assert verdict["passed"] == (passes if passes is not None else d["logit_gap"] <= 0.25)
    assert judge([d], 1, EXACT, 0.25)["passed"] is False  # byte equality ignores how close the tie was


def _record(out: list[int], base: list[int], divergence: dict | None = None) -> dict:
    turn = {"token_ids": out, "new_tokens": len(out), "wall_time": 1.0, "forwards": 1, "accepted": [1], "proposed": [0]}
    base_turn = {**turn, "token_ids": base, "new_tokens": len(base)}
    return {"outputs": [turn], "baseline": [base_turn], **({"divergence": divergence} if divergence else {})}


def test_summary_applies_the_rule_to_each_samples_first_divergence():
    same = _record([1, 2, 3], [1, 2, 3])
    near = _record([1, 2, 4], [1, 2, 3], {"at": 2, "tokens": [4, 3], "logit_gap": 0.1})
    far = _record([1, 5, 4], [1, 2, 3], {"at": 1, "tokens": [5, 2], "logit_gap": 3.0})
    unweighed = _record([1, 2, 4], [1, 2, 3])  # a difference nobody weighed cannot pass
    assert summarize([same, near], True, True)["lossless"]["passed"] is False  # exact: any difference fails
    ok = summarize([same, near], True, True, NEAR_TIE, 0.25)["lossless"]
    assert ok["passed"] is True and ok["diverged_samples"] == 1 and ok["max_logit_gap"] == 0.1
    assert summarize([same, near, far], True, True, NEAR_TIE, 0.25)["lossless"]["passed"] is False
    assert summarize([same, unweighed], True, True, NEAR_TIE, 0.25)["lossless"]["passed"] is False


def test_evaluate_in_bf16_records_device_rule_and_backend(tmp_path, tiny_target_dir):
    from deepspec.cli import main
    from deepspec.config import validate
    from deepspec.layout import eval_dir

    tasks = tmp_path / "q.jsonl"
    tasks.write_text("".join(json.dumps({"question_id": i, "turns": [f"List {i + 2} colours twice."]}) + "\n"
                             for i in range(2)))
    raw = {"experiment": "bf", "results_dir": str(tmp_path / "results"),
           "target": {"model": str(tiny_target_dir), "max_len": 256, "dtype": "bfloat16"},
           "tasks": {"t": {"kind": "jsonl", "source": str(tasks)}},
           "methods": {"ar": {"kind": "autoregressive"}, "pld": {"kind": "ngram", "ngram_min": 1}},
           "eval": {"max_new_tokens": 16}, "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(raw))
    assert main(["prepare", "--config", str(path)]) == 0
    assert main(["evaluate", "--config", str(path), "--method", "pld", "--task", "t"]) == 0
    out = eval_dir(validate(raw), "pld", "t")
    m = json.loads((out / "metrics.json").read_text())
    assert (m["device"], m["dtype"], m["sdpa"]) == ("cpu", "bfloat16", "flash>math")
    assert m["lossless"]["rule"] == NEAR_TIE and m["lossless"]["passed"] is True
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert all("divergence" in r for r in records)  # weighed (None where the sample matched)


def test_report_names_the_rule_it_judged_by():
    from deepspec.reporting.report import lossless_line

    exact = {("a", "t"): {"lossless": {"rule": EXACT, "passed": True, "mismatches": 0}}}
    assert lossless_line(exact, []) == "Losslessness (greedy, token-identical to the baseline): all methods pass."
    near = {("a", "t"): {"lossless": {"rule": NEAR_TIE, "passed": True, "tie_margin": 0.25, "max_logit_gap": 0.125,
                                      "diverged_samples": 2}}}
    line = lossless_line(near, [])
    assert "near-tie rule" in line and "at most 0.25; 2 samples diverge, largest gap 0.125" in line
    assert lossless_line(near, ["a/t"]).endswith("**FAILED** for a/t.")
