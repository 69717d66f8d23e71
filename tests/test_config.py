"""Config validation: every bad input stops before any work with one line naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from deepspec.config import ConfigError, load

from conftest import write_config


def _err(tmp_path, **over) -> str:
    path = write_config(tmp_path / "c.yaml", tmp_path / "res", **over)
    with pytest.raises(ConfigError) as info:
        load(path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_unknown_key(tmp_path):
    assert _err(tmp_path, eval={"max_new_token": 3}) == "config error: eval.max_new_token: unknown key"


def test_unknown_top_level_key(tmp_path):
    assert _err(tmp_path, evaluation={}) == "config error: evaluation: unknown key"


def test_wrong_type(tmp_path):
    msg = _err(tmp_path, eval={"max_new_tokens": "many"})
    assert msg.startswith("config error: eval.max_new_tokens: Input should be a valid integer") and "'many'" in msg


def test_impossible_value(tmp_path):
    msg = _err(tmp_path, eval={"top_p": 1.5})
    assert msg.startswith("config error: eval.top_p: Input should be less than or equal to 1")


def test_impossible_combination(tmp_path):
    msg = _err(tmp_path, methods={"ar": {"kind": "autoregressive"}, "pld": {"kind": "ngram", "ngram_min": 4, "ngram_max": 2}})
    assert msg == "config error: methods.pld: ngram_min (4) must not exceed ngram_max (2)"


def test_unknown_method_kind(tmp_path):
    msg = _err(tmp_path, methods={"ar": {"kind": "autoregressive"}, "x": {"kind": "magic"}})
    assert msg.startswith("config error: methods.x:") and "magic" in msg


def test_missing_baseline(tmp_path):
    msg = _err(tmp_path, methods={"pld": {"kind": "ngram"}})
    assert "one method of kind 'autoregressive' is needed" in msg


def test_eagle3_method_needs_a_known_drafter(tmp_path):
    methods = {"ar": {"kind": "autoregressive"}, "e3": {"kind": "eagle3", "drafter": "nope"}}
    assert _err(tmp_path, methods=methods) == "config error: methods.e3.drafter: no drafter named 'nope' (drafters: none)"
    msg = _err(tmp_path, methods=methods, drafters={"d": {"kind": "eagle3", "ttt_length": 0}})
    assert msg.startswith("config error: drafters.d.ttt_length: Input should be greater than or equal to 1")
    msg = _err(tmp_path, train_data={"kind": "jsonl"})
    assert msg == "config error: train_data: kind 'jsonl' needs a 'source'"


def test_missing_task_file(tmp_path):
    msg = _err(tmp_path, tasks={"mine": {"kind": "jsonl", "source": str(tmp_path / "nope.jsonl")}})
    assert msg == f"config error: tasks.mine.source: file not found: {tmp_path / 'nope.jsonl'}"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(tmp_path / "absent.yaml")


def test_overrides_and_hash(tmp_path):
    path = write_config(tmp_path / "c.yaml", tmp_path / "res")
    base = load(path)
    over = load(path, ["eval.max_new_tokens=16", "methods.pld.num_draft=4"])
    assert over.eval.max_new_tokens == 16 and over.methods["pld"].num_draft == 4
    assert base.hash() != over.hash()
    # Key order and formatting do not change the hash.
    raw = yaml.safe_load(path.read_text())
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(dict(reversed(list(raw.items()))), sort_keys=False))
    assert load(tmp_path / "r.yaml").hash() == base.hash()


def test_a_rival_reruns_only_the_evaluate_job_that_times_it():
    """`eval.rivals`: the rival (with its method section) enters the eval param of its method's job alone; the other
    jobs read the section without it. Bad rivals are refused by name before any work."""
    base = load("config/default.yaml")
    plain = base.model_copy(update={"eval": base.eval.model_copy(update={"rivals": {}})})
    assert base.eval.rivals == {"pld_eagle3": "pld"}
    assert base.eval_section("pld_eagle3") == {**plain.eval_section("pld_eagle3"), "rival": {"pld": base.method_section("pld")}}
    assert base.eval_section("pld") == plain.eval_section("pld") == plain.section("eval") == base.eval_section()
    faster_pld = load("config/default.yaml", ["methods.pld.num_draft=8"])
    assert faster_pld.eval_section("pld_eagle3") != base.eval_section("pld_eagle3")
    assert faster_pld.eval_section("eagle3") == base.eval_section("eagle3")
    for override, message in [
            ("eval.rivals={pdl: pld}", "eval.rivals: no method named 'pdl' (methods: ar, pld,"),
            ("eval.rivals={eagle3: nope}", "eval.rivals.eagle3: no method named 'nope'"),
            ("eval.rivals={eagle3: ar}", "eval.rivals.eagle3: 'ar' is the baseline, which every evaluate job runs already"),
            ("eval.rivals={ar: pld}", "eval.rivals: 'ar' is the baseline"),
            ("eval.rivals={pld: pld}", "eval.rivals.pld: a method cannot be its own rival")]:
        with pytest.raises(ConfigError) as err:
            load("config/default.yaml", [override])
        assert str(err.value).startswith(f"config error: {message}"), str(err.value)


def test_a_hybrid_evaluate_job_depends_on_its_parts():
    """The evaluate rule's method param: a method's own section, and a hybrid's with its parts', so changing how
    EAGLE-3 decodes reruns the lookup-then-EAGLE-3 hybrid too; the other methods' params are their sections."""
    base = load("config/default.yaml")
    grown = load("config/default.yaml", ["methods.eagle3.grow=depth"])
    assert base.method_section("pld") == base.section("methods", "pld")
    hybrid = base.method_section("pld_eagle3")
    assert hybrid["parts"] == {"pld": base.section("methods", "pld"), "eagle3": base.section("methods", "eagle3")}
    assert grown.method_section("pld_eagle3") != hybrid and grown.method_section("pld") == base.method_section("pld")
    with pytest.raises(ConfigError) as err:
        load("config/default.yaml", ["methods.eagle3.length=fixed"])
    assert str(err.value) == ("config error: methods.eagle3: grow: cost prices each depth on the verify-cost curve; "
                              "it needs length: cost or calibrated")


