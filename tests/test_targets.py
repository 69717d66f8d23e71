"""Training labels: cached top-k soft targets, the draft vocabulary and the supervised positions."""

import torch

from deepspec.training.targets import draft_vocab, soft_targets, supervised, training_targets


def _seq(T=9, H=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"final": torch.randn(T, H, generator=g), "input_ids": torch.randint(0, 20, (T,), generator=g),
            "loss_mask": torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1], dtype=torch.bool)[:T]}


def test_full_k_soft_targets_equal_the_dense_distribution_over_the_draft_vocab():
    head = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    seq = _seq()
    cached = soft_targets([seq], head, k=20, chunk=4)[0]  # chunks must not change anything
    logits = seq["final"] @ head.T
    assert torch.equal(cached["argmax"], logits.argmax(-1))
    ids = torch.tensor([1, 3, 4, 7, 11, 19])
    lookup = torch.full((20,), -1)
    lookup[ids] = torch.arange(ids.numel())
    t = training_targets(cached, seq["loss_mask"], lookup, "all")
    dense = torch.zeros(seq["final"].shape[0], ids.numel())
    dense.scatter_add_(1, t["target_idx"], t["target_p"])
    torch.testing.assert_close(dense, torch.softmax(logits[:, ids], -1), rtol=1e-5, atol=1e-6)
    assert torch.equal(t["weight"].bool(), t["trained"] & torch.isin(logits.argmax(-1), ids))


def test_top_k_keeps_the_largest_probabilities_renormalised_inside_the_draft_vocab():
    head = torch.randn(20, 8, generator=torch.Generator().manual_seed(2))
    seq = _seq()
    cached = soft_targets([seq], head, k=3)[0]
    full = torch.log_softmax(seq["final"] @ head.T, -1)
    torch.testing.assert_close(cached["top_logp"], full.topk(3, -1).values)
    t = training_targets(cached, seq["loss_mask"], torch.arange(20), "all")
    torch.testing.assert_close(t["target_p"].sum(-1), torch.ones(seq["final"].shape[0]))


def test_supervised_positions_all_or_assistant():
    mask = torch.tensor([0, 0, 1, 1, 0, 1], dtype=torch.bool)
    assert supervised(mask, "assistant").tolist() == [False, True, True, False, True, False]
    assert supervised(mask, "all").tolist() == [True] * 5 + [False]


def test_draft_vocab_holds_only_occurring_tokens_and_stops_at_coverage():
    tgt = [{"argmax": torch.tensor([5, 5, 5, 5, 2, 2, 9, 7])}]
    mask = [torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)]  # token 7 is not supervised
    ids, cov = draft_vocab(tgt, mask, 12, size=100)
    assert ids.tolist() == [2, 5, 9] and cov == 1.0  # no padding up to 100
    ids, cov = draft_vocab(tgt, mask, 12, size=100, coverage=0.8)
    assert ids.tolist() == [2, 5] and abs(cov - 6 / 7) < 1e-9
    ids, _ = draft_vocab(tgt, mask, 12, size=1)
    assert ids.tolist() == [5]
