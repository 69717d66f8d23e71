"""EAGLE-3: one decoder layer over fused target features, trained with training-time test, decoded as an
EAGLE-2 dynamic tree; exported in vLLM's and SGLang's layouts."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from deepspec.drafters.eagle3.config import Eagle3Config, Eagle3Method
from deepspec.drafters.kind import DrafterKind


class Eagle3Kind(DrafterKind):
    name = "eagle3"
    config = Eagle3Config
    method = Eagle3Method
    formats = ("vllm", "sglang", "hf")
    step_label = "TTT step"

    def feature_layers(self, dc, n_layers, where):
        from deepspec.drafters.layers import default_layers

        layers = dc.layers or default_layers(n_layers)
        bad = [i for i in layers if i >= n_layers]
        if bad:
            raise ValueError(f"{where}: {bad} out of range for a {n_layers}-layer target (ids 0..{n_layers - 1})")
        return sorted(set(layers))

    def new_drafter(self, dc, target_model, tokenizer, layers, draft_ids, train_hidden, meta, where, say=print):
        from deepspec.drafters.eagle3.model import Eagle3Drafter
        from deepspec.drafters.layers import scale_fc_inputs

        if dc.freeze_head and not dc.init_head_from_target:
            raise ValueError(f"{where}.freeze_head: a frozen head must be initialised from the target")
        scaled = {"fc_input_scale": True} if dc.fc_input_scale else {}
        model = Eagle3Drafter.for_target(target_model, layers, draft_ids, dc.init_head_from_target, dc.train.seed,
                                         **meta, **scaled)
        scale_fc_inputs(model, train_hidden, where, say)
        if dc.init_layers == "target":
            try:
                copied = model.copy_target_layer(target_model)
            except ValueError as e:
                raise ValueError(f"{where}.{e}") from None
            say(f"[train] {where}: the decoder layer copied from the target's layer {copied}")
        if dc.freeze_head:
            model.lm_head.weight.requires_grad_(False)
            model.norm.weight.requires_grad_(False)
        return model

    def steps(self, dc, model):
        return dc.ttt_length

    def run_batch(self, runner, dc, seqs, labels, train, generator, last=True):
        from deepspec.drafters.eagle3.model import Eagle3Drafter
        from deepspec.drafters.step_loss import run_batch

        chunked = dc.chunked_head(bool(seqs) and seqs[0]["hidden"].is_cuda)
        return run_batch(runner, partial(Eagle3Drafter.ttt_loss, chunked_head=chunked), seqs, labels, dc.ttt_length,
                         dc.ttt_decay, train, last)

    def load(self, folder, target_model, fingerprint=None):
        from deepspec.drafters.eagle3.checkpoint import import_eagle3

        return import_eagle3(folder, target_model, fingerprint)

    def export(self, drafter, fmt, out: Path, target_model, dtype):
        from deepspec.drafters.eagle3.checkpoint import write_export

        return write_export(drafter, fmt, out, dtype)

    def vllm_proposer(self, method, dc):
        return self.chain_of_depth("eagle3", method)

    def proposer(self, method, drafter, target: Any, temperature, seed):
        from deepspec.drafters.eagle3.proposer import Eagle3Proposer

        verify_ms = calibration = forecast = None
        if method.cuts_on_costs:  # this machine's verify cost of 1 .. total_tokens + 1 rows
            from deepspec.decoding.cost import AcceptanceCalibration, GrowthForecast, proposer_verify_ms

            verify_ms = proposer_verify_ms(target.backend, method.total_tokens + 1)
            calibration = AcceptanceCalibration() if method.length == "calibrated" else None
            forecast = GrowthForecast(method.top_k, verify_ms) if method.grow == "cost" else None
        return Eagle3Proposer(drafter, target.backend.cache.max_len, method.depth, method.top_k, method.total_tokens,
                              verify_ms=verify_ms, calibration=calibration, forecast=forecast)


KINDS = (Eagle3Kind(),)
