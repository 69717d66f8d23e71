"""Drafting methods. Each builds a `deepspec.decoding.proposer.Proposer` from its method config."""

from __future__ import annotations

from deepspec.config import AutoregressiveMethod, NgramMethod
from deepspec.decoding.proposer import Proposer
from deepspec.drafters.ngram import NgramProposer


def build_proposer(method, target=None) -> Proposer | None:
    """The proposer of a method config; None for the autoregressive baseline."""
    if isinstance(method, AutoregressiveMethod):
        return None
    if isinstance(method, NgramMethod):
        return NgramProposer(method.ngram_max, method.ngram_min, method.num_draft, method.branches)
    raise ValueError(f"no proposer for method kind {method.kind!r}")
