"""T-Vaccine (alignment stage): Vaccine's perturbation on a few decoder layers drawn by their harmful gradient.

Reference: Liu et al., "Targeted Vaccine: Safety Alignment for Large Language Models against Harmful
Fine-Tuning via Layer-wise Perturbation" (2024), https://github.com/Lslland/T-Vaccine (``trainer.py``,
``BaseTrainer``; defaults from ``script/alignment/T-Vaccine.sh`` and the README's rho=3).

Every ``measure_every`` (K) steps, the gradient of the loss on a harmful batch with respect to each
decoder layer's attention output is measured; its L2 norm, divided by the sum over layers, is that
layer's probability. Every ``resample_every`` (J) steps, ``sampled_layers`` (S) layers are drawn from
those probabilities without replacement; until the next draw only their trainable weights (the LoRA
weights of their attention module, as in the reference) train, and only their attention outputs get
Vaccine's perturbation, scaled to total norm ``rho`` over them. The trainer is
``training/t_vaccine.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from lisa_align.defenses.base import check_rows
from lisa_align.defenses.vaccine import Vaccine


class TVaccine(Vaccine):
    name: Literal["t_vaccine"] = "t_vaccine"
    rho: float = Field(3.0, ge=0, allow_inf_nan=False, description="perturbation norm over the sampled layers")
    sampled_layers: int = Field(8, ge=1, description="S: decoder layers drawn at each draw (at most the model's)")
    resample_every: int = Field(20, ge=1, description="J: optimizer steps between two draws of the layers")
    measure_every: int = Field(200, ge=1, description="K: optimizer steps between two measurements of the "
                                                      "layers' harmful-gradient norms")
    harmful_rows: int | None = Field(200, ge=1, description="the first N rows of the harmful data the norms are "
                                                            "measured on (the reference's prompt_data_size; "
                                                            "None: all)")
    probe_batch_size: int = Field(1, ge=1, description="harmful rows per measurement (the reference: 1)")
    scope: Literal["attention", "layer"] = Field(
        "attention", description="what a sampled layer trains: attention, the trainable weights of its attention "
        "module (the reference: other LoRA weights, e.g. on the MLP, always train); layer, those of the whole "
        "decoder layer")

    needs = ("harmful",)
    datasets = {"harmful_dataset": "harmful"}
    trainer = "lisa_align.training.t_vaccine:TVaccineTrainer"
    arguments = "lisa_align.training.t_vaccine:TVaccineArguments"

    def training_arguments(self) -> dict[str, Any]:
        return {**super().training_arguments(), "t_vaccine_sampled_layers": self.sampled_layers,
                "t_vaccine_resample_every": self.resample_every, "t_vaccine_measure_every": self.measure_every,
                "t_vaccine_harmful_rows": self.harmful_rows, "t_vaccine_probe_batch_size": self.probe_batch_size,
                "t_vaccine_scope": self.scope}

    def training_rows(self, rows: list[dict], data: Mapping[str, list[dict]]) -> list[dict]:
        if self.harmful_rows is not None:
            check_rows(self, "harmful", data.get("harmful", []), self.harmful_rows, "harmful_rows")
        return rows

    def describe(self) -> str:
        return f", rho={self.rho}, S/J/K={self.sampled_layers}/{self.resample_every}/{self.measure_every}"
