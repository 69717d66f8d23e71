"""`deepspec bench families` on the tiny pipeline: two families, two seeds, one shared cache; every
drafter trained under its budget, decoded in the shared chain (greedy and sampled) and its own tree,
summarised over seeds with the order verdict; a bad bench file fails before any work."""

from __future__ import annotations

import json

import pytest

from tests.conftest import pipeline_config


def _bench_file(path, **over):
    import yaml

    bench = {
        "seeds": [0, 1], "order": ["b", "d"], "lookup": "pld",
        "common": {"train": {"val_sequences": 1, "eval_every": 2}},
        "chains": {"d": {"depth": 3, "top_k": 1, "total_tokens": 3}, "b": {}},
        "trees": {"d": {"depth": 2, "top_k": 2, "total_tokens": 4}, "b": {"tree_top_k": 2}},
        "budgets": {"short": {"d": {"train": {"epochs": 1}}, "b": {"anchors": "answer", "train": {"epochs": 2}}}},
    }
    bench.update(over)
    path.write_text(yaml.safe_dump(bench))
    return str(path)


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, tiny_target_dir):
    from deepspec.config import validate
    from deepspec.data.regenerate import regenerate
    from deepspec.features.extract import extract_all

    tmp_path = tmp_path_factory.mktemp("families")
    raw = pipeline_config(tmp_path, tiny_target_dir).model_dump(mode="json")
    raw["drafters"]["b"] = {"kind": "dflash", "layers": [0, 1, 2], "num_layers": 1, "block_size": 3, "num_anchors": 4,
                            "draft_vocab": 300, "train": {"batch_sequences": 2, "warmup_steps": 2, "save_every": 4}}
    raw["methods"]["b"] = {"kind": "block", "drafter": "b"}
    raw["methods"]["pld"] = {"kind": "ngram", "ngram_min": 1}
    cfg = validate(raw)
    regenerate(cfg)
    extract_all(cfg)
    return cfg, tmp_path


def test_bench_families_races_every_family_over_seeds(tiny_cfg):
    from deepspec.training.families import bench_families

    cfg, tmp_path = tiny_cfg
    result = bench_families(cfg, _bench_file(tmp_path / "bench.yaml"), n_prompts=2, max_new_tokens=10)
    runs = result["runs"]
    assert sorted(runs) == ["short/b/0", "short/b/1", "short/d/0", "short/d/1"]
    for key, row in runs.items():
        assert row["steps"] > 0 and row["val_tau_chain"] >= 1.0
        assert row["chain_t0.lossless"] and row["tree_t0.lossless"] and row["chain_t1.lossless"] is None
        assert row["hybrid_t0.lossless"] and row["lookup_t0.lossless"]
        shapes = ("chain_t0", "chain_t1", "tree_t0", "hybrid_t0", "lookup_t0")
        assert all(row[f"{s}.decode_tau"] >= 1.0 and 0 <= row[f"{s}.draft_share"] < 1 for s in shapes), key
        # Scored on the prompts' greedy answers: at most 3 drafts (d's 3 TTT steps, b's block of 3) plus one.
        assert 1.0 <= row["answers_tau_chain"] <= 4 and 0 <= row["answers_acc0"] <= 1, key
    # Each family / seed trained its own drafter with the budget's overrides and the common split.
    saved = json.loads((cfg.out_dir / "drafters/bench-short-b-s1/checkpoint/train_state/state.json").read_text())
    assert saved["step"] == runs["short/b/1"]["steps"]
    assert "bench-short-b-s1" not in cfg.drafters  # the experiment's own config is untouched
    b1 = json.loads((cfg.out_dir / "drafters/bench-short-b-s1/metrics.json").read_text())
    assert b1["val_tau_chain"] == runs["short/b/1"]["val_tau_chain"]
    # The summary is the mean and range over seeds; the verdict compares the families seed by seed.
    cell = result["summary"]["short"]["b"]["val_tau_chain"]
    values = [runs["short/b/0"]["val_tau_chain"], runs["short/b/1"]["val_tau_chain"]]
    assert cell == {"mean": pytest.approx(sum(values) / 2), "min": min(values), "max": max(values)}
    holds = all(runs[f"short/b/{s}"]["val_tau_chain"] >= runs[f"short/d/{s}"]["val_tau_chain"] for s in (0, 1))
    assert result["order"]["short"]["val_tau_chain"] == holds
    table = (cfg.out_dir / "bench/families.md").read_text()
    assert "## Budget `short`" in table and "| b " in table and "Order b ≥ d" in table
    assert "lookup + tree, T = 0" in table and "lookup alone, T = 0" in table
    assert "chain τ on the prompts' answers" in table and "τ on the prompts' answers: " in table
    assert set(result["order"]["short"]) == {"val_tau_chain", "answers_tau_chain", "chain_t0.decode_tau",
                                             "chain_t1.decode_tau"}
    assert (cfg.out_dir / "bench/families.png").is_file()


