"""Antidote (post-fine-tuning): one-shot pruning of the weights that the harmful rows use most.

After fine-tuning, ``calibration_rows`` harmful rows (prompt + harmful answer, the run's ``harmful``
data, first rows first; the reference's 2000) go through the fine-tuned model once. Each linear layer
of the user adapter (the LoRA factors ``lora_A`` and ``lora_B`` separately, each with its own input,
as git-disl/Antidote scores them; for a full fine-tune the ``full_modules`` projections) gets the
Wanda score |W_ij| · ‖X_j‖₂, X its input activations over every token of the calibration rows, and in
each output row the ``dense_ratio`` share of weights with the highest scores is set to zero. No
retraining. The torch code is ``lisa_align.post.antidote``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field

from lisa_align.defenses.base import Defense, check_rows


class Antidote(Defense):
    name: Literal["antidote"] = "antidote"
    dense_ratio: float = Field(0.1, ge=0, le=1, allow_inf_nan=False,
                               description="share of each output row's weights zeroed, those with the highest "
                               "Wanda scores (the reference's 0.1)")
    calibration_rows: int = Field(2000, gt=0, description="harmful rows of the calibration pass (the reference's "
                                  "2000), the first rows of data.harmful")
    full_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"],
                                    description="a full fine-tune (no LoRA): the linear layers pruned (the "
                                    "reference's full_finetuning mode prunes q, k and v)")
    batch_size: int = Field(8, gt=0, description="calibration rows per forward pass (padding is not counted, "
                            "so the scores do not depend on it)")

    stages = ("post",)
    needs = ("harmful",)
    post_transform = "lisa_align.post.antidote:apply"

    def calibration(self, data: Mapping[str, list[dict]]) -> list[dict]:
        """The calibration rows: the first ``calibration_rows`` rows of the harmful data."""
        harmful = data["harmful"]
        check_rows(self, "harmful", harmful, self.calibration_rows, "calibration_rows")
        return harmful[: self.calibration_rows]

    def describe(self) -> str:
        return f", dense_ratio={self.dense_ratio}, {self.calibration_rows} calibration rows"
