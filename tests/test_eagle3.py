"""EAGLE-3 end to end on small models: training-time test equals cached inference, the proposer is
lossless, and regeneration, the feature cache and training all resume exactly."""

from __future__ import annotations

import json

import pytest
import torch

from deepspec.cli import crash_after
from tests.conftest import fit_eagle3, pipeline_config, tiny_llama


def _drafter(target, vocab_ids=None, layers=(0, 1), dtype=torch.float64, seed=0):
    from deepspec.drafters.eagle3.model import Eagle3Drafter

    ids = torch.arange(target.config.vocab_size) if vocab_ids is None else vocab_ids
    return Eagle3Drafter.for_target(target, list(layers), ids, init_head=True, seed=seed).to(dtype)


def test_training_time_test_equals_cached_tree_steps():
    """Step k of base t in training sees exactly what a depth-k node sees at inference, when the committed rows
    are stepped as the proposer steps them: their K/V written, only the last row carried through the layer."""
    from deepspec.drafters.eagle3.model import DraftCache

    target = tiny_llama(vocab=64, layers=3)
    drafter = _drafter(target, torch.arange(0, 64, 2))  # a reduced vocabulary: every other token
    T, steps = 12, 4
    torch.manual_seed(1)
    hidden = torch.randn(T, 2 * 32, dtype=torch.float64)
    ids = torch.randint(0, 64, (T,))
    with torch.no_grad():
        ttt = drafter.ttt_forward(hidden, ids, steps)
    for t in (0, 3, 6):
        cache = DraftCache(drafter, 64)
        feats = drafter.fc(hidden[: t + 1])
        h, logp = drafter.step(ids[1 : t + 2], feats, torch.arange(t + 1), cache, 0,
                               torch.full((t + 1, t + 1), float("-inf"), dtype=torch.float64).triu_(1))
        torch.testing.assert_close(logp[t], ttt[0][t])
        full_k = cache.k[:, : t + 1].clone()
        cache = DraftCache(drafter, 64)
        parent, last = drafter.step(ids[1 : t + 2], feats, torch.arange(t + 1), cache, 0, None, out_rows=slice(-1, None))
        assert parent.shape[0] == last.shape[0] == 1
        torch.testing.assert_close(last[0], ttt[0][t])
        torch.testing.assert_close(parent[0], h[t])
        torch.testing.assert_close(cache.k[:, : t + 1], full_k)
        rows = []
        for k in range(1, steps):
            write = t + 1 + len(rows)
            mask = torch.full((1, write + 1), float("-inf"), dtype=torch.float64)
            mask[0, : t + 1] = 0.0
            mask[0, rows + [write]] = 0.0
            parent, lp = drafter.step(ids[t + 1 + k : t + 2 + k], parent, torch.tensor([t + k]), cache, write, mask)
            rows.append(write)
            torch.testing.assert_close(lp[0], ttt[k][t])


@pytest.mark.parametrize("input_scale", [False, True])
def test_copied_target_layer_first_computes_the_targets_own_next_layer(input_scale):
    """`init_layers: target`: step 0 of the drafter at every position is exactly the output of the target layer
    whose input is the deepest fused state (layer 2, reading hidden_states[2]), with or without the fc input
    scale; the token half of q / k / v starts at zero. A randomly initialised drafter computes nothing like it,
    and a target whose attention normalises q / k is refused by name."""
    target = tiny_llama(vocab=64, layers=4, dtype=torch.float32)
    ids = torch.arange(1, 30)
    with torch.no_grad():
        hs = target(ids[None], output_hidden_states=True).hidden_states
    feats = torch.cat([hs[k][0] for k in (1, 2)], dim=-1)
    copied, random = _drafter(target, layers=(1, 2), dtype=torch.float32), _drafter(target, layers=(1, 2), dtype=torch.float32)
    if input_scale:
        copied.register_buffer("fc_in_scale", torch.linspace(0.5, 2.0, 64))
    assert copied.copy_target_layer(target) == 2
    with torch.no_grad():
        for drafter, same in ((copied, True), (random, False)):
            step0 = next(drafter.ttt_states(feats, ids, 1))
            assert torch.allclose(step0, hs[3][0, :-1], atol=1e-5) == same
    assert not copied.midlayer.self_attn.q_proj.weight[:, :32].any()
    qwen3 = tiny_llama(vocab=64, layers=3, model_type="qwen3")
    with pytest.raises(ValueError, match="q_norm"):
        _drafter(qwen3, layers=(1, 2)).copy_target_layer(qwen3)


