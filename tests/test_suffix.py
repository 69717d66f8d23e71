"""Suffix decoding: trie counts against brute force, the bounded cache, matching and speculation rules,
lossless decoding (greedy and sampled) with drafts accepted."""

import random

import torch

from tests.conftest import tiny_llama


def _counts(texts: list[list[int]], depth: int) -> dict[tuple[int, ...], int]:
    out: dict[tuple[int, ...], int] = {}
    for text in texts:
        for i in range(len(text)):
            for j in range(i + 1, min(i + depth, len(text)) + 1):
                out[tuple(text[i:j])] = out.get(tuple(text[i:j]), 0) + 1
    return out


def _walk(trie) -> dict[tuple[int, ...], int]:
    out, stack = {}, [((), trie.root)]
    while stack:
        path, node = stack.pop()
        for tok, child in node.children.items():
            out[path + (tok,)] = child.count
            stack.append((path + (tok,), child))
    return out


def test_trie_counts_every_substring_and_removal_undoes_an_add():
    from deepspec.drafters.suffix import SuffixTrie

    rng = random.Random(0)
    texts = [[rng.randrange(4) for _ in range(rng.randrange(5, 40))] for _ in range(4)]
    trie = SuffixTrie(max_depth=5)
    for t in texts:
        trie.add(t)
    assert _walk(trie) == _counts(texts, 5)
    trie.remove(texts[1])
    trie.remove(texts[3])
    assert _walk(trie) == _counts([texts[0], texts[2]], 5)
    incremental = SuffixTrie(max_depth=5)  # append, token by token, as a conversation grows
    for tok in texts[0]:
        incremental.append(tok)
    assert _walk(incremental) == _counts(texts[:1], 5)


def test_match_is_the_longest_suffix_that_went_on_before():
    from deepspec.drafters.suffix import SuffixTrie

    rng = random.Random(1)
    for _ in range(50):
        text = [rng.randrange(3) for _ in range(30)]
        trie = SuffixTrie(max_depth=8)
        trie.add(text)
        length, node = trie.match(text, 7)
        followed = [m for m in range(1, 8) if any(text[i : i + m] == text[-m:] for i in range(len(text) - m))]
        assert length == (max(followed) if followed else 0)
        assert (node is None) == (length == 0)


def test_speculation_follows_frequencies_within_the_budget():
    from deepspec.drafters.suffix import SuffixProposer

    p = SuffixProposer(max_depth=8, spec_factor=1.0, min_token_prob=0.3, global_cache=True)
    for _ in range(3):
        p.remember([1, 2, 3, 4, 5])
    p.remember([1, 2, 9, 9, 9])  # after [1, 2]: 3 three times out of four, 9 once (below 0.3)
    tree = p.propose([7, 1, 2], 16)
    assert tree.tokens == [3, 4] and tree.parents == [-1, 0]  # match length 2: at most 2 nodes (3, 4 score 0.75)
    p.spec_factor = 0.5
    assert p.propose([7, 1, 2], 16).tokens == [3]
    p.spec_factor = 2.0
    assert p.propose([7, 1, 2], 16).tokens == [3, 4, 5]  # 9 (0.25) is below min_token_prob
    p.min_token_prob = 0.2
    tree = p.propose([7, 1, 2], 16)
    assert tree.tokens == [3, 4, 5, 9] and tree.parents == [-1, 0, 1, -1]  # the likelier deep path first
    assert p.propose([7, 1, 2], 2).tokens == [3, 4]  # the engine's budget binds
    assert p.propose([8, 8, 8], 16) is None  # nothing like it before


def test_cache_is_bounded_oldest_first():
    from deepspec.drafters.suffix import SuffixProposer

    p = SuffixProposer(max_depth=4, max_cached_outputs=2)
    outs = [[1, 2, 3], [2, 3, 4], [4, 5, 6]]
    for o in outs:
        p.remember(o)
    assert _walk(p.earlier) == _counts(outs[1:], 4)


def test_suffix_decoding_is_lossless_and_learns_from_earlier_outputs():
    from deepspec.decoding.engine import Engine
    from deepspec.drafters.suffix import SuffixProposer
    from deepspec.models import make_backend

    target = tiny_llama(vocab=64, layers=2)
    engine = Engine(make_backend(target, "lean", 256), stop_ids=[], max_nodes=16)
    proposer = SuffixProposer()
    prompts = [torch.randint(0, 64, (6,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(3)]
    taus = []
    for prompt in prompts + prompts:  # the second pass meets its own earlier outputs in the cache
        ar = engine.generate(prompt, 40)
        spec = engine.generate(prompt, 40, proposer)
        assert spec.tokens == ar.tokens
        taus.append(len(spec.tokens) / spec.forwards)
    assert min(taus[3:]) > 3.0 and sum(taus[3:]) > sum(taus[:3])
    assert proposer.chosen["earlier outputs"] > 0


def test_suffix_sampling_keeps_the_target_distribution():
    from deepspec.drafters.suffix import SuffixProposer
    from tests.test_block import sampled_joint_pvalue
    from tests.test_sampling import DRAWS

    model = tiny_llama(vocab=6, layers=2, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.25)
    proposer = SuffixProposer(max_depth=6, spec_factor=4.0, min_token_prob=0.05, max_cached_outputs=50)
    pvalue, accepted = sampled_joint_pvalue(model, proposer, seed=1234)
    assert pvalue > 1e-3
    assert accepted > DRAWS // 4 and proposer.chosen["earlier outputs"] > 0
