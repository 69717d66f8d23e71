"""EAGLE-3's config sections: the drafter trained here (`drafters.<name>`) and the method that decodes with it."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from deepspec.config_base import DrafterBase, HeadLossOption, InitLayers, TrainedMethod, hash_default


class Eagle3Config(DrafterBase, HeadLossOption):
    """EAGLE-3: fc fusion of captured target layers, one decoder layer, reduced vocabulary, training-time test."""

    kind: Literal["eagle3"]
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="target layers whose *input* hidden state is fused (HF hidden_states index); default [2, L//2, L-3]"
    )
    fc_input_scale: bool = Field(False, description="divide each fused layer by its median RMS on the training "
                                                    "split before fc (folded into fc on export)")
    ttt_length: Annotated[int, Field(ge=1)] = 7
    ttt_decay: Annotated[float, Field(gt=0, le=1)] = 0.8
    init_head_from_target: bool = True
    freeze_head: bool = Field(True, description="keep the target-initialised norm and lm_head fixed (fewer parameters to learn from little data)")
    init_layers: InitLayers = "random"


hash_default(Eagle3Config, head_loss="auto", init_layers="random")


class Eagle3Method(TrainedMethod):
    """Decoding with an EAGLE-3 drafter: EAGLE-2 dynamic tree, or a chain with top_k 1. A published checkpoint
    may be in our, vLLM's, SGLang's or the EAGLE authors' layout.

    `length`: fixed (the `total_tokens` best nodes), cost (of those, the best-scored prefix that maximises
    expected committed tokens per second from the draft probabilities and the verify cost measured on this
    machine, down to no draft at all; the tree stops growing once its newest depth would be cut) or calibrated
    (cost, reading the probabilities through a map learned during the run from which nodes the verifier took).
    `grow`: depth (draft every depth up to `depth` whose nodes the cut keeps) or cost (with a cost length, also
    stop before a depth whose forecast gain does not pay for its drafter forward: `decoding.cost.GrowthForecast`)."""

    decodes: ClassVar[tuple[str, ...]] = ("eagle3",)
    kind: Literal["eagle3"]
    depth: Annotated[int, Field(ge=1)] = 5
    top_k: Annotated[int, Field(ge=1)] = 4
    total_tokens: Annotated[int, Field(ge=1)] = 12
    length: Literal["fixed", "cost", "calibrated"] = "fixed"
    grow: Literal["depth", "cost"] = "depth"

    @model_validator(mode="after")
    def _grow_on_costs(self) -> "Eagle3Method":
        if self.grow == "cost" and not self.cuts_on_costs:
            raise ValueError("grow: cost prices each depth on the verify-cost curve; it needs length: cost or calibrated")
        return self

    def as_chain(self) -> "Eagle3Method":
        return super().as_chain().model_copy(update={"length": "fixed", "grow": "depth"})


hash_default(Eagle3Method, length="fixed", grow="depth")
