"""Sampled speculative decoding has exactly the target's distribution (chi-square against the exact joint
distribution of two speculated tokens), for chains and trees, stochastic and deterministic drafts, with
temperature and top-p; a deliberately wrong acceptance rule fails the same test (negative control)."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from deepspec.decoding import engine as engine_mod
from deepspec.decoding.engine import Engine
from deepspec.decoding.tree import DraftTree
from deepspec.decoding.verify import Sampling, target_probs
from deepspec.models import make_backend

from conftest import tiny_llama

VOCAB = 6
PROMPT = [1, 2, 3]
DRAWS = 3000


class RandomDraft:
    """Context-free random drafts: chain (stochastic), tree (stochastic, siblings without replacement)
    or top-k tree (deterministic, q one-hot)."""

    name = "random-draft"

    def __init__(self, mode: str, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.q1 = torch.softmax(torch.randn(VOCAB, generator=g, dtype=torch.float64) * 1.5, -1)
        self.q2 = torch.softmax(torch.randn(VOCAB, generator=g, dtype=torch.float64) * 1.5, -1)
        self.mode, self.g = mode, g

    def reset(self) -> None:
        pass

    def _draw(self, q: torch.Tensor, k: int) -> list[int]:
        return torch.multinomial(q, k, replacement=False, generator=self.g).tolist()

    def propose(self, tokens, max_nodes):
        if self.mode == "chain":
            return DraftTree.chain([self._draw(self.q1, 1)[0], self._draw(self.q2, 1)[0]], [self.q1, self.q2])
        if self.mode == "tree":
            first = self._draw(self.q1, 3)
            toks, parents, qs = list(first), [-1] * 3, [self.q1] * 3
            for i in range(3):
                for t in self._draw(self.q2, 2):
                    toks.append(t)
                    parents.append(i)
                    qs.append(self.q2)
            return DraftTree(toks, parents, qs)
        first = torch.topk(self.q1, 3).indices.tolist()
        second = torch.topk(self.q2, 2).indices.tolist()
        toks = first + [t for _ in first for t in second]
        return DraftTree(toks, [-1, -1, -1, 0, 0, 1, 1, 2, 2])


def _exact_joint(model, sampling: Sampling) -> dict[tuple[int, int], float]:
    """P(t2, t3) of the target sampled with `sampling`, marginalised over t1."""
    out: dict[tuple[int, int], float] = {}
    with torch.no_grad():
        p1 = target_probs(model(torch.tensor([PROMPT])).logits[0, -1], sampling)
        for t1 in range(VOCAB):
            if p1[t1] == 0:
                continue
            p2 = target_probs(model(torch.tensor([PROMPT + [t1]])).logits[0, -1], sampling)
            batch = torch.tensor([PROMPT + [t1, t2] for t2 in range(VOCAB)])
            p3 = target_probs(model(batch).logits[:, -1], sampling)
            for t2, t3 in itertools.product(range(VOCAB), range(VOCAB)):
                out[(t2, t3)] = out.get((t2, t3), 0.0) + float(p1[t1] * p2[t2] * p3[t2, t3])
    return out


def _pvalue(model, sampling: Sampling, mode: str) -> float:
    target = make_backend(model, "lean", 64)
    engine = Engine(target, stop_ids=[], sampling=sampling, max_nodes=16)
    proposer = RandomDraft(mode)
    gen = torch.Generator().manual_seed(1234)
    counts: dict[tuple[int, int], int] = {}
    for _ in range(DRAWS):
        toks = engine.generate(PROMPT, 3, proposer, gen).tokens
        counts[(toks[1], toks[2])] = counts.get((toks[1], toks[2]), 0) + 1
    exact = _exact_joint(model, sampling)
    big = [k for k, p in exact.items() if p * DRAWS >= 5]
    obs = [counts.get(k, 0) for k in big] + [DRAWS - sum(counts.get(k, 0) for k in big)]
    exp = [exact[k] * DRAWS for k in big] + [DRAWS - sum(exact[k] * DRAWS for k in big)]
    if exp[-1] < 1e-9:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs, exp).pvalue)


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(vocab=VOCAB, layers=2, seed=3)
    with torch.no_grad():
        m.lm_head.weight.mul_(0.25)  # back to a spread-out distribution: every outcome is reachable
    return m


@pytest.mark.parametrize(
    "mode,sampling",
    [
        ("chain", Sampling(temperature=1.0)),
        ("tree", Sampling(temperature=0.8)),
        ("topk", Sampling(temperature=1.0, top_p=0.9)),
        ("tree", Sampling(temperature=1.2, top_k=4)),
    ],
)
def test_speculative_sampling_matches_target(model, mode, sampling):
    assert _pvalue(model, sampling, mode) > 1e-3


def _wrong_accept(tree, probs, generator):
    """The classic bug: accept with min(1, p/q) but, on rejection, sample from p instead of the residual."""
    kids = tree.children()
    c = kids[0][0]
    p = probs[0]
    q = tree.q[c] if tree.q is not None and tree.q[c] is not None else torch.nn.functional.one_hot(
        torch.tensor(tree.tokens[c]), p.shape[-1]).to(p.dtype)
    if torch.rand((), generator=generator, dtype=torch.float64).item() < min(1.0, float(p[tree.tokens[c]] / q[tree.tokens[c]])):
        nxt = probs[c + 1]
        return [c], int(torch.multinomial(nxt, 1, generator=generator))
    return [], int(torch.multinomial(p, 1, generator=generator))


@pytest.mark.parametrize("mode", ["chain", "topk"])
def test_negative_control_wrong_rule_is_caught(model, mode, monkeypatch):
    monkeypatch.setattr(engine_mod, "sample_accept", _wrong_accept)
    assert _pvalue(model, Sampling(temperature=1.0), mode) < 1e-3


def test_target_probs_shaping():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    p = target_probs(logits, Sampling(temperature=1.0, top_k=2))
    assert p[2] == 0 and p[3] == 0 and torch.isclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    full = torch.softmax(logits, -1)
    p = target_probs(logits, Sampling(temperature=1.0, top_p=0.8))
    kept = (p > 0).nonzero().flatten().tolist()
    assert kept == [0, 1] and full[0] < 0.8 <= full[0] + full[1]
    assert torch.allclose(target_probs(logits, Sampling(temperature=0.5)), torch.softmax(logits / 0.5, -1))
