"""A method config's proposer: the untrained methods here, trained drafters through their registry entry."""

from __future__ import annotations

import json
from pathlib import Path

from deepspec.config import AutoregressiveMethod, DraftLMMethod, HybridMethod, NgramMethod, SuffixMethod
from deepspec.config_base import TrainedMethod
from deepspec.decoding.proposer import Proposer
from deepspec.devices import on
from deepspec.drafters.registry import KINDS


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
        from deepspec.drafters.ngram import NgramProposer

        return NgramProposer(method.ngram_max, method.ngram_min, method.num_draft, method.branches)
    if isinstance(method, SuffixMethod):
        from deepspec.drafters.suffix import SuffixProposer

        return SuffixProposer(method.max_depth, method.max_spec_tokens, method.spec_factor, method.spec_offset,
                              method.min_token_prob, method.global_cache, method.max_cached_outputs)
    if isinstance(method, DraftLMMethod):
        return _draft_lm(method, target, name)
    if isinstance(method, TrainedMethod):
        kind, drafter = load_drafter(method, target, name, drafters_root)
        backend = target.backend
        with on(backend.device):  # the proposer's caches and generator live where the target runs
            return kind.proposer(method, drafter.to(backend.device, backend.dtype), target, temperature, seed)
    raise ValueError(f"no proposer for method kind {method.kind!r}")


def load_drafter(method: TrainedMethod, target, name: str, drafters_root):
    """(registry entry, drafter) a trained method decodes with: a published checkpoint, checked against the
    target as it loads, or the one trained here, which must have been distilled from this very target."""
    if method.checkpoint is not None:
        kind = KINDS[method.decodes[0]]  # every kind a method decodes reads the same published layouts
        return kind, kind.load(method.checkpoint, target.loaded.model, target.loaded.fingerprint)
    if drafters_root is None:
        raise ValueError(f"methods.{name or method.kind}: needs the trained drafters' folder")
    folder = Path(drafters_root) / method.drafter / "model"
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no drafter checkpoint; run `deepspec train` first")
    algorithm = json.loads(cfg_path.read_text()).get("algorithm")
    if algorithm not in method.decodes:
        raise ValueError(f"{cfg_path}: a {algorithm} drafter, which a method of kind {method.kind!r} cannot decode with")
    kind = KINDS[algorithm]
    drafter = kind.load(folder, target.loaded.model, target.loaded.fingerprint)
    if drafter.config.get("target_fingerprint") != target.loaded.fingerprint:
        raise ValueError(f"{folder}: drafter was trained for another target ({drafter.config.get('target')})")
    return kind, drafter


def _draft_lm(method: DraftLMMethod, target, name: str) -> Proposer:
    from deepspec.drafters.draft_lm import DraftLMProposer, check_same_tokenizer
    from deepspec.models import load_model
    from deepspec.models.lean import LeanLlama

    where = f"methods.{name or 'draft_lm'}.model"
    if method.model is None:
        hf = target.loaded.model
    else:
        loaded = load_model(method.model, str(target.backend.dtype).removeprefix("torch."))
        check_same_tokenizer(loaded.tokenizer, target.tokenizer, where)
        hf = loaded.model.to(target.backend.device)
    draft = LeanLlama(hf, target.backend.cache.max_len, n_layers=method.layers,
                      linear="torch" if method.quantize == "int8" else "auto")
    if method.quantize == "int8":
        draft.quantize_int8()
    return DraftLMProposer(draft, method.depth, method.top_k, method.total_tokens)
