"""DFlash / DSpark block drafters on small models: no block sees target features at or after its anchor,
training labels line up with what the proposer drafts (both conventions), greedy decoding is lossless
with long accepted blocks, sampled decoding keeps the target's distribution with the Markov head's
sequential draws, calibration lowers ECE, and the checkpoint layouts of DeepSpec and z-lab load."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import greedy_distillation_data, lossless_tau, pipeline_config, tiny_llama

LAYERS = [0, 1]  # output-of-layer ids: HF hidden_states[1], [2]


def _drafter(target, algorithm="dspark", convention="next", block=4, rank=8, seed=0, dtype=torch.float64, **meta):
    from deepspec.drafters.block.model import BlockDrafter

    vocab = target.config.vocab_size
    return BlockDrafter.for_target(
        target, algorithm, LAYERS, torch.arange(vocab), layers=1, block_size=block, label_convention=convention,
        mask_token_id=vocab - 1, markov_rank=rank if algorithm == "dspark" else 0,
        confidence_head=algorithm == "dspark", seed=seed, **meta).to(dtype)


def _features(target, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        hs = target(ids[None], output_hidden_states=True).hidden_states
    return torch.cat([hs[k + 1][0] for k in LAYERS], dim=-1)


def _dc(**over):
    base = dict(num_anchors=None, eval_anchors=None, loss_gamma=4.0, ce_weight=1.0, l1_weight=0.0, confidence_weight=0.0,
                anchors="supervised")
    base.update(over)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("anchor_context", [False, True])
def test_blocks_never_see_features_at_or_after_their_anchor(anchor_context):
    """Anchors closer than the block size: changing the target features at or after an anchor must not
    change that block's outputs (keying visibility on block index instead of position would leak), with
    or without the state before the anchor added to its row."""
    from deepspec.drafters.block.model import block_positions

    target = tiny_llama(vocab=64, layers=3)
    d = _drafter(target, block=4, anchor_context=anchor_context)
    T = 14
    ids = torch.randint(0, 64, (T,), generator=torch.Generator().manual_seed(0))
    feats = _features(target, ids)
    anchors = torch.tensor([3, 5, 6, 10])  # 5 and 6 are closer than B = 4 to their neighbours

    def outputs(f):
        ctx = d.context(f)
        ctx_kv = d.context_kv(ctx, torch.arange(T))
        with torch.no_grad():
            h = d.backbone(d.block_inputs(ids[anchors], ctx[anchors - 1]), block_positions(anchors, 4), ctx_kv, anchors)
        return h.view(len(anchors), 4, -1)

    base = outputs(feats)
    for i, a in enumerate(anchors.tolist()):
        changed = feats.clone()
        changed[a:] += torch.randn_like(changed[a:])
        out = outputs(changed)
        torch.testing.assert_close(out[i], base[i])  # this block saw nothing at or after its anchor
        earlier = feats.clone()
        earlier[a - 1] += 1.0
        assert not torch.allclose(outputs(earlier)[i], base[i])  # but it does read the position just before


@pytest.mark.parametrize("heads,kv_heads,anchor_context", [(4, 2, False), (4, 4, False), (4, 2, True)])
def test_training_blocks_equal_one_block_at_a_time(heads, kv_heads, anchor_context):
    """All blocks of a sequence in one training pass (per-block attention over the context before each
    anchor and the block itself) give exactly what the inference path gives for each block alone, with
    the context cut at its anchor: with and without grouped-query heads, anchors closer than B apart, and
    with the state before each anchor added to its row."""
    from deepspec.drafters.block.model import block_positions

    target = tiny_llama(vocab=64, layers=3, heads=heads, kv_heads=kv_heads)
    d = _drafter(target, block=4, anchor_context=anchor_context)
    T = 20
    ids = torch.randint(0, 64, (T,), generator=torch.Generator().manual_seed(3))
    feats = _features(target, ids)
    anchors = torch.tensor([1, 4, 5, 11, 18])
    with torch.no_grad():
        ctx = d.context(feats)
        ctx_kv = d.context_kv(ctx, torch.arange(T))
        together = d.backbone(d.block_inputs(ids[anchors], ctx[anchors - 1]), block_positions(anchors, 4), ctx_kv, anchors)
        for i, a in enumerate(anchors.tolist()):
            kv = [(k[:, :a], v[:, :a]) for k, v in ctx_kv]
            alone = d.backbone(d.block_inputs(ids[a : a + 1], ctx[a - 1 : a]), torch.arange(a, a + 4), kv, None)
            torch.testing.assert_close(together[4 * i : 4 * i + 4], alone)


@pytest.mark.parametrize("convention,anchor_context", [("next", False), ("own", False), ("next", True)])
def test_training_labels_line_up_with_inference(convention, anchor_context):
    """What training scores draft j on (the target's distribution at anchor + j, i.e. the token at
    anchor + 1 + j) is what the proposer's draft j is verified against, with the same logits; with
    `anchor_context`, training and the proposer add the same state (the one before the anchor) to its row."""
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.block.loss import block_terms
    from deepspec.drafters.block.proposer import BlockProposer
    from deepspec.models import make_backend

    target = tiny_llama(vocab=64, layers=3)
    d = _drafter(target, "dflash", convention, block=4, anchor_context=anchor_context).eval()
    T, a = 16, 9
    ids = torch.randint(0, 64, (T,), generator=torch.Generator().manual_seed(1))
    feats = _features(target, ids)
    D = d.drafts
    assert D == (4 if convention == "next" else 3)
    # Labels whose argmax is the token at a + 1 + j: a one-hot target at each position t predicting ids[t + 1].
    top = torch.cat([ids[1:], ids[-1:]])
    labels = {"target_idx": top[:, None], "target_p": torch.ones(T, 1, dtype=torch.float64), "target_top": top,
              "trained": torch.arange(T) < T - 1, "weight": torch.ones(T, dtype=torch.float64)}
    with torch.no_grad():
        terms = block_terms(d, feats, ids, labels, torch.tensor([a]), None)
    # Inference: the committed prefix is ids[: a + 1]; the anchor ids[a] has no feature yet.
    proposer = BlockProposer(_drafter(target, "dflash", convention, block=4, anchor_context=anchor_context).eval(), 64)
    proposer.observe([feats[:a, : 32], feats[:a, 32:]])
    tree = proposer.propose(ids[: a + 1].tolist(), 16)
    assert len(tree) == D and tree.is_chain()
    positions = tree.positions(a)[1:]  # node j is verified at position a + 1 + j
    assert positions.tolist() == [a + 1 + j for j in range(D)]
    # The training path's draft logits are the proposer's (same block, same context, same rows).
    with torch.no_grad():
        ctx = d.context(feats[:a])
        ctx_kv = d.context_kv(ctx, torch.arange(a))
        h = d.backbone(d.block_inputs(ids[a : a + 1], ctx[-1:]), torch.arange(a, a + 4), ctx_kv, None)[d.draft_rows]
        plain = d.backbone(d.block_inputs(ids[a : a + 1], torch.zeros_like(ctx[-1:])), torch.arange(a, a + 4), ctx_kv,
                           None)[d.draft_rows]
    assert tree.tokens == d.lm_head(h).argmax(-1).tolist()
    assert torch.equal(h, plain) != anchor_context  # the option adds the state, and only with it
    # A drafter that output exactly tree.tokens would be scored as hitting where they equal the labels.
    hits = [int(tree.tokens[j] == int(ids[a + 1 + j])) for j in range(D)]
    assert terms["hit"][0].int().tolist() == hits
    engine = Engine(make_backend(target, "lean", 64), stop_ids=[], max_nodes=8)
    assert engine.generate(ids[:6].tolist(), 12, proposer).tokens == engine.generate(ids[:6].tolist(), 12).tokens


def _overfit(target, algorithm, convention, prompts, steps=150):
    """A block drafter trained on the target's own greedy continuations of `prompts` until it predicts them
    well: acceptance is then high, so the lossless tests exercise long accepted blocks."""
    from deepspec.drafters.block.loss import run_batch
    from deepspec.drafters.kind import Direct

    seqs, labels = greedy_distillation_data(target, prompts, hidden_ids=[k + 1 for k in LAYERS])
    d = _drafter(target, algorithm, convention, block=4)
    dspark = algorithm == "dspark"
    dc = _dc(ce_weight=0.5 if dspark else 1.0, l1_weight=0.5 if dspark else 0.0, confidence_weight=1.0 if dspark else 0.0)
    params = [p for p in d.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    for step in range(steps):
        opt.zero_grad()
        run_batch(Direct(d), seqs, labels, dc, True, torch.Generator().manual_seed(step))
        opt.step()
    return d.eval(), seqs, labels, dc


def _recording(proposer) -> list:
    """The trees `proposer` returns from here on (its propose wrapped)."""
    seen: list = []
    propose = proposer.propose
    proposer.propose = lambda tokens, n: seen.append(propose(tokens, n)) or seen[-1]
    return seen


@pytest.fixture(scope="module")
def prompts():
    return [torch.randint(0, 64, (7,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(3)]


@pytest.mark.parametrize("algorithm,convention", [("dflash", "next"), ("dflash", "own"), ("dspark", "next")])
def test_overfit_block_drafter_is_lossless_with_long_accepted_blocks(prompts, algorithm, convention):
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.block.proposer import BlockProposer
    from deepspec.models import make_backend

    target = tiny_llama(vocab=64, layers=3)
    d, _, _, _ = _overfit(target, algorithm, convention, prompts)
    engine = Engine(make_backend(target, "lean", 256), stop_ids=[], max_nodes=16)
    lengths = ["fixed", "threshold"] if algorithm == "dspark" else ["fixed"]
    for length in lengths:
        tau, _ = lossless_tau(engine, BlockProposer(d, 256, length=length, threshold=0.3), prompts, [[5, 6, 7]])
        assert tau > 2.0, f"{length}: tau {tau:.2f}"


def test_block_tree_and_cost_length_are_lossless(prompts):
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.block.proposer import BlockProposer
    from deepspec.models import make_backend

    target = tiny_llama(vocab=64, layers=3)
    d, _, _, _ = _overfit(target, "dspark", "next", prompts, steps=60)
    engine = Engine(make_backend(target, "lean", 256), stop_ids=[], max_nodes=16)
    for proposer in (BlockProposer(d, 256, tree_top_k=3, tree_threshold=0.9),
                     BlockProposer(d, 256, length="cost", verify_ms=[10.0, 10.5, 11.0, 30.0, 60.0])):
        for prompt in prompts + [[9, 3, 1]]:
            assert engine.generate(prompt, 30, proposer).tokens == engine.generate(prompt, 30).tokens
    trees = BlockProposer(d, 256, tree_top_k=3, tree_threshold=0.99)
    proposed = _recording(trees)
    assert engine.generate([9, 3, 1], 20, trees).tokens == engine.generate([9, 3, 1], 20).tokens
    assert any(t is not None and not t.is_chain() for t in proposed)  # siblings were really proposed
    # the cost model stops where the verify cost jumps (4 rows here): at most 2 drafts
    cost = BlockProposer(d, 256, length="cost", verify_ms=[10.0, 10.5, 11.0, 30.0, 60.0])
    gen = engine.generate(prompts[0], 30, cost)
    assert max(gen.proposed) <= 2


def _blocks(g: torch.Generator, n: int, scale: float, shift: float) -> dict[str, torch.Tensor]:
    """Synthetic held-out blocks of 3 drafts whose confidence logit is (true log-odds − shift) · scale."""
    true = torch.randn(n, 3, generator=g) * 1.5  # the real log-odds of acceptance
    accept = torch.sigmoid(true)  # 1 − TV: the sampled acceptance probability
    hit = torch.rand(n, 3, generator=g) < accept  # a greedy event with that probability
    return {"confidence": (true - shift) * scale, "hit": hit, "valid": torch.ones(n, 3, dtype=torch.bool),
            "accept": accept}


def test_calibration_lowers_ece_on_held_out_blocks():
    """Over-sharp confidences get a temperature > 1 and a lower held-out ECE, under both acceptance rules;
    a temperature keeps each position's ranking."""
    from deepspec.drafters.block.calibration import calibrate

    g = torch.Generator().manual_seed(0)
    result = calibrate(_blocks(g, 4000, 3.0, 0.0), _blocks(g, 4000, 3.0, 0.0))
    assert set(result) == {"greedy", "sampled"}
    for rule, r in result.items():
        assert all(t > 1.5 for t in r["temperature_only"]), rule
        assert r["pooled"]["after"]["ece"] < 0.5 * r["pooled"]["before"]["ece"], rule
        assert r["pooled"]["temperature_only"]["ece"] < 0.5 * r["pooled"]["before"]["ece"], rule
        for per in r["per_draft"]:
            assert per["after"]["auroc"] == pytest.approx(per["before"]["auroc"], abs=1e-4)  # (ties from saturation)
    # Sampled events at draft j weigh each block by the chance its earlier drafts were accepted.
    assert result["sampled"]["per_draft"][1]["weight"] == pytest.approx(result["sampled"]["per_draft"][0]["weight"] * 0.5,
                                                                        rel=0.1)


