"""EWC: SFT plus a Fisher-weighted pull λ·Σ F (w − w0)² toward the start-of-fine-tuning weights, F the
diagonal empirical Fisher of the alignment data at w0 (``training/ewc.py``).

- ``ewc``, as the reference runs it: fine-tuning continues the alignment LoRA itself (the single-LoRA
  mode), and F is the *sum* of squared batch gradients measured in train mode; λ = 0.001.
- ``ewc_fresh_lora``, the variant of earlier lisa-align releases: a new LoRA on the merged aligned model
  and the *mean* of the squared batch gradients in eval mode (at a fresh LoRA ``lora_A`` has zero Fisher,
  so the pull acts on ``lora_B`` only, and the mean makes it ~2000x weaker at the same λ on the
  reference's 10,000 alignment rows).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from lisa_align.defenses.base import Defense


class EWC(Defense):
    name: Literal["ewc"] = "ewc"
    ewc_lambda: float = Field(0.001, ge=0, allow_inf_nan=False, description="strength λ (the reference's 0.001)")

    adapter = "continue"
    needs = ("alignment",)
    trainer = "lisa_align.training.ewc:EWCTrainer"
    arguments = "lisa_align.training.ewc:EWCArguments"
    datasets = {"fisher_dataset": "alignment"}
    fisher: ClassVar[dict[str, str]] = {"fisher_reduction": "sum", "fisher_mode": "train"}

    def training_arguments(self) -> dict[str, Any]:
        return {"ewc_lambda": self.ewc_lambda, **self.fisher}


class EWCFreshLoRA(EWC):
    name: Literal["ewc_fresh_lora"] = "ewc_fresh_lora"

    adapter = None  # finetune.adapter (a new LoRA by default)
    fisher: ClassVar[dict[str, str]] = {"fisher_reduction": "mean", "fisher_mode": "eval"}
