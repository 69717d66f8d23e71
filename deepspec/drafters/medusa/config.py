"""Medusa's config sections: the heads trained here (`drafters.<name>`) and the method that decodes with them."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from deepspec.config_base import DrafterBase, HeadLossOption, TrainedMethod, hash_default


class MedusaConfig(DrafterBase, HeadLossOption):
    """Medusa-1: K residual heads on the target's final state; head k predicts the token k + 2 ahead."""

    kind: Literal["medusa"]
    heads: Annotated[int, Field(ge=1)] = Field(4, description="heads: drafts per round along a path")
    head_layers: Annotated[int, Field(ge=1)] = Field(1, description="residual SiLU blocks per head")
    share_head: bool = Field(True, description="every head reads out through the target's own head rows (frozen); "
                                               "false: each head has its own copy, initialised from the target's")
    head_decay: Annotated[float, Field(gt=0, le=1)] = Field(0.8, description="head k's loss weighted head_decay^k")


hash_default(MedusaConfig, head_loss="auto")


class MedusaMethod(TrainedMethod):
    """Decoding with Medusa heads: a sparse tree of each head's top tokens, kept where the product of the heads'
    measured top-i accuracies is largest (Medusa's tree builder). A published checkpoint may be in vLLM's
    or the Medusa authors' (TGI) layout."""

    decodes: ClassVar[tuple[str, ...]] = ("medusa",)
    kind: Literal["medusa"]
    top_k: Annotated[int, Field(ge=1)] = Field(4, description="candidates per head the tree may take")
    total_tokens: Annotated[int, Field(ge=1)] = Field(12, description="tree nodes verified per round")
    depth: Annotated[int, Field(ge=1)] | None = Field(None, description="heads used (default: all)")