def test_calibration_bias_fixes_what_a_temperature_cannot():
    """An under-confident head (log-odds shifted down, the committed DSpark's shape) keeps a large ECE
    with a temperature alone; the bias removes it. The map stays monotone (ranking unchanged)."""
    from deepspec.drafters.block.calibration import calibrate

    g = torch.Generator().manual_seed(1)
    result = calibrate(_blocks(g, 4000, 1.0, 1.5), _blocks(g, 4000, 1.0, 1.5))
    for rule, r in result.items():
        pooled = r["pooled"]
        assert pooled["temperature_only"]["ece"] > 0.05, rule
        assert pooled["after"]["ece"] < 0.4 * pooled["temperature_only"]["ece"], rule
        assert r["map"] == ["temperature_and_bias"] * 3, rule
        assert all(b == pytest.approx(1.5, abs=0.3) for b in r["bias"]), rule
        assert all(t == pytest.approx(1.0, abs=0.2) for t in r["temperature"]), rule


def test_calibration_leaves_a_calibrated_head_alone():
    """A head that already predicts its acceptance (DSpark's, for the sampled rule it is trained on) keeps
    the identity on most drafts: cross-validation on the fit half does not refit it to noise, so held-out
    ECE does not rise."""
    from deepspec.drafters.block.calibration import calibrate

    g = torch.Generator().manual_seed(2)
    result = calibrate(_blocks(g, 600, 1.0, 0.0), _blocks(g, 600, 1.0, 0.0))
    for rule, r in result.items():
        assert r["map"].count("identity") >= 2, (rule, r["map"])
        assert r["pooled"]["after"]["ece"] <= r["pooled"]["before"]["ece"] + 0.005, rule


