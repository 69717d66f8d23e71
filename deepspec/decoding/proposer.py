"""The one interface every drafting method implements.

A proposer sees only the committed token sequence (prompt + output so far, the last token not yet
in the target's KV cache) and returns a draft tree, or None for "no guess this round". It keeps
whatever state it needs (n-gram index, its own KV cache, target features) and resynchronises from
the sequence, so verification and commitment stay entirely inside the engine.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from deepspec.decoding.tree import DraftTree


@runtime_checkable
class Proposer(Protocol):
    name: str

    def reset(self) -> None:
        """Forget everything about the previous sequence."""

    def propose(self, tokens: list[int], max_nodes: int) -> DraftTree | None:
        """Draft continuations of `tokens` with at most `max_nodes` nodes."""