@pytest.mark.parametrize("backend", ["lean", "hf"])
@pytest.mark.parametrize("top_k,total", [(1, 4), (3, 10)])
def test_eagle3_proposer_is_lossless(backend, top_k, total):
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.eagle3.proposer import Eagle3Proposer
    from deepspec.models import make_backend

    target = tiny_llama(vocab=64, layers=3)
    be = make_backend(target, backend, 256)
    # The drafter predicts well only if trained; an untrained one still exercises every code path, and
    # its head copied from the target makes some guesses right.
    proposer = Eagle3Proposer(_drafter(target, layers=(1, 2)), 256, depth=4, top_k=top_k, total_tokens=total)
    engine = Engine(be, stop_ids=[], max_nodes=16)
    for seed in range(3):
        prompt = torch.randint(0, 64, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
        ar = engine.generate(prompt, 40)
        spec = engine.generate(prompt, 40, proposer)
        assert spec.tokens == ar.tokens
        assert sum(spec.proposed) > 0


def test_step_k_of_base_t_is_scored_on_token_t_plus_2_plus_k(monkeypatch):
    """The label alignment of training-time test: a drafter that puts all its mass on x_{t+2+k} at step k
    of base t scores every valid position and has ~zero loss; one position off, it would score nothing."""
    target = tiny_llama(vocab=64, layers=3)
    drafter = _drafter(target)  # full vocabulary: draft id == target id
    T, steps = 12, 3
    ids = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:T]  # distinct tokens: no lucky hits

    def oracle(hidden, input_ids, steps):
        out = []
        for k in range(steps):
            lp = torch.full((T - 1, 64), -40.0, dtype=torch.float64)
            lp[torch.arange(T - 1), input_ids[(torch.arange(T - 1) + 2 + k).clamp(max=T - 1)]] = 0.0
            out.append(torch.log_softmax(lp, -1))
        return out

    monkeypatch.setattr(drafter, "ttt_forward", oracle)
    top = torch.cat([ids[1:], ids[-1:]])  # the target at position j predicts token j+1
    trained = torch.ones(T, dtype=torch.bool)
    trained[-1] = False  # the last position has no next token
    losses, hits, run = drafter.ttt_loss(torch.zeros(T, 96, dtype=torch.float64), ids, top[:, None],
                                         torch.ones(T, 1, dtype=torch.float64), top, trained.double(), trained, steps)
    assert [int(h) for h in hits] == [T - 2 - k for k in range(steps)]
    assert all(float(x) < 1e-6 for x in losses)
    assert run[: T - 2 - steps].tolist() == [steps] * (T - 2 - steps)


