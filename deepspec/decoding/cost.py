"""The verify-cost curve: what one target forward costs as the number of new tokens grows, and the draft size
chosen against it.

Draft sizes are cut where expected committed tokens per second peak (a block's drafts, an EAGLE tree's nodes),
and the decode benchmark reports the curve, so both live with decoding rather than with any one drafter.
"""

from __future__ import annotations

import bisect
import statistics
import time
from typing import Any, Callable

import torch

from deepspec.decoding.timing import synchronize
from deepspec.decoding.tree import DraftTree


def verify_cost_curve(backend, context: int = 256, sizes=(1, 2, 4, 8, 16, 32, 64), reps: int = 7) -> dict[str, float]:
    """Median ms of one target forward over n new tokens at a `context`-token prefix; plus a 16-node tree."""
    cache = backend.cache
    cache.reset()
    backend.forward(torch.randint(0, 1000, (context,)), torch.arange(context))
    cache.commit(context)
    out: dict[str, float] = {}

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        synchronize(backend.device)  # CUDA returns before it finishes
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            synchronize(backend.device)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    for n in sizes:
        ids = torch.randint(0, 1000, (n,))
        out[f"chain_{n}"] = timed(lambda ids=ids: backend.forward(ids, torch.arange(context, context + len(ids))))
    tree = DraftTree(list(range(100, 116)), [-1, -1, -1, -1, 0, 0, 1, 1, 2, 4, 4, 6, 8, 9, 10, 12])
    ids = torch.tensor([5] + tree.tokens)
    mask = tree.attention_mask(context, backend.dtype)
    out["tree_16"] = timed(lambda: backend.forward(ids, tree.positions(context), mask=mask))
    cache.reset()
    return out


def proposer_verify_ms(backend, max_rows: int) -> list[float]:
    """This machine's verify cost of 1 .. `max_rows` new rows (ms), as a proposer's cost cut reads it."""
    sizes = tuple(range(1, max_rows + 1))
    curve = verify_cost_curve(backend, context=128, sizes=sizes, reps=5)
    return [curve[f"chain_{n}"] for n in sizes]


def best_cut(accept: list[float], draft_ms: float, verify_ms: list[float], least: int = 0) -> int:
    """How many drafts to verify: argmax_n (1 + sum_{i<n} accept_i) / (draft_ms + verify_ms[n]), n >= `least`.

    `accept` are the drafts' probabilities of being accepted, each no larger than the one before (a chain's running
    product; an ancestor-closed tree's nodes by falling score), so every prefix is a draft the verifier can take;
    `verify_ms[k]` is the cost of k + 1 rows, and longer drafts than the curve reaches cost its last entry's.
    """
    return _best(accept, draft_ms, verify_ms, least)[0]


def best_rate(accept: list[float], draft_ms: float, verify_ms: list[float]) -> float:
    """Expected committed tokens per ms of `best_cut`'s draft (same arguments)."""
    return _best(accept, draft_ms, verify_ms, 0)[1]


def _best(accept: list[float], draft_ms: float, verify_ms: list[float], least: int) -> tuple[int, float]:
    best, top, expected = least, -1.0, 1.0 + sum(accept[:least])
    for n in range(least, len(accept) + 1):
        if n > least:
            expected += accept[n - 1]
        rate = expected / (draft_ms + verify_ms[min(n, len(verify_ms) - 1)])
        if rate > top:
            best, top = n, rate
    return best, top


