"""Block drafters' config sections (DFlash, DSpark): the drafters trained here and the method that decodes them."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from deepspec.config_base import DrafterBase, InitLayers, TrainedMethod, hash_default


class BlockConfig(DrafterBase):
    """A block drafter (DFlash / DSpark): N decoder layers over the fused context of K target layers."""

    layers: list[Annotated[int, Field(ge=-1)]] | None = Field(
        None, description="target layers fused, in the *output of layer k* convention of DFlash / DSpark checkpoints "
                          "(-1: the embeddings); default: the ones EAGLE-3 reads ([1, L/2 - 1, L - 4]), so one "
                          "feature cache serves both")
    num_layers: Annotated[int, Field(ge=1)] = Field(2, description="draft decoder layers")
    block_size: Annotated[int, Field(ge=2)] = 7
    label_convention: Literal["next", "own"] = Field(
        "next", description="next: every slot predicts the following token (DeepSpec, block_size drafts); "
                            "own: mask slots predict their own position (z-lab / SpecForge, block_size - 1 drafts)")
    mask_token_id: Annotated[int, Field(ge=0)] | Literal["auto"] | None = Field(
        "auto", description="embedding row of the mask token; auto: an unused token of the tokenizer; null: a trained "
                            "mask embedding")
    draft_vocab: Annotated[int, Field(ge=2)] | None = 4096
    num_anchors: Annotated[int, Field(ge=1)] = Field(16, description="blocks per training sequence, redrawn each epoch")
    anchors: Literal["supervised", "answer"] = Field(
        "supervised", description="where training anchors are drawn: any supervised position, or (DeepSpec's) only "
                                  "positions followed by a target-written token, where the drafter runs at inference")
    freeze_head: bool = Field(True, description="keep the target's head rows fixed (DFlash / DSpark recipe)")
    fc_input_scale: bool = Field(False, description="divide each fused layer by its median RMS on the training split "
                                                    "before fc (folded into fc on export), as EAGLE-3 may")
    anchor_context: bool = Field(False, description="add the context state before the anchor (C at a - 1, the newest "
                                                    "position the target has computed) to the anchor row's input, as "
                                                    "EAGLE-3 pairs a token with the state before it; outside DeepSpec's layout")
    init_layers: InitLayers = "random"
    eval_anchors: Annotated[int, Field(ge=1)] | None = Field(256, description="blocks per validation sequence")
    loss_gamma: Annotated[float, Field(gt=0)] | Literal["acceptance"] | None = Field(
        7.0, description="draft j weighted exp(-j / gamma); acceptance: by the probability that every earlier draft "
                         "of its block is accepted (1 - TV each, teacher-forced), its share of expected τ; null: equally")
    ce_weight: Annotated[float, Field(ge=0)] = 1.0
    l1_weight: Annotated[float, Field(ge=0)] = 0.0
    confidence_weight: Annotated[float, Field(ge=0)] = 0.0


class DFlashConfig(BlockConfig):
    kind: Literal["dflash"]


class DSparkConfig(BlockConfig):
    """DFlash plus a Markov head (low-rank bigram bias, sequential at inference) and a confidence head."""

    kind: Literal["dspark"]
    ce_weight: Annotated[float, Field(ge=0)] = 0.1
    l1_weight: Annotated[float, Field(ge=0)] = 0.9
    confidence_weight: Annotated[float, Field(ge=0)] = 1.0
    markov_rank: Annotated[int, Field(ge=0)] = 64
    markov_head_type: Literal["vanilla", "gated", "rnn"] = "vanilla"
    confidence_head: bool = True
    confidence_with_markov: bool = True
    calibrate: bool = Field(True, description="fit a temperature and bias per draft to the confidence on held-out data (greedy and sampled acceptance)")


for _kind in (DFlashConfig, DSparkConfig):
    hash_default(_kind, anchors="supervised", freeze_head=True, fc_input_scale=False, init_layers="random",
                 anchor_context=False)


class BlockMethod(TrainedMethod):
    """Decoding with a block drafter (DFlash / DSpark): one parallel forward proposes a block.

    `length`: fixed (every draft, up to `max_length`), threshold (stop before the first draft whose
    calibrated confidence is below `threshold`) or cost (the length that maximises expected committed
    tokens per second, from the confidences and the verify cost measured on this machine). `tree_top_k`
    > 1 adds the next best tokens as siblings where the confidence is below `tree_threshold` (a drafter
    without a confidence head, DFlash, branches at its first draft). A published checkpoint is DeepSpec's
    (Qwen3DSparkModel) or z-lab's (DFlashDraftModel)."""

    decodes: ClassVar[tuple[str, ...]] = ("dflash", "dspark")
    kind: Literal["block"]
    length: Literal["fixed", "threshold", "cost"] = "fixed"
    max_length: Annotated[int, Field(ge=1)] | None = None
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    tree_top_k: Annotated[int, Field(ge=1)] = 1
    tree_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5

    def as_chain(self) -> "BlockMethod":
        """As vLLM's DFlash proposer runs it: the whole block every round, no siblings."""
        return self.model_copy(update={"length": "fixed", "max_length": None, "tree_top_k": 1})

    def check_drafter(self, where: str, drafter: DrafterBase) -> None:
        super().check_drafter(where, drafter)
        if self.length != "fixed" and not getattr(drafter, "confidence_head", False):
            raise ValueError(f"{where.rpartition('.')[0]}.length: {self.length!r} needs a drafter with a confidence "
                             f"head (dspark)")