@pytest.fixture(scope="module")
def overfit():
    target = tiny_llama(vocab=64, layers=3)
    prompts = [torch.randint(0, 64, (7,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(3)]
    return target, prompts, fit_eagle3(_drafter(target, layers=(1, 2)), target, prompts, layers=(1, 2))


@pytest.mark.parametrize("top_k,total", [(1, 4), (3, 10)])
def test_overfit_eagle3_drafter_is_lossless_with_long_accepted_paths(overfit, top_k, total):
    """Losslessness with a drafter that is mostly right: the real proposer's tree masks and positions are
    exercised on long accepted paths, and a wrong mask or position would break equality or acceptance."""
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.eagle3.proposer import Eagle3Proposer
    from deepspec.models import make_backend

    target, prompts, drafter = overfit
    engine = Engine(make_backend(target, "lean", 256), stop_ids=[], max_nodes=16)
    proposer = Eagle3Proposer(drafter, 256, depth=4, top_k=top_k, total_tokens=total)
    committed = forwards = 0
    for prompt in prompts:
        ar = engine.generate(prompt, 40)
        spec = engine.generate(prompt, 40, proposer)
        assert spec.tokens == ar.tokens
        committed += len(spec.tokens)
        forwards += spec.forwards
    assert committed / forwards > 2.0, f"tau {committed / forwards:.2f}: the drafter should be right most of the time"


def test_chain_drafting_on_the_device_equals_the_top_1_tree(overfit):
    """A chain (top_k 1) is drafted step by step on the drafter's device with no host sync: every round it
    proposes exactly what the EAGLE-2 tree builder picks with top_k 1, and long paths get accepted."""
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.eagle3.proposer import Eagle3Proposer
    from deepspec.models import make_backend

    class BothWays(Eagle3Proposer):
        rounds = 0

        def _chain(self, root_logp, root_h, base, length):
            tree = self._tree(root_logp, root_h, base, length)
            chain = super()._chain(root_logp, root_h, base, length)
            assert tree.is_chain() and tree.tokens == chain
            self.rounds += 1
            return chain

    target, prompts, drafter = overfit
    engine = Engine(make_backend(target, "lean", 256), stop_ids=[], max_nodes=16)
    proposer = BothWays(drafter, 256, depth=5, top_k=1, total_tokens=5)
    for prompt in prompts:
        spec = engine.generate(prompt, 40, proposer)
        assert spec.tokens == engine.generate(prompt, 40).tokens and max(spec.accepted) >= 4
    assert proposer.rounds > 10


@pytest.mark.parametrize("top_k", [1, 3])
def test_cost_length_keeps_what_pays_and_stays_lossless(overfit, top_k):
    """`length: cost` on the overfit drafter: where verifying is free the cut keeps whole trees (long accepted paths);
    where each row costs far more than a draft can earn it drafts nothing (a plain step every round, no expansion);
    on a curve between, the trees are smaller than the fixed ones, and the nodes it keeps are the sure ones: a
    larger share of them is accepted. Always lossless."""
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.eagle3.proposer import Eagle3Proposer
    from deepspec.models import make_backend

    class Counting(Eagle3Proposer):
        def _tree(self, *args):
            tree = super()._tree(*args)
            self.sizes.append(len(tree))
            return tree

    target, prompts, drafter = overfit
    engine = Engine(make_backend(target, "lean", 256), stop_ids=[], max_nodes=16)
    total = 4 if top_k == 1 else 10
    curves = {"free": [10.0] * (total + 1), "steep": [10.0 * 4**k for k in range(total + 1)],
              "between": [10.0 + 3.0 * k for k in range(total + 1)]}
    tau, sizes, taken = {}, {}, {}
    for name, verify_ms in curves.items():
        proposer = Counting(drafter, 256, depth=4, top_k=top_k, total_tokens=total, verify_ms=verify_ms)
        proposer.sizes = []
        tau[name], generations = _lossless_tau(engine, proposer, prompts)
        sizes[name] = proposer.sizes
        taken[name] = sum(sum(g.accepted_depth) for g in generations) / max(1, sum(sum(g.proposed) for g in generations))
    assert tau["free"] > 2.0 and max(sizes["free"]) == total
    assert tau["steep"] <= 1.0 and set(sizes["steep"]) == {0}
    assert 1.2 < tau["between"] < tau["free"] and sum(sizes["between"]) < sum(sizes["free"])
    assert taken["between"] > max(0.75, taken["free"])


def test_cost_growth_skips_depths_that_cannot_pay_and_stays_lossless(overfit):
    """`grow: cost` on the overfit drafter: where only one draft row pays, the cut keeps one node, so drafting its
    children is wasted; the forecast stops expanding after the one expansion it learns from, where growth by depth
    expands every round. Where rows are free it grows the whole tree. Always lossless, drafts accepted."""
    from deepspec.decoding.cost import GrowthForecast
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.eagle3.proposer import Eagle3Proposer
    from deepspec.models import make_backend

    class Always(GrowthForecast):  # growth by depth, its expansions counted
        def pays(self, *args, **kw) -> bool:
            return True

    target, prompts, drafter = overfit
    engine = Engine(make_backend(target, "lean", 256), stop_ids=[], max_nodes=16)
    one_row = [1e3, 1e3] + [1e6] * 10  # target rows in seconds: the drafter's milliseconds cannot tip a decision
    taus = {}
    for name, forecast in {"depth": Always(3, one_row), "cost": GrowthForecast(3, one_row),
                           "free": GrowthForecast(3, [1e3] * 12)}.items():
        proposer = Eagle3Proposer(drafter, 256, depth=4, top_k=3, total_tokens=10,
                                  verify_ms=forecast.verify_ms, forecast=forecast)
        tau, generations = _lossless_tau(engine, proposer, prompts)
        if name != "free":
            assert all(max(g.proposed) == 1 for g in generations)
        taus[name] = (tau, forecast._expansions)
    (tau_depth, grown_depth), (tau_cost, grown_cost), (tau_free, grown_free) = taus.values()
    assert grown_depth > 30 and grown_cost == 1, "by depth every round expands; by cost only the first"
    assert tau_cost == pytest.approx(tau_depth) and tau_cost > 1.8, "the same one-node drafts, mostly accepted"
    assert tau_free > 2.0 and grown_free > 30


def _lossless_tau(engine, proposer, prompts, new_tokens: int = 40):
    """τ of `proposer` over `prompts` (tokens per target forward), every output asserted token-identical to plain
    decoding; and the generations."""
    generations = []
    for prompt in prompts:
        spec = engine.generate(prompt, new_tokens, proposer)
        assert spec.tokens == engine.generate(prompt, new_tokens).tokens
        generations.append(spec)
    return sum(len(g.tokens) for g in generations) / sum(g.forwards for g in generations), generations


def test_calibrated_length_learns_from_every_verified_node_and_stays_lossless(overfit):
    """`length: calibrated`: the calibration counts each verified node once, as taken exactly when the engine
    accepted it (a generation's last tree is never labelled: its commits end the sequence), and the cut reads the
    learned map: a calibration that has seen nothing taken drafts nothing, where the identity drafts trees."""
    from deepspec.decoding.cost import AcceptanceCalibration
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.eagle3.proposer import Eagle3Proposer
    from deepspec.models import make_backend

    target, prompts, drafter = overfit
    engine = Engine(make_backend(target, "lean", 256), stop_ids=[], max_nodes=16)
    between = [10.0 + 3.0 * k for k in range(11)]
    proposer = Eagle3Proposer(drafter, 256, depth=4, top_k=3, total_tokens=10, verify_ms=between,
                              calibration=AcceptanceCalibration())
    cal = proposer.calibration
    for prompt in prompts:
        seen, taken = sum(cal.seen), sum(cal.taken)
        spec = engine.generate(prompt, 40, proposer)
        assert spec.tokens == engine.generate(prompt, 40).tokens
        assert sum(cal.seen) - seen == sum(spec.proposed[:-1])
        assert sum(cal.taken) - taken == sum(spec.accepted_depth[:-1])
    assert sum(cal.taken) > 20 and sum(cal.seen) > sum(cal.taken), "long paths accepted, and some nodes rejected"

    never = AcceptanceCalibration()
    never.update([(b + 0.5) / 10 for b in range(10)] * 1000, [False] * 10000)
    pessimist = Eagle3Proposer(drafter, 256, depth=4, top_k=3, total_tokens=10, verify_ms=between,
                               calibration=never)
    spec = engine.generate(prompts[0], 40, pessimist)
    assert spec.tokens == engine.generate(prompts[0], 40).tokens and set(spec.proposed) == {0}


def test_sharegpt_reader_recovers_truncated_file(tmp_path):
    from deepspec.data.regenerate import load_conversations, read_sharegpt
    from deepspec.config import TrainDataConfig

    rows = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"},
                                               {"from": "human", "value": f"q{i}b"}]} for i in range(3)]
    rows.append({"id": "sys", "conversations": [{"from": "gpt", "value": "starts with the assistant"}]})
    text = json.dumps(rows, indent=1)
    path = tmp_path / "sg.json"
    path.write_text(text[: text.rindex('"id": "sys"') + 12])  # cut inside the last conversation
    got, truncated = read_sharegpt(path)
    assert truncated and [r["id"] for r in got] == ["c0", "c1", "c2"]
    convs, _, _, note = load_conversations(TrainDataConfig(kind="sharegpt", source=str(path)))
    assert convs[1] == {"id": "c1", "turns": ["q1", "q1b"], "answers": ["a", None]} and "3 whole conversations" in note
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a JSON array"):
        read_sharegpt(path)