class GrowthForecast:
    """Whether drafting one more depth of a tree pays on this verifier, before its drafter forward is spent.

    The cost cut (`best_cut`) chooses which drafted nodes to verify, but every depth drafted costs a drafter
    forward whether or not its nodes are kept. Where a target step is cheap, that forward can cost more than the
    deeper nodes are worth (a ~2.6 ms EAGLE-3 step against a ~35 ms target token on a 2-core AVX2 CPU, with the
    first draft right ~30% of the time). So before each expansion the next depth is priced: every frontier node's
    children at the drafter's mean conditional probabilities by rank, learned from its earlier expansions, and one
    expansion at its mean measured time. The tree grows only if the best cut over the current nodes and the
    predicted children earns more committed tokens per ms than the best cut over the current nodes alone. Lossless
    whatever it predicts: it changes only how deep the tree is drafted, never which token is accepted.
    """

    def __init__(self, top_k: int, verify_ms: list[float]):
        self.verify_ms = verify_ms
        self._cond = [0.0] * top_k  # summed conditional probability of each rank's child, over expanded nodes
        self._nodes = 0
        self._ms = 0.0  # summed time of the expansions
        self._expansions = 0

    def observe(self, cond: list[list[float]], ms: float) -> None:
        """One expansion: each expanded node's children's conditional probabilities (falling) and its time."""
        for row in cond:
            for j, q in enumerate(row[: len(self._cond)]):
                self._cond[j] += q
        self._nodes += len(cond)
        self._ms += ms
        self._expansions += 1

    def pays(self, probs: list[float], frontier: list[float], draft_ms: float, limit: int,
             calibrated: Callable[[list[float]], list[float]] = lambda probs: probs) -> bool:
        """`probs`: the tree's best nodes' path probabilities (falling); `frontier`: those of the nodes the next
        depth would expand; `draft_ms`: drafting spent this round; `limit`: the most nodes a tree may keep.
        Before any expansion has been seen, the tree grows."""
        if not self._expansions:
            return True
        cond = [c / self._nodes for c in self._cond]
        grown = sorted(probs + [p * q for p in frontier for q in cond], reverse=True)[:limit]
        now = best_rate(calibrated(probs[:limit]), draft_ms, self.verify_ms)
        return best_rate(calibrated(grown), draft_ms + self._ms / self._expansions, self.verify_ms) > now


class AcceptanceCalibration:
    """What a drafter's path probabilities are worth at this verifier: an online, nondecreasing map from a node's
    draft probability to how often the verifier took nodes like it, for the cost cut to read.

    A drafter trained on little data is overconfident where the cut decides (EAGLE-3's trees here: 15-25% more
    accepted drafts predicted than taken), so a cut that trusts it verifies rows that do not pay. Each probability
    bin starts from `prior` pseudo-observations on the identity and counts verified nodes; pooling adjacent
    violators keeps the map nondecreasing, so falling probabilities stay falling (`best_cut`'s contract). Lossless
    whatever it learns: it changes only how many nodes are verified, never which token is accepted.
    """

    def __init__(self, bins: int = 10, prior: float = 8.0):
        self.bins, self.prior = bins, prior
        self.seen = [0] * bins
        self.taken = [0] * bins
        self.prob_sum = [0.0] * bins
        self._points: tuple[list[float], list[float]] | None = None

    def _bin(self, p: float) -> int:
        return min(max(int(p * self.bins), 0), self.bins - 1)

    def update(self, probs: list[float], accepted: list[bool]) -> None:
        """Verified nodes' draft probabilities and whether the verifier accepted each."""
        for p, ok in zip(probs, accepted):
            b = self._bin(p)
            self.seen[b] += 1
            self.taken[b] += bool(ok)
            self.prob_sum[b] += p
        self._points = None

    def points(self) -> tuple[list[float], list[float]]:
        """The map's knots: each bin's mean probability and its pooled acceptance rate (both nondecreasing)."""
        if self._points is None:
            xs, pooled = [], []  # pooled: [weight, rate, bins], merged while a rate falls
            for b in range(self.bins):
                centre, weight = (b + 0.5) / self.bins, self.seen[b] + self.prior
                xs.append((self.prob_sum[b] + self.prior * centre) / weight)  # inside the bin: increasing
                pooled.append([weight, (self.taken[b] + self.prior * centre) / weight, 1])
                while len(pooled) > 1 and pooled[-2][1] > pooled[-1][1]:
                    w2, r2, n2 = pooled.pop()
                    w1, r1, n1 = pooled.pop()
                    pooled.append([w1 + w2, (w1 * r1 + w2 * r2) / (w1 + w2), n1 + n2])
            rates = [rate for _, rate, n in pooled for _ in range(n)]
            self._points = xs, rates
        return self._points

    def __call__(self, probs: list[float]) -> list[float]:
        """Calibrated acceptance probabilities: linear between the knots, from (0, 0), flat past the last."""
        xs, rates = self.points()
        out = []
        for p in probs:
            k = bisect.bisect_left(xs, p)
            if k == len(xs):
                out.append(rates[-1])
                continue
            x0, r0 = (xs[k - 1], rates[k - 1]) if k else (0.0, 0.0)
            out.append(r0 + (rates[k] - r0) * (p - x0) / (xs[k] - x0) if xs[k] > x0 else rates[k])
        return out
