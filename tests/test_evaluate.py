"""`deepspec evaluate` through the CLI on a tiny target: a killed run resumes from its partial records
(kept samples are not decoded again, a line cut short and another config's rows are dropped, and a second
kill loses nothing), and sampled decoding goes through the same stage with seeded, reproducible outputs."""

from __future__ import annotations

import json

import pytest

import deepspec.evaluation.runner as runner
from deepspec.cli import main
from deepspec.config import validate


def _config(tmp_path, target_dir, **eval_cfg) -> tuple[object, list[str]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    tasks = tmp_path / "questions.jsonl"
    tasks.write_text("".join(json.dumps({"question_id": i, "turns": [f"Write a list of {i + 3} fruits, then repeat it."]})
                             + "\n" for i in range(4)))
    raw = {
        "experiment": "ev", "results_dir": str(tmp_path / "results"),
        "target": {"model": str(target_dir), "max_len": 256},
        "tasks": {"t": {"kind": "jsonl", "source": str(tasks)}},
        "methods": {"ar": {"kind": "autoregressive"}, "pld": {"kind": "ngram", "ngram_min": 1},
                    "self": {"kind": "draft_lm", "depth": 3}},
        "eval": {"max_new_tokens": 12, **eval_cfg},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(raw))
    cfg = validate(raw)
    assert main(["prepare", "--config", str(path)]) == 0
    return cfg, ["--config", str(path)]


def _records(cfg, method: str) -> list[dict]:
    return [json.loads(line) for line in (runner.eval_dir(cfg, method, "t") / "records.jsonl").read_text().splitlines()]


def test_evaluate_resumes_from_partial_records_across_two_kills(tmp_path, tiny_target_dir, monkeypatch):
    cfg, args = _config(tmp_path / "a", tiny_target_dir)
    assert main(["evaluate", *args, "--method", "pld", "--task", "t"]) == 0
    full = _records(cfg, "pld")
    out = runner.eval_dir(cfg, "pld", "t")
    (out / "metrics.json").unlink()
    (out / "records.jsonl").unlink()
    kept = {**full[0], "kept": True}  # a finished sample: must come back as it is, not decoded again
    foreign = {**full[1], "config_hash": "another", "kept": True}  # another config's row: decoded again
    partial = out / "records.jsonl.partial"
    partial.write_text(json.dumps(kept) + "\n" + json.dumps(foreign) + "\n" + json.dumps(full[2])[:40])  # killed mid-line

    real = runner.run_conversation
    calls = []

    def killed_after_one(*a, **k):
        if len(calls) == 2:  # one sample (method + baseline) decoded, then the machine goes away
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(runner, "run_conversation", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        main(["evaluate", *args, "--method", "pld", "--task", "t"])
    rows = [json.loads(line) for line in partial.read_text().splitlines()]  # every line whole after the second kill
    assert [r["question_id"] for r in rows] == [0, 1] and rows[0].get("kept") and not rows[1].get("kept")

    decoded = []
    monkeypatch.setattr(runner, "run_conversation", lambda *a, **k: decoded.append(1) or real(*a, **k))
    assert main(["evaluate", *args, "--method", "pld", "--task", "t"]) == 0
    assert len(decoded) == 2 * 2  # samples 2 and 3, method and baseline; 0 and 1 were kept
    again = _records(cfg, "pld")
    assert [r["question_id"] for r in again] == [0, 1, 2, 3] and again[0].get("kept") and not again[1].get("kept")
    for a, b in zip(again, full):  # greedy: the resumed run decodes what the uninterrupted one did
        assert [t["token_ids"] for t in a["outputs"]] == [t["token_ids"] for t in b["outputs"]]
    assert not partial.exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 4 and metrics["lossless"]["passed"] is True


def test_a_rival_runs_in_turn_with_the_method_and_the_baseline_and_resumes(tmp_path, tiny_target_dir, monkeypatch):
    """`eval.rivals`: the method's job decodes its rival on every sample too, each of the three first, second and
    third once per three samples; the rival's greedy outputs equal the method's, and a killed job keeps its rival
    rows. The head-to-head comes out in the metrics with the rival's name."""
    cfg, args = _config(tmp_path, tiny_target_dir, rivals={"self": "pld"})
    real = runner.run_conversation
    order = []

    def noted(engine, target, turns, max_new, prop, *a, **k):
        order.append(getattr(prop, "name", "ar"))
        if len(order) == 7:  # samples 0 and 1 done, the third's first decode under way
            raise KeyboardInterrupt
        return real(engine, target, turns, max_new, prop, *a, **k)

    monkeypatch.setattr(runner, "run_conversation", noted)
    with pytest.raises(KeyboardInterrupt):
        main(["evaluate", *args, "--method", "self", "--task", "t"])
    assert order == ["draft_lm", "ar", "ngram", "ar", "ngram", "draft_lm", "ngram"]
    order.clear()
    monkeypatch.setattr(runner, "run_conversation", lambda *a, **k: order.append(1) or real(*a, **k))
    assert main(["evaluate", *args, "--method", "self", "--task", "t"]) == 0
    assert len(order) == 2 * 3  # samples 2 and 3: method, baseline and rival; 0 and 1 kept
    recs = _records(cfg, "self")
    assert all("rival" in r and [t["token_ids"] for t in r["rival"]] == [t["token_ids"] for t in r["outputs"]]
               for r in recs)
    metrics = json.loads((runner.eval_dir(cfg, "self", "t") / "metrics.json").read_text())
    rival = metrics["rival"]
    assert rival["method"] == "pld" and rival["samples"] == 4 and rival["same_outputs"] == 4
    assert rival["ci95"][0] <= rival["ratio"] <= rival["ci95"][1]
    assert metrics["lossless"]["passed"] is True


def test_sampled_evaluate_is_seeded_and_exact_where_sampling_is_deterministic(tmp_path, tiny_target_dir):
    """At temperature 1 the outputs depend on eval.seed and only on it. With top_k 1 the target's
    distribution is its argmax: the sampled acceptance path must then commit exactly the greedy output and
    accept every draft of a drafter that is the target itself."""
    greedy_cfg, greedy = _config(tmp_path / "greedy", tiny_target_dir)
    assert main(["evaluate", *greedy, "--method", "self", "--task", "t"]) == 0
    reference = [r["outputs"][0]["token_ids"] for r in _records(greedy_cfg, "self")]

    one_cfg, one = _config(tmp_path / "top1", tiny_target_dir, temperature=1.0, top_k=1)
    assert main(["evaluate", *one, "--method", "self", "--task", "t"]) == 0
    recs = _records(one_cfg, "self")
    assert [r["outputs"][0]["token_ids"] for r in recs] == reference
    assert [r["baseline"][0]["token_ids"] for r in recs] == reference
    metrics = json.loads((runner.eval_dir(one_cfg, "self", "t") / "metrics.json").read_text())
    assert metrics["lossless"]["passed"] is None  # sampled: not judged token by token
    assert metrics["acceptance_by_depth"] == pytest.approx([1.0] * len(metrics["acceptance_by_depth"]))
    assert metrics["tau"] > 2.5

    outs = {}
    for name, seed in (("s0", 0), ("s0_again", 0), ("s1", 1)):
        cfg, args = _config(tmp_path / name, tiny_target_dir, temperature=1.0, seed=seed)
        assert main(["evaluate", *args, "--method", "pld", "--task", "t"]) == 0
        outs[name] = [[t["token_ids"] for t in r["outputs"]] for r in _records(cfg, "pld")]
    assert outs["s0"] == outs["s0_again"] and outs["s0"] != outs["s1"]
    assert [o[0] for o in outs["s0"]] != reference  # sampled, not greedy


def test_a_resumed_suffix_run_drafts_from_the_outputs_it_kept(tmp_path, tiny_target_dir):
    """Suffix decoding learns from earlier outputs: a run resumed after two samples replays their outputs into
    its cache and drafts the rest as the uninterrupted run did (without the replay it does not)."""
    from deepspec.drafters.suffix import SuffixProposer

    cfg, args = _config(tmp_path, tiny_target_dir)
    raw = json.loads(open(args[1]).read())
    raw["methods"]["sfx"] = {"kind": "suffix", "min_token_prob": 0.0}
    open(args[1], "w").write(json.dumps(raw))
    cfg = validate(raw)
    assert main(["evaluate", *args, "--method", "sfx", "--task", "t"]) == 0
    full = _records(cfg, "sfx")
    assert sum(sum(t["proposed"]) for r in full for t in r["outputs"]) > 0
    out = runner.eval_dir(cfg, "sfx", "t")

    def resumed() -> list[dict]:
        (out / "metrics.json").unlink()
        (out / "records.jsonl").unlink()
        (out / "records.jsonl.partial").write_text("".join(json.dumps(r) + "\n" for r in full[:2]))
        assert main(["evaluate", *args, "--method", "sfx", "--task", "t"]) == 0
        return _records(cfg, "sfx")

    def rounds(records: list[dict]) -> list:
        return [(t["accepted"], t["proposed"]) for r in records[2:] for t in r["outputs"]]

    assert rounds(resumed()) == rounds(full)
    remember = SuffixProposer.remember
    try:
        SuffixProposer.remember = lambda self, output: None  # no earlier outputs at all: drafting differs
        assert rounds(resumed()) != rounds(full)
    finally:
        SuffixProposer.remember = remember