def test_calibration_picks_the_decoding_rule_and_old_folders_load(tmp_path):
    """The proposer's confidence uses the greedy map when decoding greedily and the sampled map otherwise;
    a folder written before the bias (one temperature row) loads with that row for both rules."""
    from safetensors.torch import load_file, save_file

    from deepspec.drafters.block.model import BlockDrafter

    target = tiny_llama(vocab=64, layers=3, dtype=torch.float32)
    d = _drafter(target, dtype=torch.float32)
    with torch.no_grad():
        d.confidence_temperature.copy_(torch.tensor([[2.0] * 4, [0.5] * 4]))
        d.confidence_bias.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
    h, state = torch.randn(d.config["hidden_size"]), torch.randn(8)
    with torch.no_grad():
        z = d.confidence_logit(h, state)
        assert float(d.confidence(h, state, 0, sampled=False)) == pytest.approx(float(torch.sigmoid(z / 2.0)))
        assert float(d.confidence(h, state, 0, sampled=True)) == pytest.approx(float(torch.sigmoid(z / 0.5 + 1.0)))

    folder = d.save(tmp_path / "old")
    weights = load_file(str(folder / "model.safetensors"))
    weights["confidence_temperature"] = torch.full((4,), 1.5)
    del weights["confidence_bias"]
    save_file(weights, str(folder / "model.safetensors"))
    old = BlockDrafter.load(folder, target.get_input_embeddings().weight)
    assert old.confidence_temperature.tolist() == [[1.5] * 4] * 2 and not old.confidence_bias.any()


