"""SafeLoRA (post-fine-tuning): project LoRA updates that stray from the alignment direction.

Per LoRA target module, V = W_aligned − W_base and C = V·Vᵀ / ‖V‖_F (IBM/SafeLoRA's matrix, a scaled
Gram matrix rather than an orthogonal projector). A layer whose update B·A has cosine similarity
≤ ``threshold`` with C·B·A gets B ← C·B (``select: threshold``); ``select: number`` projects the
``num_proj_layers`` least similar layers (every layer tied with the last one too, as the reference's
threshold at that cosine does). Cosines are rounded to 5 decimals, as the reference's. "aligned" and
"base" are the run's aligned (merged) model and its base, or two models given by path
(``aligned_model``, ``base_model``). The torch code is ``lisa_align.post.safelora``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lisa_align.defenses.base import Defense


class SafeLoRA(Defense):
    name: Literal["safelora"] = "safelora"
    select: Literal["threshold", "number"] = Field(
        "threshold", description="threshold: project every layer whose cosine is <= threshold; number: the "
        "num_proj_layers least similar layers (the reference's SafeLoRAConfig default)")
    threshold: float = Field(0.5, ge=-1, le=1, allow_inf_nan=False, description="cosine similarity threshold")
    num_proj_layers: int = Field(10, gt=0, description="select: number: how many layers are projected")
    aligned_model: str | None = Field(None, description="the aligned model (HF id or folder; default: the run's "
                                      "aligned model)")
    base_model: str | None = Field(None, description="the unaligned model (default: the run's base model)")

    stages = ("post",)
    post_transform = "lisa_align.post.safelora:apply"
    lora_only = True

    def resolve(self, section: Any) -> SafeLoRA:
        align = getattr(section, "align", None)
        if self.aligned_model is None and align is not None and not align.enabled:
            raise ValueError("needs an alignment to project onto (W_aligned - W_base): set align.enabled: true, "
                             "or give aligned_model (and base_model)")
        return self

    def describe(self) -> str:
        how = (f"cosine <= {self.threshold}" if self.select == "threshold"
               else f"the {self.num_proj_layers} least similar layers")
        return f", projecting {how}"
