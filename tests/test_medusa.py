"""Medusa heads: the sparse tree, the loss's alignment, lossless decoding (greedy and sampled), checkpoint
layouts in and out, and a drafter trained through the pipeline."""

import itertools
import json

import pytest
import torch

from tests.conftest import greedy_distillation_data, lossless_tau, pipeline_config, tiny_llama


def test_sparse_tree_keeps_the_most_valuable_paths():
    from deepspec.drafters.medusa.proposer import sparse_tree

    acc = [[0.6, 0.2, 0.1], [0.4, 0.3, 0.1], [0.3, 0.2, 0.05]]
    paths = sparse_tree(acc, total=9, depth=3, top_k=3)
    every = [p for d in (1, 2, 3) for p in itertools.product(range(3), repeat=d)]
    value = {p: torch.tensor([acc[k][i] for k, i in enumerate(p)]).prod().item() for p in every}
    best = sorted(every, key=lambda p: -value[p])[:9]
    assert sorted(value[p] for p in paths) == pytest.approx(sorted(value[p] for p in best))
    assert all(p[:-1] in paths[: paths.index(p)] for p in paths if len(p) > 1)  # parents first
    assert sparse_tree(acc, total=4, depth=1, top_k=2) == [(0,), (1,)]  # depth and rank bounds
    assert sparse_tree(acc, total=3, depth=3, top_k=1) == [(0,), (0, 0), (0, 0, 0)]  # top_k 1: a chain


def _fit(target, prompts, heads=3, steps=150, share_head=False):
    from deepspec.drafters.medusa.model import MedusaHeads

    seqs, labels = greedy_distillation_data(target, prompts, new_tokens=40)
    model = MedusaHeads.for_target(target, torch.arange(target.config.vocab_size), heads, 1, share_head).double()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        for s, t in zip(seqs, labels):
            losses, _, _ = model.medusa_loss(s["final"], s["input_ids"], t["target_idx"], t["target_p"], t["target_top"],
                                             t["weight"], t["trained"], heads)
            sum(0.8**k * x / len(s["input_ids"]) for k, x in enumerate(losses)).backward()
        opt.step()
    return model.eval(), seqs, labels


@pytest.fixture(scope="module")
def prompts():
    return [torch.randint(0, 64, (7,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(3)]


@pytest.mark.parametrize("share_head", [True, False])
def test_chunked_medusa_loss_trains_as_the_naive_one(share_head):
    """Each head's readout and loss in row chunks (no [T, V] logits kept) gives the naive path's losses, hits,
    accepted runs and gradients, own heads or the target's shared one, on a vocabulary the targets leave."""
    from deepspec.drafters.medusa.model import MedusaHeads

    target = tiny_llama(vocab=64, layers=2)
    heads = MedusaHeads.for_target(target, torch.arange(0, 64, 2), 3, 2, share_head).double()
    T, k = 15, 5
    g = torch.Generator().manual_seed(4)
    final = torch.randn(T, 32, dtype=torch.float64, generator=g)
    idx = torch.randint(0, 32, (T, k), generator=g)
    p = torch.softmax(torch.randn(T, k, dtype=torch.float64, generator=g), -1)
    top = torch.randint(0, 64, (T,), generator=g)
    trained = torch.rand(T, generator=g) > 0.2
    out = {}
    for chunked in (False, True):
        heads.zero_grad()
        losses, hits, run = heads.medusa_loss(final, top, idx, p, top, trained.double(), trained, 3, chunked_head=chunked)
        sum(losses).backward()
        out[chunked] = (torch.stack(losses).detach(), torch.stack(hits), run,
                        {n: q.grad.clone() for n, q in heads.named_parameters() if q.grad is not None})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-6, atol=1e-9)
    assert torch.equal(out[True][1], out[False][1]) and torch.equal(out[True][2], out[False][2])
    assert out[True][3].keys() == out[False][3].keys() and any(n.startswith("blocks.") for n in out[True][3])
    for name, grad in out[False][3].items():
        torch.testing.assert_close(out[True][3][name], grad, rtol=1e-4, atol=1e-6)


def test_medusa_loss_scores_head_k_against_the_token_k_plus_two_ahead():
    """Heads that output the target's prediction k + 1 positions later hit at every scored position, with
    chains of all three heads; shifted by one position they hit nowhere (the alignment the tree relies on)."""
    from deepspec.drafters.medusa.model import MedusaHeads

    T = 20
    top = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:T]  # distinct: a shift never hits
    trained = torch.ones(T, dtype=torch.bool)
    trained[:3] = False  # a prompt
    t = {"target_idx": top[:, None], "target_p": torch.ones(T, 1, dtype=torch.float64), "target_top": top,
         "weight": trained.double(), "trained": trained}

    def oracle(shift: int):
        class Oracle(MedusaHeads):
            def forward(self, final):
                n = final.shape[0]
                return [torch.nn.functional.one_hot(top[(torch.arange(n) + 1 + k + shift) % T], 64).double()
                        * 50 for k in range(3)]
        return Oracle.for_target(tiny_llama(vocab=64, layers=2), torch.arange(64), 3, 1, True)

    args = (torch.randn(T, 32, dtype=torch.float64), top, t["target_idx"], t["target_p"], t["target_top"], t["weight"],
            t["trained"], 3)
    losses, hits, run = oracle(0).medusa_loss(*args)
    assert [int(h) for h in hits] == [int(trained[1 + k :].sum()) for k in range(3)]
    assert run[: T - 3].tolist() == [3] * (T - 3) and all(float(x) < 1e-6 for x in losses)
    losses, hits, run = oracle(1).medusa_loss(*args)
    assert [int(h) for h in hits] == [0, 0, 0] and not run.any() and all(float(x) > 10 for x in losses)


