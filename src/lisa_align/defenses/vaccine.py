"""Vaccine and RandomVaccine (alignment stage): perturbation-aware alignment (``training/vaccine.py``).

Vaccine perturbs each decoder layer's attention output by the gradient there, scaled to total norm
``rho``; RandomVaccine adds Gaussian noise of variance ``rho`` instead. Vaccine + Lisa is
``align.method: vaccine`` with a ``lisa`` fine-tuning method.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lisa_align.defenses.base import Defense


class Vaccine(Defense):
    name: Literal["vaccine"] = "vaccine"
    rho: float = Field(2.0, ge=0, allow_inf_nan=False, description="perturbation norm (random_vaccine: variance)")

    stages = ("align",)
    trainer = "lisa_align.training.vaccine:VaccineTrainer"
    arguments = "lisa_align.training.vaccine:VaccineArguments"

    def training_arguments(self) -> dict[str, Any]:
        return {"vaccine_rho": self.rho, "vaccine_random": False}


class RandomVaccine(Vaccine):
    name: Literal["random_vaccine"] = "random_vaccine"

    def training_arguments(self) -> dict[str, Any]:
        return {"vaccine_rho": self.rho, "vaccine_random": True}
