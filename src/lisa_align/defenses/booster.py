"""Booster (alignment stage): alignment that attenuates harmful perturbation (``training/booster.py``).

Booster (Huang et al., "Booster: Tackling Harmful Fine-tuning for Large Language Models via Attenuating
Harmful Perturbation", ICLR 2025; reference code: github.com/git-disl/Booster, ``BoosterAlignmentTrainer``
in ``trainer.py``) aligns on the safe rows while penalising how much one normalised step of harmful
fine-tuning would lower the harmful loss:

    min_w  f(w) + λ · [ h(w) − h(w − α · ∇h(w) / ‖∇h(w)‖) ]

f is the alignment loss on the alignment batch, h the loss on a batch of the run's harmful rows (prompt →
harmful answer, ``data.harmful``) of the same size. As in the reference, the second-order term is dropped:
each step applies ∇f(w) + λ · (∇h(w) − ∇h(w′)) with w′ = w − α · ∇h(w) / (‖∇h(w)‖ + 1e-7), the norm
taken over all trainable tensors together (the LoRA weights under LoRA). The reference's defaults are
λ = 5 and α = 0.1 (``script/alignment/smooth_align.sh``), with LoRA r=32, α=4 on q, k, v.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lisa_align.defenses.base import Defense


class Booster(Defense):
    name: Literal["booster"] = "booster"
    lamb: float = Field(5.0, ge=0, allow_inf_nan=False,
                        description="weight λ of the harmful-perturbation term (the reference's 5); 0 is plain SFT")
    alpha: float = Field(0.1, ge=0, allow_inf_nan=False,
                         description="step α along the normalised harmful gradient that simulates harmful "
                                     "fine-tuning (the reference's 0.1)")

    stages = ("align",)
    needs = ("harmful",)
    trainer = "lisa_align.training.booster:BoosterTrainer"
    arguments = "lisa_align.training.booster:BoosterArguments"
    datasets = {"harmful_dataset": "harmful"}

    def training_arguments(self) -> dict[str, Any]:
        return {"booster_lambda": self.lamb, "booster_alpha": self.alpha}

    def describe(self) -> str:
        return f", lamb={self.lamb:g}, alpha={self.alpha:g}"
