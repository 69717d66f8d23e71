"""`deepspec bench decode` and `bench regenerate` on a tiny target: they run, agree with themselves and
write their tables (the numbers they time are for the real model; here only their content is checked)."""

import json

import pytest

from deepspec.models import load_model


@pytest.fixture
def tiny_cfg(tmp_path, tiny_target_dir):
    from deepspec.config import validate

    convs = tmp_path / "convs.jsonl"
    convs.write_text("".join(json.dumps({"id": f"c{i}", "turns": [f"Tell me about topic {i}."]}) + "\n" for i in range(6)))
    return validate({
        "experiment": "tiny", "results_dir": str(tmp_path / "results"),
        "target": {"model": str(tiny_target_dir), "max_len": 512},
        "tasks": {"t": {"kind": "jsonl", "source": str(convs)}},
        "methods": {"ar": {"kind": "autoregressive"}},
        "train_data": {"kind": "jsonl", "source": str(convs), "max_new_tokens": 10},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })


def test_bench_decode_reports_both_verify_curves_and_the_memory_bound(tiny_cfg, monkeypatch):
    from deepspec.engines import env
    from deepspec.evaluation.bench import bench_decode

    monkeypatch.setattr(env, "find", lambda name: None)  # vLLM's rows are the engine tests' business

    result = bench_decode(tiny_cfg, n_prompts=2, max_new_tokens=8, threads=1)
    rows = result["methods"]
    assert rows["ours_ar"]["tau"] == 1.0  # one token per forward, counted from the engine's forwards
    assert all(r["identical_to_ours_ar"] == 2 for r in rows.values() if r["tau"] is not None)  # ours: lossless
    assert rows["ours_draft_lm_tree"]["tau"] > 1.0  # the whole target as its own draft: drafts accepted
    for name, r in rows.items():  # shares of wall time from the engine's own timers
        ratio = r["tokens_per_s"] / rows["ours_ar"]["tokens_per_s"]
        assert r["speedup_vs_ours_ar"] == pytest.approx(ratio), name
        if r["tau"] is not None:
            assert r["draft_frac"] + r["target_forward_frac"] + r["overhead_frac"] == pytest.approx(1.0, abs=1e-6), name
    assert rows["ours_draft_lm_chain"]["draft_frac"] > rows["ours_pld_chain"]["draft_frac"]  # a model drafts; lookup searches
    for name, r in rows.items():  # every round after prefill, by who drafted it, adds up to the method's tokens
        if r["tau"] is not None and name.startswith("ours_"):
            rounds = r["rounds"]
            assert sum(x["rounds"] * x["tokens_per_round"] for x in rounds.values()) == pytest.approx(r["new_tokens"] - 2)
            assert len(set(rounds) - {"none"}) <= (name != "ours_ar"), (name, rounds)  # one proposer, or none
    assert set(rows["ours_ar"]["rounds"]) == {"none"} and rows["ours_draft_lm_tree"]["rounds"].get("draft_lm")
    ms = result["verify_ms"]
    assert set(ms) == set(result["verify_ms_plain"]) == {f"chain_{n}" for n in (1, 2, 4, 8, 16, 32, 64)} | {"tree_16"}
    assert result["verify_ratio"] == pytest.approx({k: v / ms["chain_1"] for k, v in ms.items()})
    m = result["memory_bound"]
    hf = load_model(tiny_cfg.target.model).model  # every linear weight and the head, counted from the model itself
    linears = sum(p.numel() for n, p in hf.named_parameters() if n.endswith("proj.weight"))
    head = hf.get_output_embeddings().weight.numel()
    assert m["weight_mb"] == pytest.approx((linears + head) * 4 / 1e6)
    assert m["bound_ms"] == pytest.approx(m["weight_mb"] / 1e3 / m["read_gb_per_s"] * 1e3)
    assert m["one_row_ms"] == ms["chain_1"]
    text = (tiny_cfg.out_dir / "bench/decode_threads1.md").read_text()  # a thread count given: named by it
    assert "plain matmuls" in text and "Memory bound:" in text
    assert f"| ours_ar | {rows['ours_ar']['tokens_per_s']:.1f} | 1.00 |" in text  # the table shows the result
    lm = rows["ours_draft_lm_tree"]["rounds"]["draft_lm"]
    assert f"| ours_draft_lm_tree | draft_lm | {lm['rounds']} | {lm['tokens_per_round']:.2f} |" in text


def test_bench_output_name_must_be_a_plain_file_name(capsys):
    from deepspec.cli import main

    for bad in ("../decode", "sub/decode", ".hidden", ""):
        with pytest.raises(SystemExit):
            main(["bench", "decode", "--name", bad])
        assert f"argument --name: {bad!r} is not a plain file name" in capsys.readouterr().err


def test_bench_regenerate_compares_hf_and_lean_on_the_same_prompts(tiny_cfg):
    from deepspec.evaluation.bench import bench_regenerate

    result = bench_regenerate(tiny_cfg, prompts=4, threads=1)
    assert result["prompts"] == 4 and result["identical_answers"] == 4  # same greedy answers either way
    assert set(result["tokens_per_s"]) == {"hf_generate", "lean_batched"} and result["speedup"] > 0
    assert "| lean_batched |" in (tiny_cfg.out_dir / "bench/regenerate.md").read_text()