def test_bench_families_refuses_a_bad_bench_file_before_any_work(tiny_cfg):
    from deepspec.config import ConfigError
    from deepspec.training.families import bench_families

    cfg, tmp_path = tiny_cfg
    with pytest.raises(ConfigError, match=r"order: no drafter named 'x'"):
        bench_families(cfg, _bench_file(tmp_path / "b1.yaml", order=["b", "x"]))
    with pytest.raises(ConfigError, match=r"budgets.short: no overrides for d"):
        bench_families(cfg, _bench_file(tmp_path / "b2.yaml", budgets={"short": {"b": {}}}))
    with pytest.raises(ConfigError, match=r"trees.b.tree_top_k: Input should be greater than or equal to 1"):
        bench_families(cfg, _bench_file(tmp_path / "b3.yaml", trees={"d": {}, "b": {"tree_top_k": 0}}))
    with pytest.raises(ConfigError, match=r"--budget: long not in"):
        bench_families(cfg, _bench_file(tmp_path / "b4.yaml"), budgets=["long"])
    with pytest.raises(ConfigError, match=r"lookup: 'e3' is not a prompt-lookup"):
        bench_families(cfg, _bench_file(tmp_path / "b5.yaml", lookup="e3"))
    with pytest.raises(ConfigError, match=r"bench file not found"):
        bench_families(cfg, str(tmp_path / "none.yaml"))


def test_pinned_budgets_train_every_seed_for_the_steps_its_probed_pace_buys(tiny_cfg, monkeypatch):
    from deepspec.training import trainer
    from deepspec.training.families import bench_families

    cfg, tmp_path = tiny_cfg
    # The real probe runs (its steps per epoch are used); its seconds are replaced by fixed paces, so the
    # sizing is checked exactly: a 2 s budget is 8 steps at 0.25 s/step and 4 at 0.5 s/step.
    real, probed = trainer.step_seconds, []

    def fixed_pace(run_cfg, name):
        seconds, per_epoch = real(run_cfg, name)
        assert seconds > 0 and per_epoch > 0
        probed.append(name)
        return {"b": 0.25, "d": 0.5}[name.split("-")[2]], per_epoch

    monkeypatch.setattr(trainer, "step_seconds", fixed_pace)
    budgets = {"timed": {"d": {"train": {"wall_budget_s": 2.0}}, "b": {"train": {"wall_budget_s": 2.0}}}}
    result = bench_families(cfg, _bench_file(tmp_path / "timed.yaml", budgets=budgets), n_prompts=1,
                            max_new_tokens=6, probe_rounds=2, out_name="families_timed")
    # Two interleaved rounds over the first seed of each family; the second seed shares its count.
    assert probed == ["bench-timed-b-s0", "bench-timed-d-s0"] * 2
    runs = result["runs"]
    for family, steps, pace in (("b", 8, 0.25), ("d", 4, 0.5)):
        for seed in (0, 1):
            row = runs[f"timed/{family}/{seed}"]
            assert row["steps"] == steps and row["probe_s_per_step"] == pace
            assert row["wall_s"] == pytest.approx(steps * pace) and row["measured_wall_s"] > 0
            state = json.loads((cfg.out_dir / f"drafters/bench-timed-{family}-s{seed}/checkpoint/train_state/"
                                "state.json").read_text())
            assert state["step"] == state["total"] == steps
    assert "pinned to a step count" in (cfg.out_dir / "bench/families_timed.md").read_text()  # named as asked
    assert (cfg.out_dir / "bench/families_timed.png").is_file() and (cfg.out_dir / "bench/families_timed.json").is_file()


def test_bench_train_defaults_to_the_first_drafter_in_the_configs_order(tiny_cfg):
    """Not the first by name: `b` sorts before the config's first drafter `d`."""
    from deepspec.training.bench import default_drafter

    cfg, _ = tiny_cfg
    assert list(cfg.drafters)[0] == "d" and sorted(cfg.drafters_in_use())[0] == "b"
    assert default_drafter(cfg) == "d"