def test_overfit_medusa_decodes_losslessly_with_accepted_trees(prompts):
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.medusa.proposer import MedusaProposer
    from deepspec.models import make_backend
    from deepspec.models.lean import normed_final

    target = tiny_llama(vocab=64, layers=2)
    heads, _, _ = _fit(target, prompts)
    backend = make_backend(target, "lean", 256)
    engine = Engine(backend, stop_ids=[], max_nodes=16)
    for top_k, total in ((1, 3), (3, 10)):  # a chain, then a sparse tree
        proposer = MedusaProposer(heads, 2, lambda h: normed_final(backend, h), top_k, total)
        tau, depths = lossless_tau(engine, proposer, prompts, [[5, 6, 7]])
        assert tau > 2.0, f"top_k {top_k}: tau {tau:.2f}"
        assert max(depths) == 3  # whole paths of three heads were accepted


def test_medusa_sampling_keeps_the_target_distribution():
    """A deterministic top-k Medusa tree verified at T = 1 keeps the target's joint (χ² against the exact one)."""
    from deepspec.drafters.medusa.model import MedusaHeads
    from deepspec.drafters.medusa.proposer import MedusaProposer
    from deepspec.models import make_backend
    from deepspec.models.lean import normed_final
    from tests.test_block import sampled_joint_pvalue
    from tests.test_sampling import DRAWS

    model = tiny_llama(vocab=6, layers=2, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.25)
    heads = MedusaHeads.for_target(model, torch.arange(6), 2, 1, True).double()
    backend = make_backend(model, "lean", 64)
    proposer = MedusaProposer(heads, 2, lambda h: normed_final(backend, h), top_k=3, total_tokens=6)
    pvalue, accepted = sampled_joint_pvalue(model, proposer, seed=1234)
    assert pvalue > 1e-3
    assert accepted > DRAWS // 4


