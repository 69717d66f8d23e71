"""`deepspec bench decode` and `bench regenerate` on a tiny target: they run, agree with themselves and
write their tables (the numbers they time are for the real model; here only their content is checked)."""

import json

import pytest


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


def test_bench_decode_reports_both_verify_curves_and_the_memory_bound(tiny_cfg):
    from deepspec.evaluation.bench import bench_decode

    result = bench_decode(tiny_cfg, n_prompts=2, max_new_tokens=8, threads=1)
    rows = result["methods"]
    assert rows["ours_ar"]["speedup_vs_ours_ar"] == 1.0
    assert all(r["identical_to_ours_ar"] == 2 for r in rows.values() if r["tau"] is not None)  # ours: lossless
    assert result["verify_ratio"]["chain_1"] == 1.0 and set(result["verify_ms_plain"]) == set(result["verify_ms"])
    m = result["memory_bound"]
    assert m["read_gb_per_s"] > 0.5 and m["bound_ms"] > 0 and m["one_row_vs_bound"] > 0
    text = (tiny_cfg.out_dir / "bench/decode.md").read_text()
    assert "plain matmuls" in text and "Memory bound:" in text


def test_bench_regenerate_compares_hf_and_lean_on_the_same_prompts(tiny_cfg):
    from deepspec.evaluation.bench import bench_regenerate

    result = bench_regenerate(tiny_cfg, prompts=4, threads=1)
    assert result["prompts"] == 4 and result["identical_answers"] == 4  # same greedy answers either way
    assert set(result["tokens_per_s"]) == {"hf_generate", "lean_batched"} and result["speedup"] > 0
    assert "| lean_batched |" in (tiny_cfg.out_dir / "bench/regenerate.md").read_text()
