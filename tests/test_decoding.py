"""Lossless decoding: every proposer's greedy output equals the autoregressive output, on tiny float64 models
with random trees (hypothesis) and on the real default model with real prompts."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepspec.config import TaskConfig
from deepspec.data.tasks import chat_ids, load_task
from deepspec.decoding.engine import Engine
from deepspec.decoding.tree import DraftTree, TreeError
from deepspec.drafters.ngram import NgramProposer
from deepspec.models import make_backend

from conftest import tiny_llama


class OracleTreeProposer:
    """Random trees that contain the true continuation up to a random depth, plus random distractors.

    Exercises acceptance at every depth and cache compaction with non-contiguous kept rows."""

    name = "oracle-tree"

    def __init__(self, reference: list[int], vocab: int, rng: random.Random, max_nodes: int = 12):
        self.reference, self.vocab, self.rng, self.max_nodes = reference, vocab, rng, max_nodes

    def reset(self) -> None:
        pass

    def propose(self, tokens: list[int], max_nodes: int) -> DraftTree | None:
        rng = self.rng
        truth = self.reference[len(tokens) : len(tokens) + rng.randint(0, 6)]
        size = min(max_nodes, rng.randint(1, self.max_nodes))
        toks: list[int] = []
        parents: list[int] = []
        for _ in range(size):
            p = rng.randint(-1, len(toks) - 1)
            toks.append(rng.randrange(self.vocab))
            parents.append(p)
        # Graft the truth as a chain under a random existing node or the root, if it fits.
        if truth and rng.random() < 0.8 and len(toks) + len(truth) <= max_nodes:
            parent = -1
            for t in truth:
                toks.append(t)
                parents.append(parent)
                parent = len(toks) - 1
        return DraftTree(toks, parents)


def _reference(engine: Engine, prompt: list[int], n: int) -> list[int]:
    return engine.generate(prompt, n).tokens


@pytest.mark.parametrize("backend", ["lean", "hf"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), prompt_len=st.integers(1, 12))
def test_random_trees_are_lossless_float64(backend, seed, prompt_len, tiny_model):
    target = make_backend(tiny_model, backend, 256)
    rng = random.Random(seed)
    prompt = [rng.randrange(64) for _ in range(prompt_len)]
    engine = Engine(target, stop_ids=[], max_nodes=24)
    ref = _reference(engine, prompt, 40)
    proposer = OracleTreeProposer(prompt + ref, 64, rng)
    gen = engine.generate(prompt, 40, proposer)
    assert gen.tokens == ref
    assert max(gen.accepted) > 1, "some drafted tokens must have been accepted"
    # The cache holds the prompt and every committed token except the last emitted (pending) one.
    assert target.cache.length == len(prompt) + sum(gen.accepted) - 1


def test_stop_token_ends_output_exactly(tiny_model):
    target = make_backend(tiny_model, "lean", 256)
    engine = Engine(target, stop_ids=[], max_nodes=16)
    prompt = [1, 2, 3]
    ref = _reference(engine, prompt, 40)
    stop = ref[10]
    first = ref.index(stop)
    stopping = Engine(target, stop_ids=[stop], max_nodes=16)
    for proposer in (None, OracleTreeProposer(prompt + ref, 64, random.Random(0))):
        gen = stopping.generate(prompt, 40, proposer)
        assert gen.tokens == ref[: first + 1] and gen.stopped
    gen = stopping.generate(prompt, 5, OracleTreeProposer(prompt + ref, 64, random.Random(1)))
    assert gen.tokens == ref[: min(5, first + 1)]


def test_tree_validation():
    with pytest.raises(TreeError, match="parent 2 must be -1"):
        DraftTree([1, 2], [-1, 2])
    with pytest.raises(TreeError, match="2 tokens but 1 parents"):
        DraftTree([1, 2], [-1])
    tree = DraftTree.from_paths([[5], [5, 6], [5, 7], [8]])
    assert tree.tokens == [5, 8, 6, 7] and tree.parents == [-1, -1, 0, 0]
    assert tree.depths == [1, 1, 2, 2] and tree.paths() == [[1], [0, 2], [0, 3]]
    mask = tree.attention_mask(prefix_len=2, dtype=torch.float32)
    visible = (mask == 0).int().tolist()
    assert visible[3] == [1, 1, 1, 1, 0, 1, 0]  # node 2 (token 6): prefix, root, its parent, itself


def test_tree_larger_than_cache_is_refused(tiny_model):
    target = make_backend(tiny_model, "lean", 40)
    engine = Engine(target, stop_ids=[], max_nodes=16)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        engine.generate([1] * 10, 20)


def test_ngram_proposer_tree():
    p = NgramProposer(ngram_max=2, ngram_min=1, num_draft=3, branches=2)
    tokens = [1, 2, 3, 4, 1, 2, 5, 6, 9, 1, 2]
    assert p.continuations(tokens) == [[5, 6, 9], [3, 4, 1]]
    tree = p.propose(tokens, 64)
    assert tree.tokens == [5, 6, 9, 3, 4, 1] and tree.parents == [-1, 0, 1, -1, 3, 4]
    assert p.propose([7, 8, 9], 64) is None
    assert len(p.propose(tokens, 4)) == 4


def _real_prompts(tokenizer, n_mt: int = 3, n_he: int = 3) -> list[list[int]]:
    mt = load_task("mt", TaskConfig(kind="mt_bench", max_samples=n_mt), seed=3).samples
    he = load_task("he", TaskConfig(kind="humaneval", max_samples=n_he), seed=3).samples
    return [chat_ids(tokenizer, [{"role": "user", "content": s["turns"][0]}]) for s in mt + he]


def test_prompt_lookup_is_lossless_on_the_real_model(real_target):
    """6 real prompts (MT-bench and HumanEval), 64 new tokens: chain and tree lookup equal autoregressive, with drafts
    accepted."""
    engine = Engine(real_target.backend, real_target.loaded.eos_ids)
    accepted_any = 0
    for prompt in _real_prompts(real_target.tokenizer):
        ref = engine.generate(prompt, 64)
        for proposer in (NgramProposer(), NgramProposer(branches=3, num_draft=6)):
            gen = engine.generate(prompt, 64, proposer)
            assert gen.tokens == ref.tokens
            accepted_any += sum(a - 1 for a in gen.accepted[1:])
    print(f"drafted tokens accepted: {accepted_any}")
    assert accepted_any > 100


@pytest.mark.parametrize("top_k,total", [(1, 4), (3, 10)])
def test_draft_lm_is_lossless_float64(top_k, total):
    from deepspec.drafters.draft_lm import DraftLMProposer
    from deepspec.models.lean import LeanLlama

    model = tiny_llama()
    target = make_backend(model, "lean", 512)
    engine = Engine(target, stop_ids=[], max_nodes=16)
    for draft_model, must_accept in ((model, True), (tiny_llama(seed=7), False)):
        proposer = DraftLMProposer(LeanLlama(draft_model, 512), depth=4, top_k=top_k, total_tokens=total)
        for prompt in ([5], [1, 2, 3, 4, 5, 6, 7]):
            ref = engine.generate(prompt, 48).tokens
            gen = engine.generate(prompt, 48, proposer)
            assert gen.tokens == ref
            if must_accept:  # the target drafting for itself: every drafted path is right
                assert gen.forwards <= len(ref) / 2


def test_draft_tokenizer_mismatch_is_refused(real_target, tmp_path):
    import copy

    from deepspec.config import DraftLMMethod
    from deepspec.drafters.build import build_proposer

    tok = copy.deepcopy(real_target.tokenizer)
    tok.add_tokens(["<not-in-target>"])
    folder = tmp_path / "draft"
    tiny_llama(vocab=len(tok), dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"methods.dl.model: the draft tokenizer differs from the target's \(49153 vs 49152"):
        build_proposer(DraftLMMethod(kind="draft_lm", model=str(folder)), real_target, "dl")


def test_dynamic_tree_refuses_bad_shapes():
    from deepspec.decoding.tree import dynamic_tree

    with pytest.raises(TreeError, match=r"depth \(0\), top_k \(2\)"):
        dynamic_tree(torch.zeros(8), lambda *a: None, 0, 2, 4)


def test_best_cut_maximises_expected_tokens_per_ms():
    """The cut is the brute-force argmax of (1 + accepted so far) / (draft + verify) over every prefix, including
    no draft at all; a flat verify cost keeps every draft, a steep one none (or `least`)."""
    from deepspec.decoding.cost import best_cut

    def brute(accept, draft, verify, least=0):
        rates = [(1 + sum(accept[:n])) / (draft + verify[min(n, len(verify) - 1)]) for n in range(len(accept) + 1)]
        return max(range(least, len(accept) + 1), key=lambda n: (rates[n], -n))

    accept = [0.9, 0.6, 0.3, 0.1, 0.02]
    assert best_cut(accept, 2.0, [40.0] * 6) == 5
    assert best_cut(accept, 2.0, [40.0 * 3**k for k in range(6)]) == 0
    assert best_cut(accept, 2.0, [40.0 * 3**k for k in range(6)], least=1) == 1
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        verify = (40.0 + torch.rand(6, generator=gen).cumsum(0) * 20).tolist()
        draft = float(torch.rand((), generator=gen) * 30)
        least = int(torch.randint(0, 3, (), generator=gen))
        assert best_cut(accept, draft, verify, least) == brute(accept, draft, verify, least)
    assert best_cut(accept, 2.0, [40.0, 41.0]) == 5, "past the curve, longer drafts cost its last entry"


def test_growth_forecast_grows_only_where_the_predicted_children_pay_for_an_expansion():
    """The forecast compares the best cut's rate over the current nodes with its rate over those nodes plus every
    frontier node's children at the learned mean conditional probabilities, one mean expansion's time later; it
    grows before it has seen an expansion."""
    from deepspec.decoding.cost import GrowthForecast, best_rate

    flat = [30.0] * 12
    forecast = GrowthForecast(top_k=2, verify_ms=flat)
    assert forecast.pays([0.5, 0.2], [0.5, 0.2], 3.0, 8), "no expansion seen yet: grow"
    forecast.observe([[0.8, 0.1], [0.6, 0.3]], ms=2.0)  # mean conditional probabilities 0.7 / 0.2, 2 ms
    forecast.observe([[0.7, 0.2]], ms=4.0)  # three nodes: still 0.7 / 0.2; the mean expansion 3 ms
    probs, frontier = [0.5, 0.2], [0.5, 0.2]
    grown = sorted(probs + [0.5 * 0.7, 0.5 * 0.2, 0.2 * 0.7, 0.2 * 0.2], reverse=True)
    assert forecast.pays(probs, frontier, 3.0, 8) == (best_rate(grown, 6.0, flat) > best_rate(probs, 3.0, flat))
    assert forecast.pays(probs, frontier, 3.0, 8), "rows are free: children worth 0.66 tokens pay for 3 ms"
    steep = GrowthForecast(top_k=2, verify_ms=[30.0, 31.0] + [300.0] * 10)
    steep.observe([[0.7, 0.2]], ms=3.0)
    assert not steep.pays(probs, frontier, 3.0, 8), "one draft row pays at most, and the best one is drafted already"
    slow = GrowthForecast(top_k=2, verify_ms=flat)
    slow.observe([[0.7, 0.2]], ms=40.0)
    assert not slow.pays(probs, frontier, 3.0, 8), "an expansion costing more than a target step"
    assert not forecast.pays(probs, frontier, 3.0, 8, calibrated=lambda ps: [0.0] * len(ps)), "nothing is taken"
    assert not forecast.pays(probs, frontier, 3.0, 1), "one node at most: the children could not be kept"


def test_acceptance_calibration_starts_at_the_identity_and_learns_a_nondecreasing_map():
    """Unseen, the map is the identity (up to the last knot); fed nodes whose probability overstates how often they
    are taken, it reads them at their rate; fed rates that fall as probability rises, it pools them, so a falling
    list stays falling. The pooling is what a bin-by-bin rate lacks (the control below)."""
    from deepspec.decoding.cost import AcceptanceCalibration

    cal = AcceptanceCalibration(bins=10, prior=8.0)
    probe = [0.01, 0.05, 0.2, 0.45, 0.7, 0.9, 0.95]
    assert cal(probe) == pytest.approx(probe)
    gen = torch.Generator().manual_seed(0)
    probs = (torch.rand(4000, generator=gen) * 0.5 + 0.5).tolist()  # 0.5 .. 1, taken at 0.6 x their probability
    taken = (torch.rand(4000, generator=gen) < 0.6 * torch.tensor(probs)).tolist()
    cal.update(probs, taken)
    assert cal([0.75])[0] == pytest.approx(0.45, abs=0.04)
    assert cal([0.1])[0] == pytest.approx(0.1, abs=1e-9), "bins without data keep the identity"
    grid = [i / 100 for i in range(101)]
    assert all(a <= b + 1e-12 for a, b in zip(cal(grid), cal(grid)[1:]))

    falling = AcceptanceCalibration(bins=10, prior=8.0)
    falling.update([0.65] * 200 + [0.85] * 200, [True] * 180 + [False] * 20 + [True] * 20 + [False] * 180)
    low, high = falling([0.65, 0.85])
    assert low == pytest.approx(high) and 0.45 < high < 0.55, "the two bins pooled to their joint rate"
    raw = [(falling.taken[b] + 8.0 * (b + 0.5) / 10) / (falling.seen[b] + 8.0) for b in (6, 8)]
    assert raw[0] > raw[1], "control: per bin, the rates fall as probability rises"


@pytest.mark.parametrize("greedy", [True, False])
def test_taken_by_reads_the_acceptance_rule_from_the_commits(greedy):
    """`taken_by` on the tokens committed after a tree marks exactly the path the acceptance rule took, at T = 0
    and under rejection sampling (a rejected node's token is never the bonus), and nothing past the commits."""
    from deepspec.decoding.verify import greedy_accept, sample_accept

    gen = torch.Generator().manual_seed(1)
    lengths = []
    for _ in range(300):
        n = int(torch.randint(1, 12, (), generator=gen))
        parents = [int(torch.randint(-1, i, (), generator=gen)) for i in range(n)]
        tokens, used = [], {}
        for p in parents:  # siblings draw distinct tokens from a small vocabulary (often the target's)
            tok = int(torch.randint(0, 4, (), generator=gen))
            while tok in used.setdefault(p, set()):
                tok = (tok + 1) % 6
            used[p].add(tok)
            tokens.append(tok)
        tree = DraftTree(tokens, parents)
        if greedy:
            path, bonus = greedy_accept(tree, torch.randint(0, 4, (n + 1,), generator=gen).tolist())
        else:
            probs = torch.softmax(torch.randn(n + 1, 6, generator=gen) * 2, -1).double()
            path, bonus = sample_accept(tree, probs, gen)
        committed = [tokens[i] for i in path] + [bonus]
        assert tree.taken_by(committed) == [i in path for i in range(n)]
        lengths.append(len(path))
        first = tree.taken_by(committed[:1])  # the generation ended after one token
        for i, t in enumerate(first):
            p = parents[i]
            if p < 0:
                assert t == (tokens[i] == committed[0])
            else:
                assert t == (None if first[p] is not False else False), "deeper than the commits: unknown"
    assert max(lengths) >= 3 and sum(lengths) > 100, "long paths were accepted, so the labels were exercised"


def test_dynamic_tree_cut_keeps_the_best_prefix_and_stops_growing():
    """With a cut the tree is the best-scored prefix of the uncut one (so closed under ancestors), and it does not
    expand a depth none of whose nodes would be kept."""
    from deepspec.decoding.tree import dynamic_tree

    gen, root, expand, calls = _random_drafter()
    full = dynamic_tree(root, expand, 4, 3, 10)
    assert len(calls) == 3
    for keep in range(0, 11):
        calls.clear()
        gen.manual_seed(1)
        uncut = dynamic_tree(root, expand, 4, 3, 10)
        gen.manual_seed(1)
        seen = []
        cut = dynamic_tree(root, expand, 4, 3, 10, cut=lambda probs: seen.append(probs) or min(keep, len(probs)))
        assert all(a >= b for probs in seen for a, b in zip(probs, probs[1:])), "probabilities offered falling"
        if keep >= len(uncut):
            assert (cut.tokens, cut.parents) == (uncut.tokens, uncut.parents)
            continue
        kept = {(tuple(_path(cut, i))) for i in range(len(cut))}
        assert len(cut) == keep and kept <= {tuple(_path(uncut, i)) for i in range(len(uncut))}
    assert full.depths and max(full.depths) == 4
    calls.clear()
    none = dynamic_tree(root, expand, 4, 3, 10, cut=lambda probs: 0)
    assert len(none) == 0 and calls == [], "nothing kept at depth 1: no expansion at all"
    calls.clear()
    shallow = dynamic_tree(root, expand, 4, 3, 10, cut=lambda probs: 1)
    assert len(shallow) == 1 and len(calls) == 1, "the depth-2 children were cut: depth 3 is never grown"


def test_dynamic_tree_grows_a_depth_only_when_grow_says_so():
    """`grow` sees the best nodes' probabilities (falling) and the frontier's (the nodes the next depth would expand)
    before each expansion; a refusal stops the tree at the depth it reached."""
    from deepspec.decoding.tree import dynamic_tree

    gen, root, expand, calls = _random_drafter()
    asked = []
    flat = dynamic_tree(root, expand, 4, 3, 10, grow=lambda probs, frontier: asked.append((probs, frontier)) or False)
    assert calls == [] and len(flat) == 3 and flat.parents == [-1, -1, -1], "only the root's top 3"
    top = torch.topk(root, 3).values.exp().tolist()
    assert asked == [(pytest.approx(top), pytest.approx(top))]
    calls.clear()
    gen.manual_seed(1)
    once = dynamic_tree(root, expand, 4, 3, 10, grow=lambda probs, frontier: len(calls) < 1)
    assert len(calls) == 1 and max(once.depths) == 2


def _random_drafter():
    """(generator, root log-probs over 32 tokens, an `expand` drawing random children's log-probs, its calls)."""
    gen = torch.Generator().manual_seed(0)
    root = torch.log_softmax(torch.randn(32, generator=gen) * 3, -1)
    calls: list[int] = []

    def expand(nodes, tokens, parents):
        calls.append(len(nodes))
        return torch.log_softmax(torch.randn(len(nodes), 32, generator=gen) * 3, -1)

    return gen, root, expand, calls


def _path(tree, i):
    path = []
    while i >= 0:
        path.append(tree.tokens[i])
        i = tree.parents[i]
    return path[::-1]


@pytest.mark.slow
def test_every_method_is_lossless_on_long_outputs(real_target):
    """256 new tokens on real prompts: prompt lookup (chain, tree) and the int8 draft LM (chain, tree)."""
    from deepspec.config import DraftLMMethod, NgramMethod
    from deepspec.drafters.build import build_proposer

    engine = Engine(real_target.backend, stop_ids=[])  # no early stop: exactly 256 tokens each
    methods = [
        NgramMethod(kind="ngram"),
        NgramMethod(kind="ngram", branches=3, num_draft=6),
        DraftLMMethod(kind="draft_lm", quantize="int8", depth=4, top_k=1, total_tokens=4),
        DraftLMMethod(kind="draft_lm", quantize="int8", layers=20, depth=3, top_k=3, total_tokens=10),
    ]
    proposers = [build_proposer(m, real_target) for m in methods]
    mt = load_task("mt", TaskConfig(kind="mt_bench", max_samples=1), seed=11).samples
    he = load_task("he", TaskConfig(kind="humaneval", max_samples=1), seed=11).samples
    accepted = [0] * len(proposers)
    for sample in mt + he:
        prompt = chat_ids(real_target.tokenizer, [{"role": "user", "content": sample["turns"][0]}])
        ref = engine.generate(prompt, 256)
        assert len(ref.tokens) == 256
        for i, proposer in enumerate(proposers):
            gen = engine.generate(prompt, 256, proposer)
            assert gen.tokens == ref.tokens
            accepted[i] += sum(a - 1 for a in gen.accepted[1:])
    assert all(a > 0 for a in accepted), f"drafted tokens accepted per method: {accepted}"