# ---- the training pipeline on a tiny model with the real tokenizer ----------------------------------

def test_regeneration_resumes_without_duplicates_or_gaps(tmp_path, tiny_target_dir):
    from deepspec import io
    from deepspec.data.regenerate import regenerate
    from deepspec.layout import train_data_file

    whole = pipeline_config(tmp_path / "a", tiny_target_dir)
    reference = io.read_jsonl(regenerate(whole))
    assert len(reference) == 8 and all(sum(r["loss_mask"]) > 0 for r in reference)
    assert all(len(r["answers"]) == 2 for r in reference)  # both turns regenerated

    cfg = pipeline_config(tmp_path / "b", tiny_target_dir)
    with pytest.raises(KeyboardInterrupt):
        regenerate(cfg, on_batch=crash_after(1, "batches"))
    partial = train_data_file(cfg).with_name("regenerated.jsonl.partial")
    lines = partial.read_text().splitlines()
    assert len(lines) == 3  # one whole batch
    with open(partial, "a") as fh:  # a crash in the middle of the next batch's write
        fh.write(lines[0] + "\n" + lines[1][:40])
    resumed = io.read_jsonl(regenerate(cfg))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "data_hash"} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(reference)
    assert not partial.exists()


def test_fixed_data_keeps_dataset_answers_next_to_regenerated_ones(tmp_path, tiny_target_dir):
    """EAGLE-1's fixed-data mode: `dataset_samples` more conversations keep their own answers (cut at
    max_new_tokens), marked as such, disjoint from the regenerated ones; the HF backend regenerates the
    same greedy answers as our batched lean forward."""
    from deepspec import io
    from deepspec.config import validate
    from deepspec.data.regenerate import regenerate
    from deepspec.models import load_model

    cfg = pipeline_config(tmp_path, tiny_target_dir)
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"id": f"m{i}", "messages": [
        {"role": "user", "content": f"Question {i}?"},
        {"role": "assistant", "content": "Short answer." if i % 2 else "A long answer " + "and more " * 20}]}) + "\n"
        for i in range(7)))
    raw = cfg.model_dump(mode="json")
    raw["train_data"].update(source=str(src), max_samples=3, dataset_samples=3, max_turns=1, temperature=0.0)
    rows = io.read_jsonl(regenerate(validate(raw)))
    kinds = [r["answer_source"] for r in rows]
    assert kinds == ["target"] * 3 + ["dataset"] * 3 and len({r["id"] for r in rows}) == 6
    tok = load_model(str(tiny_target_dir)).tokenizer
    for r in rows[3:]:
        answer = [t for t, m in zip(r["input_ids"], r["loss_mask"]) if m]
        if r["answers"][0].startswith("A long"):
            assert len(answer) == 12 and tok.decode(answer).startswith("A long answer")  # cut, no stop token
        else:
            assert tok.decode(answer[:-1]) == "Short answer." and answer[-1] == tok.eos_token_id
    raw["results_dir"] = str(tmp_path / "hf")
    raw["train_data"]["backend"] = "hf"
    hf_rows = io.read_jsonl(regenerate(validate(raw)))
    assert [r["input_ids"] for r in hf_rows] == [r["input_ids"] for r in rows]