def test_markov_sampling_keeps_the_target_distribution():
    """Sampled block drafting with the Markov head: each draft is drawn from softmax(base + bias(previous
    draft)) and recorded with exactly that q, so verification keeps the target's distribution (chi-square
    against the exact joint, as tests/test_sampling.py does for generic drafts)."""
    from deepspec.drafters.block.proposer import BlockProposer
    from tests.test_sampling import DRAWS

    model = tiny_llama(vocab=6, layers=2, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.25)
    d = _drafter(model, "dspark", block=3, rank=4, seed=5)
    with torch.no_grad():  # a strong bigram bias, so a q without it would be far from the drawn distribution
        d.markov_head.markov_w2.weight.normal_(std=2.0)
    pvalue, accepted = sampled_joint_pvalue(model, BlockProposer(d, 64, temperature=1.0, seed=7), seed=1234)
    assert pvalue > 1e-3
    assert accepted > DRAWS // 4  # drafts were accepted often: the rejection path is not all that ran


def sampled_joint_pvalue(model, proposer, seed: int) -> tuple[float, int]:
    """χ² p-value of the joint of two speculated tokens after [1, 2, 3], decoded at T = 1 with `proposer`,
    against the target's exact joint; and the drafted tokens accepted over all draws."""
    from scipy.stats import chisquare

    from deepspec.decoding.engine import Engine
    from deepspec.decoding.verify import Sampling
    from deepspec.models import make_backend
    from tests.test_sampling import DRAWS, PROMPT, _exact_joint

    sampling = Sampling(temperature=1.0)
    engine = Engine(make_backend(model, "lean", 64), stop_ids=[], sampling=sampling, max_nodes=8)
    gen = torch.Generator().manual_seed(seed)
    counts: dict[tuple[int, int], int] = {}
    accepted = 0
    for _ in range(DRAWS):
        out = engine.generate(PROMPT, 3, proposer, gen)
        counts[(out.tokens[1], out.tokens[2])] = counts.get((out.tokens[1], out.tokens[2]), 0) + 1
        accepted += sum(out.accepted_depth)
    exact = _exact_joint(model, sampling)
    big = [k for k, p in exact.items() if p * DRAWS >= 5]
    obs = [counts.get(k, 0) for k in big] + [DRAWS - sum(counts.get(k, 0) for k in big)]
    exp = [exact[k] * DRAWS for k in big] + [DRAWS - sum(exact[k] * DRAWS for k in big)]
    return chisquare(obs, exp).pvalue, accepted


