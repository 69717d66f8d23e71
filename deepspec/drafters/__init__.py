"""Drafting methods. Each builds a `deepspec.decoding.proposer.Proposer` from its method config."""

from __future__ import annotations

from deepspec.config import AutoregressiveMethod, DraftLMMethod, Eagle3Method, NgramMethod
from deepspec.decoding.proposer import Proposer
from deepspec.drafters.draft_lm import DraftLMProposer, check_same_tokenizer
from deepspec.drafters.ngram import NgramProposer


def build_proposer(method, target=None, name: str = "", drafters_root=None) -> Proposer | None:
    """The proposer of a method config; None for the autoregressive baseline.

    `drafters_root` is the folder of trained drafters (results/<experiment>/drafters) for methods that
    decode with one."""
    if isinstance(method, AutoregressiveMethod):
        return None
    if isinstance(method, NgramMethod):
        return NgramProposer(method.ngram_max, method.ngram_min, method.num_draft, method.branches)
    if isinstance(method, DraftLMMethod):
        from deepspec.models import load_model
        from deepspec.models.lean import LeanLlama

        where = f"methods.{name or 'draft_lm'}.model"
        if method.model is None:
            hf = target.loaded.model
        else:
            loaded = load_model(method.model)
            check_same_tokenizer(loaded.tokenizer, target.tokenizer, where)
            hf = loaded.model
        draft = LeanLlama(hf, target.backend.cache.max_len, n_layers=method.layers,
                          linear="torch" if method.quantize == "int8" else "auto")
        if method.quantize == "int8":
            draft.quantize_int8()
        return DraftLMProposer(draft, method.depth, method.top_k, method.total_tokens)
    if isinstance(method, Eagle3Method):
        from pathlib import Path

        from deepspec.drafters.eagle3 import Eagle3Proposer
        from deepspec.export import import_eagle3

        if method.checkpoint is not None:  # a published drafter: checked against the target as it loads
            drafter = import_eagle3(method.checkpoint, target.loaded.model, target.loaded.fingerprint)
        else:
            if drafters_root is None:
                raise ValueError(f"methods.{name or 'eagle3'}: needs the trained drafters' folder")
            folder = Path(drafters_root) / method.drafter / "model"
            drafter = import_eagle3(folder, target.loaded.model, target.loaded.fingerprint)
            if drafter.config.get("target_fingerprint") != target.loaded.fingerprint:
                raise ValueError(f"{folder}: drafter was trained for another target ({drafter.config.get('target')})")
        drafter = drafter.to(target.backend.dtype)
        return Eagle3Proposer(drafter, target.backend.cache.max_len, method.depth, method.top_k, method.total_tokens)
    raise ValueError(f"no proposer for method kind {method.kind!r}")
