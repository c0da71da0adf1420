"""EWC: SFT plus a Fisher-weighted pull λ·Σ F (w − w0)² toward the start-of-fine-tuning weights; F is
the diagonal empirical Fisher of the alignment data at w0 (``training/ewc.py``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lisa_align.defenses.base import Defense


class EWC(Defense):
    name: Literal["ewc"] = "ewc"
    ewc_lambda: float = Field(0.001, ge=0, allow_inf_nan=False, description="strength λ (the reference's 0.001)")

    needs = ("alignment",)
    trainer = "lisa_align.training.ewc:EWCTrainer"
    arguments = "lisa_align.training.ewc:EWCArguments"
    datasets = {"fisher_dataset": "alignment"}

    def training_arguments(self) -> dict[str, Any]:
        return {"ewc_lambda": self.ewc_lambda}
