"""The hybrid proposer: prompt lookup where the output repeats its context, a trained drafter elsewhere.
Greedy decoding is token-identical with both parts drafting and accepted; sampled decoding keeps the
target's distribution (χ²), since each round is one proposer's own draft; merged trees share prefixes and
respect the node budget; the config refuses hybrids that cannot work, naming the field."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tests.conftest import tiny_llama
from tests.test_block import _drafter, _overfit, sampled_joint_pvalue


def test_merge_trees_shares_prefixes_and_keeps_the_budget():
    from deepspec.decoding.tree import DraftTree
    from deepspec.drafters.hybrid import merge_trees

    lookup = DraftTree.chain([5, 6, 7])
    model = DraftTree([5, 9, 6, 8], [-1, -1, 0, 2])  # 5 -> 6 -> 8 shares 5 -> 6 with the chain; 9 is new
    merged = merge_trees([lookup, model], 16)
    assert merged.tokens == [5, 6, 7, 9, 8] and merged.parents == [-1, 0, 1, -1, 1]
    cut = merge_trees([lookup, model], 4)
    assert cut.tokens == [5, 6, 7, 9] and cut.parents == [-1, 0, 1, -1]
    with pytest.raises(ValueError, match="sampled drafts cannot share a tree"):
        merge_trees([DraftTree.chain([1], [torch.ones(4) / 4])], 4)


@pytest.mark.parametrize("mode", ["first", "merge"])
def test_hybrid_of_lookup_and_block_drafter_is_lossless_and_uses_both(mode):
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.block.proposer import BlockProposer
    from deepspec.drafters.hybrid import HybridProposer
    from deepspec.drafters.ngram import NgramProposer
    from deepspec.models import make_backend

    target = tiny_llama(vocab=64, layers=3)
    prompts = [torch.randint(0, 64, (7,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(3)]
    d, _, _, _ = _overfit(target, "dflash", "next", prompts, steps=60)
    engine = Engine(make_backend(target, "lean", 256), stop_ids=[], max_nodes=16)
    hybrid = HybridProposer([NgramProposer(3, 1, 4), BlockProposer(d, 256)], mode)
    committed = forwards = 0
    sources: Counter[str] = Counter()
    for prompt in prompts + [[4, 5, 6, 4, 5, 6, 4, 5]]:  # the last one repeats itself: prompt lookup matches
        gen = engine.generate(prompt, 30, hybrid)
        assert gen.tokens == engine.generate(prompt, 30).tokens
        committed, forwards = committed + len(gen.tokens), forwards + gen.forwards
        assert len(gen.round_sources) == len(gen.round_times) == gen.forwards and gen.round_sources[0] == "prefill"
        sources.update(gen.round_sources[1:])
    assert committed / forwards > 1.5
    if mode == "first":
        assert hybrid.chosen["ngram"] > 0 and hybrid.chosen["dflash"] > 0, hybrid.chosen
    else:
        assert hybrid.chosen["merged"] > 0, hybrid.chosen
    # the engine records who drafted each round, as the hybrid counted them (a merge of one draft is its own)
    drafted = {k: v for k, v in sources.items() if k != "none"}
    if mode == "first":
        assert drafted == dict(hybrid.chosen), (sources, hybrid.chosen)
    else:
        assert drafted.pop("merged") == hybrid.chosen["merged"] and sum(drafted.values()) == hybrid.chosen["single"]
        assert set(drafted) <= {"ngram", "dflash"}, drafted  # a round only one part drafted is that part's


def test_sampled_hybrid_keeps_the_target_distribution():
    """At T = 1 each round is verified as its own proposer's draft (deterministic lookup chains, sampled
    block drafts with their q): the joint of two speculated tokens matches the target's exactly (χ²)."""
    from deepspec.drafters.block.proposer import BlockProposer
    from deepspec.drafters.hybrid import HybridProposer
    from deepspec.drafters.ngram import NgramProposer
    from tests.test_sampling import DRAWS

    model = tiny_llama(vocab=6, layers=2, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.25)
    d = _drafter(model, "dspark", block=3, rank=4, seed=5)
    hybrid = HybridProposer([NgramProposer(2, 1, 2), BlockProposer(d, 64, temperature=1.0, seed=7)])
    pvalue, accepted = sampled_joint_pvalue(model, hybrid, seed=99)
    assert pvalue > 1e-3
    assert hybrid.chosen["ngram"] > DRAWS // 10 and hybrid.chosen["dspark"] > DRAWS // 10, hybrid.chosen
    assert accepted > DRAWS // 4


def test_config_refuses_hybrids_that_cannot_work():
    from deepspec.config import ConfigError, validate

    def cfg(methods, temperature=0.0):
        return validate({"experiment": "h", "tasks": {"t": {"kind": "humaneval"}}, "eval": {"temperature": temperature},
                         "drafters": {"e": {"kind": "eagle3"}, "b": {"kind": "dflash"}},
                         "methods": {"ar": {"kind": "autoregressive"}, "pld": {"kind": "ngram"},
                                     "e3": {"kind": "eagle3", "drafter": "e"}, "bl": {"kind": "block", "drafter": "b"},
                                     **methods}})

    ok = cfg({"h": {"kind": "hybrid", "methods": ["pld", "e3"]}})
    assert ok.method_drafters("h") == ["e"] and ok.drafters_in_use() == ["b", "e"]
    with pytest.raises(ConfigError, match=r"methods.h.methods: 'nope' is not a drafting method"):
        cfg({"h": {"kind": "hybrid", "methods": ["pld", "nope"]}})
    with pytest.raises(ConfigError, match=r"methods.h.methods: 'ar' is not a drafting method"):
        cfg({"h": {"kind": "hybrid", "methods": ["ar", "pld"]}})
    with pytest.raises(ConfigError, match=r"methods.h.methods: e3, bl both read target features"):
        cfg({"h": {"kind": "hybrid", "methods": ["e3", "bl"]}})
    with pytest.raises(ConfigError, match=r"methods.h.mode: merge verifies greedily only"):
        cfg({"h": {"kind": "hybrid", "methods": ["pld", "e3"], "mode": "merge"}}, temperature=1.0)