def _zlab_folder(path, target, block=4):
    """A tiny random checkpoint written the way z-lab's DFlashDraftModel saves one."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    h, heads, kv, hd, inter = 32, 4, 2, 8, 64
    w = {"fc.weight": (h, h * len(LAYERS)), "hidden_norm.weight": (h,), "norm.weight": (h,)}
    for i in range(2):
        p = f"layers.{i}."
        w.update({p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.k_proj.weight": (kv * hd, h),
                  p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.o_proj.weight": (h, heads * hd),
                  p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                  p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                  p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                  p + "post_attention_layernorm.weight": (h,)})
    tensors = {k: (1.0 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else 0.2 * torch.randn(s, generator=g)
               for k, s in w.items()}
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    config = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": h, "intermediate_size": inter,
              "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "vocab_size": target.config.vocab_size, "num_hidden_layers": 2,
              "block_size": block, "num_target_layers": target.config.num_hidden_layers,
              "dflash_config": {"target_layer_ids": LAYERS, "mask_token_id": 63}}
    (path / "config.json").write_text(json.dumps(config))
    return path


DEEPSPEC_KEYS = {"fc.weight", "hidden_norm.weight", "norm.weight", "embed_tokens.weight", "lm_head.weight",
                 "markov_head.markov_w1.weight", "markov_head.markov_w2.weight", "confidence_head.proj.weight",
                 "confidence_head.proj.bias"} | {
    f"layers.0.{k}.weight" for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj",
                                     "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}


def test_deepspec_layout_round_trip_and_zlab_layout_loads(tmp_path):
    """Ours -> DeepSpec's layout (exact key names and config fields) -> our proposer drafts the same block;
    a z-lab DFlash folder loads with its own label convention and decodes losslessly."""
    import json

    from safetensors.torch import load_file

    from deepspec.decoding.engine import Engine
    from deepspec.drafters.block.checkpoint import export_block, import_block
    from deepspec.drafters.block.proposer import BlockProposer
    from deepspec.models import make_backend

    target = tiny_llama(vocab=64, layers=3, dtype=torch.float32)
    from deepspec.drafters.block.model import BlockDrafter

    def make(vocab_ids):
        d = BlockDrafter.for_target(target, "dspark", LAYERS, vocab_ids, layers=1, block_size=4, label_convention="next",
                                    mask_token_id=63, markov_rank=8, confidence_head=True, seed=2)
        with torch.no_grad():
            d.markov_head.markov_w2.weight.normal_(std=0.5)
            d.confidence_temperature.fill_(1.7)
            d.confidence_bias[1].fill_(0.3)
        return d

    # A reduced draft vocabulary is widened: its head / Markov rows land on their target ids.
    reduced = make(torch.arange(0, 64, 2))
    folder = export_block(reduced, tmp_path / "reduced", target.lm_head.weight)
    assert set(load_file(str(folder / "model.safetensors"))) == DEEPSPEC_KEYS
    w = load_file(str(folder / "model.safetensors"))
    torch.testing.assert_close(w["lm_head.weight"][0::2], reduced.lm_head.weight.detach())
    torch.testing.assert_close(w["lm_head.weight"][1::2], target.lm_head.weight.detach()[1::2])
    torch.testing.assert_close(w["markov_head.markov_w2.weight"][0::2], reduced.markov_head.markov_w2.weight.detach())
    assert not w["markov_head.markov_w2.weight"][1::2].any()
    written = json.loads((folder / "config.json").read_text())
    assert written["architectures"] == ["Qwen3DSparkModel"]
    for key in ("block_size", "mask_token_id", "target_layer_ids", "markov_rank", "markov_head_type",
                "enable_confidence_head", "confidence_head_with_markov"):
        assert key in written, key
    # Full vocabulary: the round trip drafts exactly what the original does.
    ours = make(torch.arange(64))
    back = import_block(export_block(ours, tmp_path / "deepspec", target.lm_head.weight), target)
    assert back.config["label_convention"] == "next" and back.drafts == 4
    engine = Engine(make_backend(target, "lean", 128), stop_ids=[], max_nodes=8)
    prompt = [3, 9, 27, 17, 51]
    ga = engine.generate(prompt, 20, BlockProposer(copy.deepcopy(ours), 128))
    gb = engine.generate(prompt, 20, BlockProposer(back, 128))
    assert ga.tokens == gb.tokens == engine.generate(prompt, 20).tokens
    assert ga.accepted == gb.accepted  # the same drafts were proposed and accepted
    torch.testing.assert_close(back.confidence_temperature, ours.confidence_temperature)
    torch.testing.assert_close(back.confidence_bias, ours.confidence_bias)

    zlab = import_block(_zlab_folder(tmp_path / "zlab", target), target)
    assert zlab.config["label_convention"] == "own" and zlab.drafts == 3
    assert zlab.draft_rows.tolist() == [1, 2, 3]
    gen = engine.generate(prompt, 20, BlockProposer(zlab, 128))
    assert gen.tokens == engine.generate(prompt, 20).tokens and max(gen.proposed) == 3
    with pytest.raises(ValueError, match="neither DeepSpec"):
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 32}))
        (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
        import_block(bad, target)


def test_vllm_layout_keeps_a_reduced_vocabulary_and_drafts_what_ours_does(tmp_path):
    """`export --to vllm` (DFlash with z-lab's labels): z-lab's keys plus the reduced head and vLLM's `d2t` offsets;
    read back, the drafter proposes and gets accepted exactly what the original does. Drafters vLLM's DFlash
    proposer would misread are refused, saying why."""
    import json

    from safetensors.torch import load_file

    from deepspec.decoding.engine import Engine
    from deepspec.drafters.block.checkpoint import export_block, import_block
    from deepspec.drafters.block.model import BlockDrafter
    from deepspec.drafters.block.proposer import BlockProposer
    from deepspec.models import make_backend

    target = tiny_llama(vocab=64, layers=3, dtype=torch.float32)
    draft_ids = torch.arange(0, 64, 2)
    d = BlockDrafter.for_target(target, "dflash", LAYERS, draft_ids, layers=1, block_size=4, label_convention="own",
                                mask_token_id=63, seed=2)
    folder = export_block(d, tmp_path / "vllm", target.lm_head.weight, engine="vllm")
    w = load_file(str(folder / "model.safetensors"))
    assert set(w) == {k for k in DEEPSPEC_KEYS if not k.startswith(("markov", "confidence", "embed"))} | {"d2t"}
    assert w["lm_head.weight"].shape == (32, 32)
    assert (torch.arange(32) + w["d2t"]).tolist() == draft_ids.tolist()
    written = json.loads((folder / "config.json").read_text())
    assert written["architectures"] == ["DFlashDraftModel"] and written["draft_vocab_size"] == 32
    assert written["dflash_config"] == {"target_layer_ids": LAYERS, "mask_token_id": 63} and written["block_size"] == 4
    back = import_block(folder, target)
    assert back.config["label_convention"] == "own" and back.draft_to_target.tolist() == draft_ids.tolist()
    engine = Engine(make_backend(target, "lean", 128), stop_ids=[], max_nodes=8)
    prompt = [2, 8, 26, 16, 50]
    ga, gb = (engine.generate(prompt, 20, BlockProposer(x, 128)) for x in (d, back))
    assert ga.tokens == gb.tokens == engine.generate(prompt, 20).tokens
    assert ga.accepted == gb.accepted and ga.proposed == gb.proposed
    for algorithm, convention in (("dflash", "next"), ("dspark", "own")):
        other = BlockDrafter.for_target(target, algorithm, LAYERS, draft_ids, layers=1, block_size=4,
                                        label_convention=convention, mask_token_id=63,
                                        markov_rank=8 * (algorithm == "dspark"))
        with pytest.raises(ValueError, match="label_convention: own"):
            export_block(other, tmp_path / algorithm, target.lm_head.weight, engine="vllm")


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_markov_head_teacher_forcing_equals_sequential_drafting(kind):
    """Training scores each draft with the Markov state of the true previous tokens (all at once); the
    proposer builds the state left to right from the tokens it drafts. Teacher-forced on the proposer's own
    drafts, training's logits pick exactly those drafts, for every head type; with the Markov head's
    weights this large, a state carried wrongly (or not at all) picks others."""
    from deepspec.drafters.block.model import BlockDrafter
    from deepspec.drafters.block.proposer import BlockProposer

    target = tiny_llama(vocab=64, layers=3)
    d = BlockDrafter.for_target(target, "dspark", LAYERS, torch.arange(64), layers=1, block_size=5,
                                label_convention="next", mask_token_id=63, markov_rank=6, markov_head_type=kind,
                                confidence_head=True, seed=4).to(torch.float64).eval()
    with torch.no_grad():  # a head that matters: large weights, the gate open, an RNN state that moves
        d.markov_head.markov_w1.weight.normal_(std=1.0)
        d.markov_head.markov_w2.weight.normal_(std=3.0)
        if kind == "gated":
            d.markov_head.markov_gate.bias.fill_(4.0)
        if kind == "rnn":
            d.markov_head.markov_u.weight.normal_(std=1.0)
    T, a = 14, 6
    ids = torch.randint(0, 63, (T,), generator=torch.Generator().manual_seed(2))
    feats = _features(target, ids)
    proposer = BlockProposer(copy.deepcopy(d), 64)
    proposer.observe(list(feats[:a].split(target.config.hidden_size, dim=-1)))
    drafted = proposer.propose(ids[: a + 1].tolist(), 8).tokens
    assert len(drafted) == d.drafts
    with torch.no_grad():
        ctx = d.context(feats[:a])
        ctx_kv = d.context_kv(ctx, torch.arange(a))
        h = d.backbone(d.block_inputs(ids[a : a + 1], ctx[-1:]), torch.arange(a, a + 5), ctx_kv, None)[d.draft_rows]
        teacher, states = d.draft_logits(h, torch.tensor([int(ids[a])] + drafted[:-1]))  # draft j follows draft j-1
        assert teacher.argmax(-1).tolist() == drafted
        free = d.lm_head(h).argmax(-1).tolist()  # the Markov head must matter for this test to mean anything
        assert free != drafted
        unchained = d.draft_logits(h, ids[a : a + d.drafts])[0].argmax(-1).tolist()
        assert unchained != drafted  # other previous tokens, other drafts
        conf = d.confidence_logit(h, states)
        for j in range(d.drafts):
            torch.testing.assert_close(d.confidence_logit(h[j], states[j]), conf[j])


def test_answer_anchors_sit_where_the_target_wrote_the_next_token():
    """`anchors: answer` draws every training anchor from positions followed by a target-written token,
    even when the loss supervises the prompt too; `supervised` draws from anywhere supervised; evaluation
    anchors are unchanged by it."""
    from deepspec.drafters.block.loss import training_anchors

    T = 60
    answer = torch.zeros(T, dtype=torch.bool)
    answer[40:59] = True  # the target wrote tokens 41..59
    labels = {"trained": torch.arange(T) < T - 1, "answer": answer}
    seen_answer, seen_any = set(), set()
    for seed in range(20):
        a = training_anchors(labels, _dc(num_anchors=8, anchors="answer"), torch.Generator().manual_seed(seed))
        assert a.numel() == 8 and bool(answer[a].all()) and a.unique().numel() == 8
        seen_answer |= set(a.tolist())
        seen_any |= set(training_anchors(labels, _dc(num_anchors=8), torch.Generator().manual_seed(seed)).tolist())
    assert seen_answer == set(range(40, 59))  # every answer position is drawn sometime
    assert min(seen_any) < 40  # the supervised mode draws from the prompt too
    dc = _dc(eval_anchors=None, anchors="answer")
    assert training_anchors(labels, dc, None).tolist() == list(range(1, T - 1))


def test_dflash_branches_at_its_first_draft_and_stays_lossless(prompts):
    """DFlash has no confidence head, so `tree_top_k` puts the next best tokens beside its first draft
    (siblings under the root); the tree path really runs, is lossless and still accepts long blocks."""
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.block.proposer import BlockProposer
    from deepspec.models import make_backend

    target = tiny_llama(vocab=64, layers=3)
    d, _, _, _ = _overfit(target, "dflash", "next", prompts, steps=60)
    engine = Engine(make_backend(target, "lean", 256), stop_ids=[], max_nodes=16)
    proposer = BlockProposer(d, 256, tree_top_k=3)
    trees = _recording(proposer)
    committed = forwards = 0
    for prompt in prompts:
        gen = engine.generate(prompt, 30, proposer)
        assert gen.tokens == engine.generate(prompt, 30).tokens
        committed, forwards = committed + len(gen.tokens), forwards + gen.forwards
    drafted = [t for t in trees if t is not None]
    assert drafted and all(len(t) == d.drafts + 2 and t.parents[d.drafts:] == [-1, -1] for t in drafted)
    assert committed / forwards > 1.5


def test_block_input_scale_trains_and_folds_into_the_export(tmp_path):
    """A block drafter with `fc_input_scale` reads its features scaled per fused layer; the DeepSpec export
    folds the scale into fc, so the exported drafter computes the same context."""
    from deepspec.drafters.block.checkpoint import export_block, import_block
    from deepspec.drafters.block.model import BlockDrafter

    target = tiny_llama(vocab=64, layers=3, dtype=torch.float32)
    d = BlockDrafter.for_target(target, "dflash", LAYERS, torch.arange(64), layers=1, block_size=4,
                                label_convention="next", mask_token_id=63, seed=1, fc_input_scale=True)
    with torch.no_grad():
        d.fc_in_scale.copy_(torch.linspace(0.1, 3.0, d.fc_in_scale.numel()))
    feats = _features(target.double(), torch.arange(10)).float()
    target.float()
    back = import_block(export_block(d, tmp_path / "scaled", target.lm_head.weight), target)
    assert not hasattr(back, "fc_in_scale")
    with torch.no_grad():
        torch.testing.assert_close(back.context(feats), d.context(feats), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(back.context(feats), d.hidden_norm(d.fc(feats)))  # the scale mattered


def test_acceptance_weights_follow_the_chance_each_draft_is_reached():
    """`loss_gamma: acceptance` weights draft j by the product of the earlier drafts' acceptance: a block whose
    first draft is never accepted trains only that draft; `loss_gamma` a number keeps DeepSpec's decay."""
    from deepspec.drafters.block.loss import draft_weights

    accept = torch.tensor([[0.5, 0.4, 1.0, 0.3], [0.0, 0.9, 0.9, 0.9]])
    torch.testing.assert_close(draft_weights(accept, "acceptance"), torch.tensor([[1.0, 0.5, 0.2, 0.2], [1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(draft_weights(accept, 2.0), torch.exp(-torch.arange(4.0) / 2)[None].expand(2, 4))
    assert torch.equal(draft_weights(accept, None), torch.ones(2, 4))


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_copied_target_layers_start_from_the_targets_own_context_keys(model_type):
    """`init_layers: target`: the drafter's layer is the target layer after the deepest fused one, and its
    context values are exactly what that target layer computes from the fused layer's output. Keys match in
    direction; a Llama target (no k_norm) gets a k_norm weight that keeps their median scale, a Qwen3 target
    its own k_norm. A randomly initialised drafter computes neither."""
    from deepspec.drafters.block.model import BlockDrafter

    target = tiny_llama(vocab=64, layers=3, dtype=torch.float32, model_type=model_type)
    feats = _features(target, torch.arange(1, 40))
    fresh = lambda: BlockDrafter.for_target(target, "dflash", LAYERS, torch.arange(64), layers=1, block_size=4,  # noqa: E731
                                            label_convention="next", mask_token_id=63, seed=1)
    d, random = fresh(), fresh()
    assert d.copy_target_layers(target, feats) == [2]
    theirs = target.model.layers[2]
    with torch.no_grad():
        h = theirs.input_layernorm(feats[:, -32:])  # the output of layer 1, layer 2's input
        for drafter, copied in ((d, True), (random, False)):
            ctx = drafter.context(feats)
            mine = drafter.layers[0].self_attn
            assert torch.allclose(ctx, h, atol=1e-5) == copied
            assert torch.allclose(mine.v_proj(ctx), theirs.self_attn.v_proj(h), atol=1e-5) == copied
        mine = d.layers[0].self_attn
        k_theirs = theirs.self_attn.k_proj(h).view(h.shape[0], -1, mine.head_dim)
        k_mine = mine.k_norm(mine.k_proj(d.context(feats)).view(h.shape[0], -1, mine.head_dim))
        if model_type == "qwen3":
            torch.testing.assert_close(k_mine, theirs.self_attn.k_norm(k_theirs))
        else:
            assert torch.allclose(torch.cosine_similarity(k_mine, k_theirs, dim=-1), torch.ones(()), atol=1e-5)
            ratio = (k_mine.norm(dim=-1) / k_theirs.norm(dim=-1)).median()
            assert abs(float(ratio) - 1.0) < 0.05
        torch.testing.assert_close(d.layers[0].mlp.down_proj.weight, theirs.mlp.down_proj.weight)


def test_wall_budget_sizes_the_schedule_from_the_timed_steps():
    """Steps 3..10 took 0.5 s each after 2 s for the first two (6 s in all): a 20 s budget leaves 14 s, 28
    more steps."""
    from deepspec.training.trainer import _sized_total

    history = [{"step": k, "wall_s": 1.0 * k if k <= 2 else 2.0 + 0.5 * (k - 2)} for k in range(1, 11)]
    assert _sized_total(20.0, history, 10, history[-1]["wall_s"]) == 38
    assert _sized_total(1.0, history, 10, history[-1]["wall_s"]) == 10  # already past the budget: stop here


def test_wall_budget_resizes_at_the_recent_pace():
    """A slow start (1 s a step for 10 steps) sizes a 20 s budget to 20 steps; when steps 11..20 take 0.1 s,
    the re-size at step 20 reads their pace, not the start's, and fills the 9 s left with 90 more steps."""
    from deepspec.training.trainer import _sized_total

    history = [{"step": k, "wall_s": float(k) if k <= 10 else 10.0 + 0.1 * (k - 10)} for k in range(1, 21)]
    assert _sized_total(20.0, history[:10], 10, history[9]["wall_s"]) == 20
    assert _sized_total(20.0, history, 20, history[-1]["wall_s"]) == 110


def test_block_recipe_knobs_through_training_under_a_wall_budget(tmp_path, tiny_target_dir, monkeypatch):
    """A DFlash drafter trained from the pipeline's feature cache with answer anchors, a trainable head,
    the fc input scale, the state before each anchor in its row (which no export layout holds), its layer
    copied from the target's, acceptance-weighted drafts and a wall-time budget: the schedule is resized
    once the first steps are timed (to 16 steps here, whatever the machine's pace) and anneals by its end,
    the head moved, the drafter decodes losslessly, and export refuses it."""
    from deepspec import io
    from deepspec.training import trainer
    from deepspec.config import validate
    from deepspec.data.regenerate import regenerate
    from deepspec.drafters.build import build_proposer
    from deepspec.decoding.engine import Engine
    from deepspec.features.extract import extract_all
    from deepspec.models import load_target
    from deepspec.training.trainer import train
    from safetensors.torch import load_file

    raw = pipeline_config(tmp_path, tiny_target_dir).model_dump(mode="json")
    raw["drafters"]["b"] = {"kind": "dflash", "layers": [0, 1, 2], "num_layers": 1, "block_size": 3, "num_anchors": 4,
                            "draft_vocab": 300, "anchors": "answer", "freeze_head": False, "fc_input_scale": True,
                            "init_layers": "target", "loss_gamma": "acceptance", "anchor_context": True,
                            "train": {"wall_budget_s": 1e-3, "epochs": 50, "batch_sequences": 2, "warmup_steps": 2,
                                      "val_sequences": 1, "eval_every": 4, "save_every": 4}}
    raw["methods"]["b"] = {"kind": "block", "drafter": "b", "tree_top_k": 2}
    cfg = validate(raw)
    regenerate(cfg)
    extract_all(cfg)
    sized = []
    monkeypatch.setattr(trainer, "_sized_total", lambda budget, history, step, wall: sized.append(step) or 16)
    out = train(cfg, "b")
    log = io.read_jsonl(out / "train_log.jsonl")
    metrics = json.loads((out / "metrics.json").read_text())
    assert sized == [10] and metrics["steps"] == len(log) == 16  # 50 epochs would be 150 steps
    assert log[-1]["lr"] < 0.2 * log[2]["lr"]  # annealed to near its floor (0.1), not cut at the peak
    saved = json.loads((out / "model" / "config.json").read_text())
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert saved["fc_input_scale"] and weights["fc_in_scale"].unique().numel() == 3  # one scale per fused layer
    assert saved["anchor_context"]
    target = load_target(str(tiny_target_dir), max_len=256)
    head = target.loaded.model.get_output_embeddings().weight.detach()
    d2t = torch.arange(weights["d2t"].numel()) + weights["d2t"]
    assert not torch.allclose(weights["lm_head.weight"], head[d2t].float())  # the head trained
    proposer = build_proposer(cfg.methods["b"], target, "b", cfg.out_dir / "drafters")
    engine = Engine(target.backend, target.loaded.eos_ids, max_nodes=16)
    prompt = list(range(100, 120))
    assert engine.generate(prompt, 24, proposer).tokens == engine.generate(prompt, 24).tokens
    from deepspec.drafters.block.checkpoint import export_block

    with pytest.raises(ValueError, match="anchor_context .* has no place in DeepSpec's"):
        export_block(proposer.drafter, tmp_path / "export", head)
    assert not (tmp_path / "export").exists()
