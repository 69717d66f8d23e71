"""Medusa-1 heads: residual heads on the target's final state, each drafting one more token ahead, decoded
as Medusa's sparse candidate tree; exported in vLLM's and the Medusa authors' (TGI) layouts."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from deepspec.drafters.kind import DrafterKind
from deepspec.drafters.medusa.config import MedusaConfig, MedusaMethod

RANKS = 10  # top-i accuracies measured per head (the candidates a tree may take)


class MedusaKind(DrafterKind):
    name = "medusa"
    config = MedusaConfig
    method = MedusaMethod
    formats = ("vllm", "medusa")
    step_label = "head"

    def feature_layers(self, dc, n_layers, where):
        return [n_layers]  # the final normed state, which the feature cache always holds

    def new_drafter(self, dc, target_model, tokenizer, layers, draft_ids, train_hidden, meta, where, say=print):
        from deepspec.drafters.medusa.model import MedusaHeads

        heads = MedusaHeads.for_target(target_model, draft_ids, dc.heads, dc.head_layers, dc.share_head,
                                       dc.train.seed, **meta)
        if dc.share_head:
            heads.lm_head.weight.requires_grad_(False)  # the target's own rows
        return heads

    def steps(self, dc, model):
        return dc.heads

    def run_batch(self, runner, dc, seqs, labels, train, generator, last=True):
        from deepspec.drafters.medusa.model import MedusaHeads
        from deepspec.drafters.step_loss import run_batch

        chunked = dc.chunked_head(bool(seqs) and seqs[0]["hidden"].is_cuda)
        return run_batch(runner, partial(MedusaHeads.medusa_loss, chunked_head=chunked), seqs, labels, dc.heads,
                         dc.head_decay, train, last)

    def after_training(self, model, dc, val_seqs, val_labels):
        """Each head's top-i accuracy on the validation split: what the sparse tree is built from."""
        import torch

        from deepspec.drafters.kind import Fitted
        from deepspec.training.targets import target_to_draft

        hits = torch.zeros(model.heads, RANKS)
        counts = torch.zeros(model.heads)
        lookup = target_to_draft(model.token_map, int(model.config["vocab_size"]))
        model.eval()
        with torch.no_grad():
            for s, t in zip(val_seqs, val_labels):
                T = s["input_ids"].numel()
                for k, logits in enumerate(model(s["hidden"][: T - 1, 0].float())):
                    idx = torch.arange(T - 1 - k) + 1 + k
                    scored = t["trained"][idx]
                    ranks = logits[: T - 1 - k].float().topk(RANKS, dim=-1).indices
                    right = ranks == lookup[t["target_top"][idx]][:, None]
                    hits[k] += right[scored].sum(0).float()
                    counts[k] += float(scored.sum())
        if not counts.sum():
            return None
        accuracy = (hits / counts.clamp(min=1)[:, None]).tolist()
        model.config["head_accuracy"] = [[round(a, 4) for a in row] for row in accuracy]
        top1 = ", ".join(f"{row[0]:.2f}" for row in accuracy)
        return Fitted("head_accuracy.json", {"top_i_accuracy": model.config["head_accuracy"], "positions": counts.tolist()},
                      {"head_top1_accuracy": [row[0] for row in accuracy]},
                      [f"head top-1 accuracy on the validation split [{top1}]; the decode tree is built from "
                       f"the top-{RANKS} accuracies"])

    def load(self, folder, target_model, fingerprint=None):
        from deepspec.drafters.medusa.checkpoint import import_medusa

        return import_medusa(folder, target_model, fingerprint)

    def export(self, drafter, fmt, out: Path, target_model, dtype):
        from deepspec.drafters.medusa.checkpoint import export_medusa

        return export_medusa(drafter, fmt, out, target_model.get_output_embeddings().weight, dtype)

    def vllm_proposer(self, method, dc):
        return self.chain_of_depth("medusa", method)

    def proposer(self, method, drafter, target: Any, temperature, seed):
        from deepspec.drafters.medusa.proposer import MedusaProposer
        from deepspec.models.lean import normed_final

        backend = target.backend
        return MedusaProposer(drafter, backend.config.num_hidden_layers,
                              lambda h: normed_final(backend, h), method.top_k, method.total_tokens, method.depth)


KINDS = (MedusaKind(),)