def test_bad_override_syntax(tmp_path):
    path = write_config(tmp_path / "c.yaml", tmp_path / "res")
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        load(path, ["eval.max_new_tokens"])


def test_cli_error_is_one_line_and_writes_nothing(tmp_path):
    res = tmp_path / "res"
    path = write_config(tmp_path / "c.yaml", res, eval={"temperature": -1})
    proc = subprocess.run([sys.executable, "-m", "deepspec.cli", "prepare", "--config", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "deepspec prepare: error: config error: eval.temperature: Input should be greater than or equal to 0 (got -1)"
    )
    assert not res.exists()


def test_bench_refuses_a_negative_probe_count_before_any_work(tmp_path):
    res = tmp_path / "res"
    path = write_config(tmp_path / "c.yaml", res)
    proc = subprocess.run([sys.executable, "-m", "deepspec.cli", "bench", "train", "--config", str(path),
                           "--probe-pace", "-1"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "deepspec bench: error: --probe-pace: -1 rounds; 0 (no pinning) or more"
    assert not res.exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_cli_debug_shows_the_traceback(tmp_path, how):
    """A missing file is one line by default; with --debug (or DEEPSPEC_DEBUG=1) the whole stack, so a
    torch error deep in a stage can be traced."""
    import os

    path = write_config(tmp_path / "c.yaml", tmp_path / "res")
    argv = [sys.executable, "-m", "deepspec.cli", *(["--debug"] if how == "flag" else []), "extract", "--config",
            str(path), "--shard", "00000"]
    env = {**os.environ, "DEEPSPEC_DEBUG": "1" if how == "env" else "0"}
    quiet = subprocess.run(argv[:3] + argv[4:] if how == "flag" else argv, capture_output=True, text=True,
                           env={**env, "DEEPSPEC_DEBUG": "0"})
    assert quiet.returncode == 2 and len(quiet.stderr.strip().splitlines()) == 1, quiet.stderr
    loud = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert loud.returncode == 1 and "Traceback (most recent call last)" in loud.stderr
    assert quiet.stderr.strip().split("error: ", 1)[1] in loud.stderr.strip().splitlines()[-1]


def test_schema_file_matches_model():
    """The schema Snakemake validates against is generated from the pydantic model, not written by hand."""
    import json
    from pathlib import Path

    from deepspec.config import json_schema

    committed = json.loads((Path(__file__).parents[1] / "workflow/schemas/config.schema.json").read_text())
    assert committed == json.loads(json.dumps(json_schema())), "run `deepspec schema` to regenerate"


def test_block_methods_name_block_drafters(tmp_path):
    drafters = {"e3": {"kind": "eagle3"}, "df": {"kind": "dflash"}}
    msg = _err(tmp_path, drafters=drafters, methods={"ar": {"kind": "autoregressive"}, "b": {"kind": "block", "drafter": "e3"}})
    assert msg == "config error: methods.b.drafter: 'e3' is a eagle3 drafter, which a method of kind 'block' cannot decode with"
    msg = _err(tmp_path, drafters=drafters,
               methods={"ar": {"kind": "autoregressive"}, "b": {"kind": "block", "drafter": "df", "length": "cost"}})
    assert msg == "config error: methods.b.length: 'cost' needs a drafter with a confidence head (dspark)"
    msg = _err(tmp_path, drafters={"ds": {"kind": "dspark", "markov_head_type": "lstm"}},
               methods={"ar": {"kind": "autoregressive"}, "b": {"kind": "block", "drafter": "ds"}})
    assert msg.startswith("config error: drafters.ds.markov_head_type: Input should be 'vanilla', 'gated' or 'rnn'")
    msg = _err(tmp_path, drafters={"ds": {"kind": "dflash", "label_convention": "previous"}},
               methods={"ar": {"kind": "autoregressive"}, "b": {"kind": "block", "drafter": "ds"}})
    assert msg.startswith("config error: drafters.ds.label_convention: Input should be 'next' or 'own'")


def test_shipped_configs_validate_and_dry_run(tmp_path):
    """Every config the repository ships validates, and the Table 1 profile's DAG trains all three drafters
    on one feature cache."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "config").glob("*.yaml")):
        if not path.name.startswith("bench_"):  # (bench_*.yaml are recipe lists for `deepspec bench train`)
            load(path)
    proc = subprocess.run(["snakemake", "-n", "--configfile", "config/table1_cpu.yaml", "--config", f"results_dir={tmp_path}"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = {line.split()[0]: int(line.split()[1]) for line in proc.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts["train"] == 3 and counts["extract"] == 4 and counts["evaluate"] == 24  # 4 methods x 6 packaged tasks