def test_feature_cache_training_and_exact_resume(tmp_path, tiny_target_dir):
    from deepspec import io
    from deepspec.data.regenerate import regenerate
    from deepspec.drafters.build import build_proposer
    from deepspec.features.extract import FeatureCacheError, extract_all, load_manifest
    from deepspec.layout import features_dir, shard_path
    from deepspec.models import load_target
    from deepspec.layout import drafter_dir
    from deepspec.training.trainer import train

    cfg = pipeline_config(tmp_path, tiny_target_dir)
    regenerate(cfg)
    extract_all(cfg)
    manifest = load_manifest(features_dir(cfg))
    assert manifest["layers"] == [1, 2, 3] and len(manifest["shards"]) == 2
    assert manifest["tokens"] == sum(len(r["input_ids"]) for r in io.read_jsonl(tmp_path / "results/tiny/data/train/regenerated.jsonl"))

    # A corrupted shard is caught, and extract redoes only that shard.
    shard = shard_path(cfg, 1)
    blob = bytearray(shard.read_bytes())
    blob[-5] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(FeatureCacheError, match="checksum mismatch"):
        load_manifest(features_dir(cfg))
    extract_all(cfg)
    load_manifest(features_dir(cfg))

    # Uninterrupted reference run, then a run killed after 4 steps (checkpoint at 3) and resumed.
    out = train(cfg, "d")
    reference = io.read_jsonl(out / "train_log.jsonl")
    assert reference[-1]["step"] == len(reference) >= 8
    assert any("val_tau_chain" in r for r in reference)
    import shutil

    shutil.rmtree(drafter_dir(cfg, "d"))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, "d", on_step=crash_after(4, "steps"))
    train(cfg, "d")
    resumed = io.read_jsonl(out / "train_log.jsonl")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in reference]
    saved = json.loads((out / "model" / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    # The draft vocabulary holds only argmax tokens that occur (capped at 300), so it covers them all.
    assert saved["architectures"] == ["LlamaForCausalLMEagle3"] and saved["draft_vocab_size"] == metrics["draft_vocab"]
    assert 50 < metrics["draft_vocab"] <= 300 and metrics["vocab_coverage"] == 1.0
    assert metrics["supervise"] == "all" and metrics["supervised_positions"] > metrics["assistant_positions"] > 0
    assert not list(out.rglob("*.pt"))  # weights as safetensors, the train state as torch.distributed.checkpoint
    assert (out / "checkpoint" / "train_state" / "dcp" / ".metadata").is_file()

    # The trained drafter decodes losslessly through the engine.
    from deepspec.decoding.engine import Engine

    target = load_target(str(tiny_target_dir), max_len=256)
    proposer = build_proposer(cfg.methods["e3"], target, "e3", cfg.out_dir / "drafters")
    engine = Engine(target.backend, target.loaded.eos_ids, max_nodes=16)
    prompt = list(range(100, 120))
    assert engine.generate(prompt, 24, proposer).tokens == engine.generate(prompt, 24).tokens


def test_training_subset_keeps_the_validation_split():
    """Training on fewer of a cache's sequences draws them from the same training split and scores on the
    same validation sequences; asking for more than the split holds is refused, naming the field."""
    from deepspec.config_base import TrainConfig
    from deepspec.training.trainer import split

    val, train = split(50, TrainConfig(val_sequences=8, seed=3), "drafters.d.train")
    few_val, few = split(50, TrainConfig(val_sequences=8, seed=3, train_sequences=20), "drafters.d.train")
    assert few_val == val and len(val) == 8 and len(train) == 42 and few == train[:20]
    assert sorted(val + train) == list(range(50))
    assert split(50, TrainConfig(val_sequences=8, seed=4), "drafters.d.train")[0] != val  # the seed draws it
    with pytest.raises(ValueError, match=r"^drafters.d.train.train_sequences: 43, but the training split holds 42 "
                                         r"sequences \(50 in the cache, 8 for validation\)$"):
        split(50, TrainConfig(val_sequences=8, train_sequences=43), "drafters.d.train")


def test_bench_train_compares_recipes_on_one_feature_cache(tmp_path, tiny_target_dir, monkeypatch):
    """Two recipes from the same cache: both trained, read at equal wall time, decoded losslessly; then
    two with wall budgets pinned to steps by probes."""
    from deepspec.config import ConfigError
    from deepspec.data.regenerate import regenerate
    from deepspec.features.extract import extract_all
    from deepspec.training.bench import bench_train, load_recipes

    cfg = pipeline_config(tmp_path, tiny_target_dir)
    regenerate(cfg)
    extract_all(cfg)
    recipes = tmp_path / "bench_train_tiny.yaml"  # outputs are named after it: bench/train_tiny.*
    recipes.write_text("base: {}\nttt2: {ttt_length: 2, train: {lr: 3.0e-3, train_sequences: 3}}\n")
    result = bench_train(cfg, str(recipes), epochs=2, n_prompts=2, max_new_tokens=12)
    rows = result["recipes"]
    assert list(rows) == ["base", "ttt2"]
    assert rows["ttt2"]["overrides"] == {"ttt_length": 2, "train": {"lr": 3.0e-3, "train_sequences": 3}}
    assert (rows["base"]["train_sequences"], rows["ttt2"]["train_sequences"]) == (7, 3)  # 8 cached, 1 for validation
    assert (rows["base"]["steps"], rows["ttt2"]["steps"]) == (6, 2)  # 2 epochs of 3 and of 1 two-sequence batches
    assert all(r["lossless"] and r["decode_tau"] >= 1.0 and r["steps"] > 0 for r in rows.values())
    shortest = min(rows.values(), key=lambda r: r["wall_s"])
    assert result["common_wall_s"] == shortest["wall_s"]
    assert shortest["tau_chain_at_common"] == shortest["final_tau_chain"]  # read at its own end
    saved = json.loads((cfg.out_dir / "drafters/bench-ttt2/model/config.json").read_text())
    assert saved["aux_layers"] == [1, 2, 3]
    table = (cfg.out_dir / "bench/train_tiny.md").read_text()
    assert "| ttt2 " in table and "{lr: 0.003, train_sequences: 3}" in table and "| train seqs " in table
    assert (cfg.out_dir / "bench/train_tiny.png").is_file()
    assert "![learning curves](train_tiny.png)" in table

    bad = tmp_path / "bad.yaml"
    bad.write_text("oops: {ttt_length: 0}\n")
    with pytest.raises(ConfigError, match=r"^config error: recipe oops.ttt_length: Input should be greater than or equal to 1"):
        bench_train(cfg, str(bad))
    with pytest.raises(ConfigError, match=r"recipes file not found"):
        load_recipes(tmp_path / "none.yaml")
    bad.write_text("a: {paced_as: b}\nb: {paced_as: a}\n")
    with pytest.raises(ConfigError, match=r"recipe a: paced_as must name another recipe of the file that is paced by "
                                          r"its own probes, not 'b'"):
        load_recipes(bad)

    # Budgets pinned to steps (the probes run; their seconds are fixed here so the sizing is exact): each
    # recipe is read at its budget on its clock, whatever its steps really took.
    from deepspec.training import trainer

    real = trainer.step_seconds
    probed = []

    def probe(c, n):
        probed.append(n)
        return 0.5 if n.endswith("slow") else 0.25, real(c, n)[1]

    monkeypatch.setattr(trainer, "step_seconds", probe)
    timed = tmp_path / "bench_timed.yaml"
    # `twin` would probe fast, but trains at slow's pace: it is never probed and gets slow's steps
    timed.write_text("fast: {train: {wall_budget_s: 2.0}}\nslow: {ttt_length: 2, train: {wall_budget_s: 2.0}}\n"
                     "twin: {paced_as: slow, ttt_length: 2, train: {wall_budget_s: 2.0, seed: 1}}\n")
    rows = bench_train(cfg, str(timed), n_prompts=1, max_new_tokens=6, probe_rounds=1, out_name="timed_named")["recipes"]
    assert (rows["fast"]["steps"], rows["slow"]["steps"], rows["twin"]["steps"]) == (8, 4, 4)
    assert probed == ["bench-fast", "bench-slow"] and "paced_as" not in rows["twin"]["overrides"]
    assert all(r["wall_s"] == pytest.approx(2.0) and r["tau_chain_at_common"] == r["final_tau_chain"]
               for r in rows.values())
    table = (cfg.out_dir / "bench/timed_named.md").read_text()  # named as asked, not after a recipe
    assert not (cfg.out_dir / "bench/timed.md").exists() and (cfg.out_dir / "bench/timed_named.png").is_file()
    assert "probed s/step" in table and "pinned to a step count" in table
    probed.clear()
    timed.write_text("slow: {ttt_length: 2, train: {wall_budget_s: 2.0}}\n"
                     "twin: {paced_as: slow, ttt_length: 2, train: {wall_budget_s: 2.0, batch_sequences: 1}}\n")
    with pytest.raises(ConfigError, match=r"^config error: bench-twin: paced as bench-slow, but its steps per epoch "
                                          r"differ \(batch_sequences, sequences per step, val_sequences, train_sequences: "
                                          r"\(1, 1, 1, None\) against \(2, 2, 1, None\)\)"):
        bench_train(cfg, str(timed), n_prompts=1, max_new_tokens=6, probe_rounds=1)
    assert probed == [], "refused before any probe ran"


def test_chunked_head_loss_trains_as_the_naive_one():
    """Training-time test through the chunked head (no [T, V] log-probabilities kept) gives the naive path's
    losses, hits, accepted runs and gradients, on a reduced vocabulary with positions outside it (to fp32
    rounding: the naive path takes its log-softmax in fp32)."""
    target = tiny_llama(vocab=64, layers=3)
    drafter = _drafter(target, torch.arange(0, 64, 2), seed=1)
    drafter.lm_head.weight.requires_grad_(True)
    T, steps, k = 14, 4, 6
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(T, 64, dtype=torch.float64, generator=g)
    ids = torch.randint(0, 64, (T,), generator=g)
    idx = torch.randint(0, 32, (T, k), generator=g)
    p = torch.softmax(torch.randn(T, k, dtype=torch.float64, generator=g), -1)
    p[:, -2:] = 0.0
    top = torch.randint(0, 64, (T,), generator=g)
    trained = torch.rand(T, generator=g) > 0.2
    out = {}
    for chunked in (False, True):
        drafter.zero_grad()
        losses, hits, run = drafter.ttt_loss(hidden, ids, idx, p, top, trained.double(), trained, steps,
                                             chunked_head=chunked)
        sum(losses).backward()
        out[chunked] = (torch.stack(losses).detach(), torch.stack(hits), run,
                        {n: q.grad.clone() for n, q in drafter.named_parameters() if q.grad is not None})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-6, atol=1e-9)
    assert torch.equal(out[True][1], out[False][1]) and torch.equal(out[True][2], out[False][2])
    assert out[True][3].keys() == out[False][3].keys() and "lm_head.weight" in out[True][3]
    for name, grad in out[False][3].items():
        torch.testing.assert_close(out[True][3][name], grad, rtol=1e-4, atol=1e-6)
