"""Drafting methods. Each builds a `deepspec.decoding.proposer.Proposer` from its method config."""

from __future__ import annotations

from pathlib import Path

from deepspec.config import AutoregressiveMethod, BlockMethod, DraftLMMethod, Eagle3Method, HybridMethod, NgramMethod
from deepspec.decoding.proposer import Proposer
from deepspec.drafters.draft_lm import DraftLMProposer, check_same_tokenizer
from deepspec.drafters.ngram import NgramProposer


def build_proposer(method, target=None, name: str = "", drafters_root=None, temperature: float = 0.0,
                   seed: int = 0, methods: dict | None = None) -> Proposer | None:
    """The proposer of a method config; None for the autoregressive baseline.

    `drafters_root` is the folder of trained drafters (results/<experiment>/drafters) for methods that
    decode with one; `temperature` is the decoding temperature (block drafters sample their drafts at it);
    `methods` the experiment's methods, which a hybrid names."""
    if isinstance(method, AutoregressiveMethod):
        return None
    if isinstance(method, HybridMethod):
        from deepspec.drafters.hybrid import HybridProposer

        if methods is None:
            raise ValueError(f"methods.{name or 'hybrid'}: a hybrid needs the experiment's methods")
        return HybridProposer([build_proposer(methods[part], target, part, drafters_root, temperature, seed)
                               for part in method.methods], method.mode)
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
        from deepspec.drafters.eagle3 import Eagle3Proposer
        from deepspec.export import import_eagle3

        if method.checkpoint is not None:  # a published drafter: checked against the target as it loads
            drafter = import_eagle3(method.checkpoint, target.loaded.model, target.loaded.fingerprint)
        else:
            folder = _trained_folder(method, name, drafters_root)
            drafter = _same_target(import_eagle3(folder, target.loaded.model, target.loaded.fingerprint), folder, target)
        drafter = drafter.to(target.backend.dtype)
        return Eagle3Proposer(drafter, target.backend.cache.max_len, method.depth, method.top_k, method.total_tokens)
    if isinstance(method, BlockMethod):
        from deepspec.drafters.block.checkpoint import import_block
        from deepspec.drafters.block.proposer import BlockProposer

        if method.checkpoint is not None:  # a published drafter: checked against the target as it loads
            drafter = import_block(method.checkpoint, target.loaded.model)
        else:
            folder = _trained_folder(method, name, drafters_root)
            drafter = _same_target(import_block(folder, target.loaded.model), folder, target)
        verify_ms = None
        if method.length == "cost":  # this machine's verify cost of 1 .. drafts + 1 rows
            from deepspec.decoding.cost import verify_cost_curve

            sizes = tuple(range(1, drafter.drafts + 2))
            curve = verify_cost_curve(target.backend, context=128, sizes=sizes, reps=5)
            verify_ms = [curve[f"chain_{n}"] for n in sizes]
        return BlockProposer(drafter.to(target.backend.dtype), target.backend.cache.max_len, length=method.length,
                             max_length=method.max_length, threshold=method.threshold, temperature=temperature,
                             verify_ms=verify_ms, tree_top_k=method.tree_top_k, tree_threshold=method.tree_threshold,
                             seed=seed)
    raise ValueError(f"no proposer for method kind {method.kind!r}")


def _trained_folder(method, name: str, drafters_root) -> Path:
    if drafters_root is None:
        raise ValueError(f"methods.{name or method.kind}: needs the trained drafters' folder")
    return Path(drafters_root) / method.drafter / "model"


def _same_target(drafter, folder: Path, target):
    """A drafter trained here decodes only for the target it was distilled from."""
    if drafter.config.get("target_fingerprint") != target.loaded.fingerprint:
        raise ValueError(f"{folder}: drafter was trained for another target ({drafter.config.get('target')})")
    return drafter
