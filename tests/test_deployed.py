"""Methods run again in a serving engine (`engines:`), without the engine: the config section and its errors, how
our methods map onto vLLM's speculative configs, τ on vLLM's definition, the planned DAG, and the report's
deployed section from metrics files. Decoding in real vLLM is in test_engines.py (-m engine)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from deepspec.config import ConfigError, load

ROOT = Path(__file__).resolve().parents[1]


def _with_engines(tmp_path, engines: dict, base: str = "config/default.yaml") -> Path:
    raw = yaml.safe_load((ROOT / base).read_text())
    raw.update(engines=engines, results_dir=str(tmp_path / "res"))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("methods, message", [
    (["nope"], "engines.vllm.methods: no method named 'nope'"),
    (["ar"], "engines.vllm.methods: 'ar' is autoregressive"),
    (["dflash"], "engines.vllm.methods: 'dflash': drafter 'dflash': vLLM's DFlash samples the mask slots, each for "
                 "its own position; train it with label_convention: own"),
    (["dspark"], "engines.vllm.methods: 'dspark': drafter 'dspark' is dspark: vLLM 0.32 runs DSpark's Markov and "
                 "confidence heads only in its GPU model runner"),
])
def test_engine_section_errors_name_the_key(tmp_path, methods, message):
    with pytest.raises(ConfigError) as info:
        load(_with_engines(tmp_path, {"vllm": {"methods": methods}}))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_engines_stay_out_of_the_run_hash(tmp_path):
    """Running methods again in an engine changes no stage's output, so the run hash (and with it the committed
    references' validity) stays; the deploy jobs record their section's own hash."""
    plain = load(ROOT / "config/smoke.yaml", [f"results_dir={tmp_path / 'res'}"])
    one = load(_with_engines(tmp_path, {"vllm": {"methods": ["pld"]}}, "config/smoke.yaml"))
    two = load(_with_engines(tmp_path, {"vllm": {"methods": ["pld", "eagle3"]}}, "config/smoke.yaml"))
    assert plain.hash() == one.hash() == two.hash()
    assert one.section_hash("engines", "vllm") != two.section_hash("engines", "vllm")


def test_our_methods_map_onto_vllm_speculative_configs(tmp_path):
    cfg = load(_with_engines(tmp_path, {"vllm": {"methods": ["pld", "eagle3"]}}))
    assert cfg.engine_spec("vllm", "pld", None) == {"method": "ngram", "num_speculative_tokens": 4,
                                                    "prompt_lookup_max": 3, "prompt_lookup_min": 2}
    # EAGLE-3's 3 x 4 tree runs in vLLM as the chain of its depth, from the drafter exported to vLLM's layout
    assert cfg.engine_spec("vllm", "eagle3", "/x") == {"method": "eagle3", "model": "/x", "num_speculative_tokens": 3}
    assert cfg.engine_exports("vllm", "eagle3") == ["eagle3"] and cfg.engine_exports("vllm", "pld") == []
    with pytest.raises(ValueError, match="exported to the vllm layout"):
        cfg.engine_spec("vllm", "eagle3", None)
    from deepspec.config import DraftLMMethod, NgramMethod, SuffixMethod
    from deepspec.engines.vllm_runner import speculative_config

    with pytest.raises(ValueError, match="branches must be 1"):
        speculative_config(NgramMethod(kind="ngram", branches=2))
    with pytest.raises(ValueError, match="set `model`"):
        speculative_config(DraftLMMethod(kind="draft_lm", layers=4))
    suffix = speculative_config(SuffixMethod(kind="suffix", global_cache=False))
    assert suffix["method"] == "suffix" and suffix["suffix_decoding_max_cached_requests"] == 0


def test_block_methods_map_onto_vllms_dflash_proposer(tmp_path):
    """A DFlash drafter trained with z-lab's labels decodes in vLLM's DFlash proposer with its whole block (the
    smoke profile's: block 4, 3 drafts); our side then drafts the whole block every round too."""
    from deepspec.evaluation.deployed import chain_method

    cfg = load(_with_engines(tmp_path, {"vllm": {"methods": ["dflash"]}}, "config/smoke.yaml"))
    assert cfg.engine_spec("vllm", "dflash", "/x") == {"method": "dflash", "model": "/x", "num_speculative_tokens": 3}
    assert cfg.engine_exports("vllm", "dflash") == ["dflash"]
    cut = cfg.methods["dspark"].model_copy(update={"tree_top_k": 3, "max_length": 2})
    chain = chain_method(cut)
    assert (chain.length, chain.max_length, chain.tree_top_k) == ("fixed", None, 1)


def test_chain_method_and_tau_on_vllms_definition():
    from deepspec.drafters.eagle3.config import Eagle3Method
    from deepspec.evaluation.deployed import chain_method, rounds_tau

    chain = chain_method(Eagle3Method(kind="eagle3", drafter="d", depth=3, top_k=4, total_tokens=8))
    assert (chain.depth, chain.top_k, chain.total_tokens) == (3, 1, 3)
    # prefill (first entry) and rounds without a draft are not drafting rounds; accepted counts the bonus token
    turns = [{"accepted": [1, 3, 1, 2], "proposed": [0, 3, 0, 3]}, {"accepted": [1, 4], "proposed": [0, 3]}]
    assert rounds_tau(turns) == pytest.approx(1 + (2 + 1 + 3) / 3)
    assert rounds_tau([{"accepted": [1, 1], "proposed": [0, 0]}]) is None


def test_dry_run_plans_the_engine_environment_exports_and_deploy_jobs(tmp_path):
    path = _with_engines(tmp_path, {"vllm": {"methods": ["pld", "eagle3"]}})
    proc = subprocess.run(["snakemake", "-n", "--cores", "2", "--configfile", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = {line.split()[0]: int(line.split()[1]) for line in proc.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts["engine_env"] == 1 and counts["export"] == 1 and counts["deploy"] == 4  # 2 methods x 2 tasks
    assert "export/eagle3-vllm/config.json" in proc.stdout


def _metrics(method: str, task: str, tau: float | None, speedup: float) -> dict:
    sweep = [{"requests": c, "tokens_per_s": 30.0 * c * speedup, "baseline_tokens_per_s": 30.0 * c,
              "speedup": speedup, "identical": c < 4} for c in (1, 2, 4)]
    return {"engine_version": "0.32.0", "tau": tau, "ours_tau": 1.5, "tau_rel_diff": None if tau is None else abs(tau - 1.5) / 1.5,
            "speedup": speedup, "tokens_per_s": 30.0 * speedup, "baseline_tokens_per_s": 30.0, "threads": 2,
            "lossless": {"passed": True, "mismatches": 0},
            "cross_engine": {"samples": 2, "identical_samples": 1,
                             "first_divergence": {"turn": 1, "at": 17, "logit_gap": 0.004}},
            "concurrency": sweep}


def test_deployed_section_reads_as_tables_and_a_plot(tmp_path):
    from deepspec.reporting.deployed import deployed_figure, deployed_section
    from deepspec.reporting.report import save_figure

    cfg = load(_with_engines(tmp_path, {"vllm": {"methods": ["pld", "eagle3"], "concurrency": [1, 2, 4]}}))
    deployed = {("vllm", m, t): _metrics(m, t, 1.45 if m == "eagle3" else 1.9, 0.9 if m == "eagle3" else 1.4)
                for m in ("pld", "eagle3") for t in cfg.tasks}
    (tmp_path / "plots").mkdir()
    plot = save_figure(deployed_figure(cfg, deployed), tmp_path / "plots" / "deployed.png", cfg)
    assert plot.is_file() and plot.stat().st_size > 10_000
    text = "\n".join(deployed_section(cfg, deployed, plot))
    rows = [line for line in text.splitlines() if line.startswith("| eagle3 ")]
    assert len(rows) == 4  # summary and sweep, both tasks
    summary = rows[0]
    assert "vllm 0.32.0" in summary and "1.45" in summary and "3.3%" in summary and "0.90×" in summary
    assert "1/2 (first at turn 1, token 17, logit gap 0.004)" in summary
    sweep = rows[2]
    assert "0.90× (27 / 30)" in sweep and "0.90× (108 / 120) ≠" in sweep  # 4 in flight: outputs differ
    assert json.loads(json.dumps(text))  # plain text, no objects leaked into the markdown
