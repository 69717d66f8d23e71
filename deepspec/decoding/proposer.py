"""The one interface every drafting method implements.

A proposer sees only the committed token sequence (prompt + output so far, the last token not yet
in the target's KV cache) and returns a draft tree, or None for "no guess this round". It keeps
whatever state it needs (n-gram index, its own KV cache, target features) and resynchronises from
the sequence, so verification and commitment stay entirely inside the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from deepspec.decoding.tree import DraftTree

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Proposer(Protocol):
    name: str

    def reset(self) -> None:
        """Forget everything about the previous sequence."""

    def propose(self, tokens: list[int], max_nodes: int) -> DraftTree | None:
        """Draft continuations of `tokens` with at most `max_nodes` nodes."""


class LearningProposer(Proposer, Protocol):
    """A proposer that drafts from the target's earlier outputs too (suffix decoding): the engine hands it each
    finished output, in order, and a resumed run replays the kept ones."""

    def remember(self, output: list[int]) -> None:
        """The target's output of a finished generation."""


class FeatureProposer(Proposer, Protocol):
    """A proposer that drafts from target hidden states (EAGLE): the engine captures the inputs of
    `capture_layers` in its own forwards and hands over those of every committed position, in order."""

    capture_layers: tuple[int, ...]

    def observe(self, captured: list["torch.Tensor"]) -> None:
        """Hidden states of newly committed positions, one [rows, H] tensor per captured layer."""
