"""Block drafters (DFlash, DSpark): decoder layers over the fused context propose a whole block in one
forward; DSpark adds a Markov head and a calibrated confidence head. Exported in DeepSpec's layout, and
DFlash in vLLM's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepspec.drafters.block.config import BlockMethod, DFlashConfig, DSparkConfig
from deepspec.drafters.kind import DrafterKind


class BlockKind(DrafterKind):
    method = BlockMethod
    formats: tuple[str, ...] = ("deepspec",)
    step_label = "block draft"

    def layer_ids(self, dc, n_layers: int, where: str) -> list[int]:
        """Its layer ids in its own "output of layer k" convention (what its checkpoint records)."""
        from deepspec.drafters.layers import default_layers

        ids = dc.layers if dc.layers is not None else [i - 1 for i in default_layers(n_layers)]
        bad = [i for i in ids if not -1 <= i <= n_layers - 2]
        if bad:
            raise ValueError(f"{where}: {bad} out of range for a {n_layers}-layer target (output-of-layer ids "
                             f"-1..{n_layers - 2}; the last layer's output is stored as the final state)")
        if sorted(set(ids)) != list(ids):
            raise ValueError(f"{where}: {ids} must be strictly increasing")
        return list(ids)

    def feature_layers(self, dc, n_layers, where):
        return [k + 1 for k in self.layer_ids(dc, n_layers, where)]

    def new_drafter(self, dc, target_model, tokenizer, layers, draft_ids, train_hidden, meta, where, say=print):
        import itertools

        import torch

        from deepspec.drafters.block.model import BlockDrafter, unused_token_id
        from deepspec.drafters.layers import scale_fc_inputs

        vocab = target_model.config.vocab_size
        mask = unused_token_id(tokenizer, vocab) if dc.mask_token_id == "auto" else dc.mask_token_id
        if mask is not None and mask >= vocab:
            raise ValueError(f"{where}.mask_token_id: {mask} is outside the target's {vocab}-row embedding")
        dspark = dc.kind == "dspark"
        scaled = {"fc_input_scale": True} if dc.fc_input_scale else {}
        scaled |= {"anchor_context": True} if dc.anchor_context else {}
        model = BlockDrafter.for_target(
            target_model, dc.kind, [k - 1 for k in layers], draft_ids, layers=dc.num_layers,
            block_size=dc.block_size, label_convention=dc.label_convention, mask_token_id=mask,
            markov_rank=dc.markov_rank if dspark else 0, markov_head_type=dc.markov_head_type if dspark else "vanilla",
            confidence_head=dspark and dc.confidence_head, confidence_with_markov=dspark and dc.confidence_with_markov,
            seed=dc.train.seed, **meta, **scaled)
        sample: list = []
        if dc.init_layers == "target":  # the sequences the copied layers' q / k scale is read on
            train_hidden = iter(train_hidden)
            sample = [h for _, h in zip(range(8), train_hidden)]
            train_hidden = itertools.chain(sample, train_hidden)
        scale_fc_inputs(model, train_hidden, where, say)
        if dc.init_layers == "target":
            copied = model.copy_target_layers(target_model, torch.cat([h[1:].flatten(1) for h in sample]).float())
            say(f"[train] {where}: decoder layers copied from the target's layers {copied}")
        model.lm_head.weight.requires_grad_(not dc.freeze_head)  # the target's head rows (DFlash / DSpark freeze them)
        return model

    def steps(self, dc, model):
        return model.drafts

    def run_batch(self, runner, dc, seqs, labels, train, generator, last=True):
        from deepspec.drafters.block.loss import run_batch

        return run_batch(runner, seqs, labels, dc, train, generator, last=last)

    def load(self, folder, target_model, fingerprint=None):
        from deepspec.drafters.block.checkpoint import import_block

        return import_block(folder, target_model)

    def export(self, drafter, fmt, out: Path, target_model, dtype):
        import torch

        from deepspec.drafters.block.checkpoint import export_block

        return export_block(drafter, out, target_model.get_output_embeddings().weight, dtype or torch.float32,
                            engine=None if fmt == "deepspec" else fmt)

    def proposer(self, method, drafter, target: Any, temperature, seed):
        from deepspec.drafters.block.proposer import BlockProposer

        verify_ms = None
        if method.cuts_on_costs:  # this machine's verify cost of 1 .. drafts + 1 rows
            from deepspec.decoding.cost import proposer_verify_ms

            verify_ms = proposer_verify_ms(target.backend, drafter.drafts + 1)
        return BlockProposer(drafter, target.backend.cache.max_len, length=method.length,
                             max_length=method.max_length, threshold=method.threshold, temperature=temperature,
                             verify_ms=verify_ms, tree_top_k=method.tree_top_k, tree_threshold=method.tree_threshold,
                             seed=seed)


class DFlashKind(BlockKind):
    name = "dflash"
    config = DFlashConfig
    formats = ("deepspec", "vllm")  # vllm: drafters trained with "own" labels (checkpoint.py says why)

    def vllm_proposer(self, method, dc):
        """vLLM's DFlash proposer feeds [bonus, mask, ...] and samples the mask slots: the whole block of a drafter
        trained with "own" labels (a published checkpoint: z-lab's layout, which it reads)."""
        if dc is None:
            folder = Path(method.checkpoint)
            written = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
            if written.get("architectures") != ["DFlashDraftModel"]:
                raise ValueError(f"checkpoint: vLLM's DFlash loads z-lab's DFlashDraftModel layout; {folder} is "
                                 f"not one")
            return "dflash", int(written["block_size"]) - 1
        if dc.label_convention != "own":
            raise ValueError(f"drafter {method.drafter!r}: vLLM's DFlash samples the mask slots, each for its own "
                             f"position; train it with label_convention: own")
        return "dflash", dc.block_size - 1


class DSparkKind(BlockKind):
    name = "dspark"
    config = DSparkConfig

    def vllm_proposer(self, method, dc):
        raise ValueError(f"drafter {method.drafter!r} is dspark: vLLM 0.32 runs DSpark's Markov and confidence heads "
                         f"only in its GPU model runner; its CPU build has DFlash")

    def after_training(self, model, dc, val_seqs, val_labels):
        """Per-draft confidence calibration (greedy and sampled acceptance) fitted on one half of the validation
        split and judged on the other (halves of its sequences; alternate blocks when it holds one sequence)."""
        if not dc.calibrate or model.confidence_head is None or not val_seqs:
            return None
        from deepspec.drafters.block.calibration import fit_drafter
        from deepspec.drafters.kind import Fitted

        calibration = fit_drafter(model, dc, val_seqs, val_labels)
        if calibration is None:
            return None
        lines = [f"confidence calibrated for {rule} acceptance on half the validation split; held-out ECE "
                 f"{cal['pooled']['before']['ece']:.3f} -> {cal['pooled']['temperature_only']['ece']:.3f} (temperature) "
                 f"-> {cal['pooled']['after']['ece']:.3f} (kept: {', '.join(cal['map'])})" for rule, cal in calibration.items()]
        summary = {rule: {k: {m: r[m] for m in ("ece", "brier", "auroc")} for k, r in cal["pooled"].items()}
                   for rule, cal in calibration.items()}
        return Fitted("calibration.json", calibration, {"calibration": summary}, lines)


KINDS = (DFlashKind(), DSparkKind())