@pytest.mark.parametrize("share_head,draft_vocab", [(True, 40), (False, 64)])
def test_medusa_layouts_round_trip(tmp_path, share_head, draft_vocab):
    from deepspec.drafters.checkpoint import CheckpointError
    from deepspec.drafters.medusa.checkpoint import export_medusa, import_medusa
    from deepspec.drafters.medusa.model import MedusaHeads
    from safetensors.torch import load_file

    target = tiny_llama(vocab=64, layers=2, dtype=torch.float32)
    ids = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:draft_vocab].sort().values
    heads = MedusaHeads.for_target(target, ids, 3, 2, share_head, target="tiny", target_fingerprint="fp")
    with torch.no_grad():
        for p in heads.blocks.parameters():
            p.normal_(std=0.1)
    h = torch.randn(5, 32)
    full = target.lm_head.weight.detach()
    for fmt in ("vllm", "medusa"):
        folder = export_medusa(heads, fmt, tmp_path / fmt, full)
        back = import_medusa(folder, target, "fp")
        assert back.config["target_fingerprint"] == "fp" and back.heads == 3
        for a, b, d2t_a, d2t_b in zip(heads(h), back(h), [heads.token_map] * 3, [back.token_map] * 3):
            wide_a = torch.full((5, 64), float("-inf")).index_copy(1, d2t_a, a)
            wide_b = torch.full((5, 64), float("-inf")).index_copy(1, d2t_b, b)
            torch.testing.assert_close(wide_a[:, ids], wide_b[:, ids])  # widened: the same logits on the draft rows
        other = torch.ones(64, dtype=torch.bool).index_fill(0, ids, False)
        for readout in back.readouts():  # and the target's own rows elsewhere
            torch.testing.assert_close(readout.weight[other], full[other])
    written = json.loads((tmp_path / "vllm" / "config.json").read_text())
    keys = set(load_file(str(tmp_path / "vllm" / "model.safetensors")))
    assert written["num_heads"] == 3 and written["num_hidden_layers"] == 2 and written["medusa_fc_bias"]
    assert ("lm_head.weight" in keys) == share_head and "token_map" not in keys and "truncated_vocab_size" not in written
    authors = set(load_file(str(tmp_path / "medusa" / "medusa_lm_head.safetensors")))
    assert authors == {f"{k}.{j}.linear.{p}" for k in range(3) for j in range(2) for p in ("weight", "bias")} | \
        {f"{k}.2.weight" for k in range(3)}
    with pytest.raises(CheckpointError, match=r"drafter was trained for target weights fp, these are other$"):
        import_medusa(tmp_path / "vllm", target, "other")
    with pytest.raises(CheckpointError, match=r"drafter is for hidden size 32 and vocabulary 64, the target has 48 and 64"):
        import_medusa(tmp_path / "vllm", tiny_llama(vocab=64, layers=2, hidden=48))


def test_medusa_trains_through_the_pipeline_and_exports(tmp_path, tiny_target_dir):
    """Heads trained from the feature cache's final state: the tree is built from their measured accuracies, the
    trained heads decode losslessly, and `deepspec export` writes vLLM's layout."""
    from deepspec.config import validate
    from deepspec.data.regenerate import regenerate
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.build import build_proposer
    from deepspec.export import export_drafter
    from deepspec.features.extract import extract_all, load_manifest
    from deepspec.layout import features_dir
    from deepspec.models import load_target
    from deepspec.training.trainer import train

    raw = pipeline_config(tmp_path, tiny_target_dir).model_dump(mode="json")
    raw["drafters"] = {"m": {"kind": "medusa", "heads": 3, "draft_vocab": 300,
                             "train": {"epochs": 4, "batch_sequences": 2, "warmup_steps": 2, "val_sequences": 1,
                                       "eval_every": 4, "save_every": 4, "lr": 3e-3}}}
    raw["methods"] = {"ar": {"kind": "autoregressive"}, "m": {"kind": "medusa", "drafter": "m", "top_k": 2,
                                                               "total_tokens": 6}}
    cfg = validate(raw)
    regenerate(cfg)
    extract_all(cfg)
    assert load_manifest(features_dir(cfg))["layers"] == []  # the final state alone: always stored
    out = train(cfg, "m")
    metrics = json.loads((out / "metrics.json").read_text())
    saved = json.loads((out / "model" / "config.json").read_text())
    accuracy = json.loads((out / "head_accuracy.json").read_text())["top_i_accuracy"]
    assert saved["head_accuracy"] == accuracy and len(accuracy) == 3 and len(accuracy[0]) == 10
    assert metrics["head_top1_accuracy"] == [row[0] for row in accuracy] and len(metrics["val_acc"]) == 3
    assert sum(accuracy[0]) <= 1.0 + 1e-6
    target = load_target(str(tiny_target_dir), max_len=256)
    proposer = build_proposer(cfg.methods["m"], target, "m", cfg.out_dir / "drafters")
    engine = Engine(target.backend, target.loaded.eos_ids, max_nodes=16)
    prompt = list(range(100, 120))
    seen = []
    propose = proposer.propose
    proposer.propose = lambda tokens, n: seen.append(propose(tokens, n)) or seen[-1]
    assert engine.generate(prompt, 24, proposer).tokens == engine.generate(prompt, 24).tokens
    assert seen and all(len(tree) == 6 for tree in seen if tree is not None)
    dest = export_drafter(cfg, "m", "vllm")
    assert json.loads((dest / "config.json").read_text())["num_heads"] == 3 and saved["draft_vocab_size"] < 49152
