"""The decoding engine: owns the target's KV cache and runs draft -> one verify forward -> accept -> commit.

Every method, the autoregressive baseline included, runs through `Engine.generate`, so their timings
and outputs are directly comparable. Per round it records what was committed and where time went.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from deepspec.devices import on
from deepspec.decoding.proposer import Proposer
from deepspec.decoding.timing import RegionTimer, synchronize
from deepspec.decoding.tree import DraftTree, TreeError
from deepspec.decoding.verify import Sampling, greedy_accept, sample_accept, target_probs


@dataclass
class Generation:
    tokens: list[int]  # new tokens, stop token included when one was produced
    stopped: bool  # ended on a stop token (else on max_new_tokens)
    accepted: list[int] = field(default_factory=list)  # tokens committed per target forward, prefill first
    proposed: list[int] = field(default_factory=list)  # draft nodes sent to each verify forward
    accepted_depth: list[int] = field(default_factory=list)  # drafted tokens accepted per round
    # Who drafted each round (a proposer's name, a hybrid's part, "none" for a plain step; "prefill" first) and
    # its wall time from drafting to commit, read after the round's one host sync, so honest on a GPU too.
    round_sources: list[str] = field(default_factory=list)
    round_times: list[float] = field(default_factory=list)
    draft_time: float = 0.0  # inside the proposer
    verify_time: float = 0.0  # verify rounds: target forward + acceptance + commit
    forward_time: float = 0.0  # inside target forwards only (prefill included)
    prefill_time: float = 0.0
    wall_time: float = 0.0

    @property
    def forwards(self) -> int:
        return len(self.accepted)


class Engine:
    """Runs on the target's device and dtype: the same code on the CPU and on a GPU, with tensors made on
    the target's device (`devices.on`), device generators for sampling, and one host synchronisation per
    round (reading the acceptance) plus timing that never adds one (`RegionTimer`)."""

    def __init__(self, target, stop_ids: list[int], sampling: Sampling = Sampling(), max_nodes: int = 64):
        self.target = target
        self.device = torch.device(target.device)
        self.stop_ids = set(stop_ids)
        self.sampling = sampling
        self.max_nodes = max_nodes

    def generator(self, seed: int) -> torch.Generator:
        """A seeded generator on the engine's device (sampling draws there)."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def _choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        if self.sampling.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(target_probs(logits, self.sampling), 1, generator=generator))

    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        proposer: Proposer | None = None,
        generator: torch.Generator | None = None,
    ) -> Generation:
        cache = self.target.cache
        need = len(prompt) + max_new_tokens + self.max_nodes + 1
        if need > cache.max_len:
            raise ValueError(
                f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) + tree ({self.max_nodes}) "
                f"exceeds the KV cache ({cache.max_len}); raise target.max_len"
            )
        if not self.sampling.greedy and generator is None:
            generator = self.generator(0)
        timer = RegionTimer(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        with on(self.device):
            gen = self._generate(prompt, max_new_tokens, proposer, generator, timer)
        seconds = timer.seconds()  # synchronises the device: the wall clock below is honest
        gen.wall_time = time.perf_counter() - start
        gen.prefill_time = seconds.get("prefill", 0.0)
        gen.forward_time = gen.prefill_time + seconds.get("forward", 0.0)
        gen.draft_time = seconds.get("draft", 0.0)
        gen.verify_time = seconds.get("verify", 0.0)
        if proposer is not None and hasattr(proposer, "remember"):
            proposer.remember(gen.tokens)
        return gen

    def _generate(self, prompt: list[int], max_new_tokens: int, proposer: Proposer | None,
                  generator: torch.Generator | None, timer: RegionTimer) -> Generation:
        target, cache = self.target, self.target.cache
        cache.reset()
        if proposer is not None:
            proposer.reset()
        n = len(prompt)
        capture = tuple(getattr(proposer, "capture_layers", ())) if proposer is not None else ()
        t0 = time.perf_counter()
        with timer.region("prefill"):
            logits, captured = target.forward(torch.tensor(prompt), torch.arange(n), logits_rows=slice(n - 1, n),
                                              capture_layers=capture)
        cache.commit(n)
        if capture:
            proposer.observe(captured)
        out = [self._choose(logits[0], generator)]
        gen = Generation(tokens=out, stopped=False, accepted=[1], proposed=[0], accepted_depth=[0],
                         round_sources=["prefill"], round_times=[time.perf_counter() - t0])
        while out[-1] not in self.stop_ids and len(out) < max_new_tokens:
            t0 = time.perf_counter()
            tree = None
            if proposer is not None:
                budget = min(self.max_nodes, cache.room() - 1)
                with timer.region("draft"):
                    tree = proposer.propose(prompt + out, budget)
                if tree is not None and len(tree) > budget:
                    raise TreeError(f"{proposer.name} proposed {len(tree)} nodes; the budget was {budget}")
            with timer.region("verify"):
                emitted = self._verify(out[-1], tree, generator, proposer if capture else None, timer)
            gen.accepted.append(len(emitted))
            gen.proposed.append(len(tree) if tree else 0)
            gen.accepted_depth.append(len(emitted) - 1)
            gen.round_sources.append((tree.source or proposer.name) if tree else "none")
            gen.round_times.append(time.perf_counter() - t0)
            for tok in emitted:
                out.append(tok)
                if tok in self.stop_ids or len(out) >= max_new_tokens:
                    break
        gen.stopped = out[-1] in self.stop_ids
        return gen

    def _verify(self, root: int, tree: DraftTree | None, generator: torch.Generator | None,
                observer: Proposer | None, timer: RegionTimer) -> list[int]:
        """One target forward over [root] + tree; commits the accepted path and returns the emitted tokens.

        A proposer that drafts from target features (`capture_layers`) is handed those of the committed rows."""
        target, cache = self.target, self.target.cache
        length = cache.length
        chain = not tree or tree.is_chain()  # a chain needs no explicit mask and no compaction
        ids = torch.tensor([root] + (tree.tokens if tree else []))
        positions = tree.positions(length) if tree else torch.tensor([length])
        mask = None if chain else tree.attention_mask(length, target.dtype, self.device)
        capture = observer.capture_layers if observer is not None else ()
        with timer.region("forward"):
            logits, captured = target.forward(ids, positions, mask=mask, capture_layers=capture)
        if not tree:
            cache.commit(1)
            if capture:
                observer.observe([c[:1] for c in captured])
            return [self._choose(logits[0], generator)]
        if self.sampling.greedy:
            path, bonus = greedy_accept(tree, logits.argmax(-1).tolist())  # the round's one host sync
        else:
            path, bonus = sample_accept(tree, target_probs(logits, self.sampling), generator)
        rows = [0] + [i + 1 for i in path]
        cache.commit(len(rows), None if chain else rows)
        if capture:
            index = torch.tensor(rows)
            observer.observe([c[index] for c in captured])
        return [tree.tokens[i] for i in path] + [bonus]
