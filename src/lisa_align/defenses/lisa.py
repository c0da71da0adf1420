"""Lisa and BSO: bi-state optimization (K1 alignment steps, K2 fine-tuning steps, alternating) with
the proximal term ρ/2·‖w − anchor‖² (``training/lisa.py``); BSO is Lisa with ρ = 0.

A method's ``k1``, ``k2``, ``rho`` and ``proximal_warmup_ratio`` default to ``finetune.lisa``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lisa_align.defenses.base import Defense
from lisa_align.errors import LisaError


def validate_lisa_settings(k1: int, k2: int, rho: float, proximal_warmup_ratio: float = 0.1) -> None:
    """One-line errors for impossible settings."""
    for name, v in (("K1", k1), ("K2", k2)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise LisaError(f"{name}={v} must be a whole number >= 0 (steps in the "
                            f"{'alignment' if name == 'K1' else 'fine-tuning'} state)")
    if k1 == 0 and k2 == 0:
        raise LisaError("K1 = K2 = 0 leaves no steps in either state: set K1 > 0 or K2 > 0 (the paper uses 100 / 900)")
    if not isinstance(rho, (int, float)) or math.isnan(rho) or math.isinf(rho) or rho < 0:
        raise LisaError(f"rho={rho} must be a finite number >= 0 (0 gives BSO, the paper uses 1)")
    if not 0.0 <= proximal_warmup_ratio <= 1.0:
        raise LisaError(f"proximal_warmup_ratio={proximal_warmup_ratio} must be in [0, 1] (the reference uses 0.1)")


def steps_of_cycle(k1: int, k2: int, cycle_epochs: float | None, steps_per_epoch: int) -> tuple[int, int]:
    """K1 and K2 in optimizer steps. Without ``cycle_epochs`` they are steps already; with it they are a
    ratio, and one cycle lasts ``cycle_epochs`` epochs of the user data: K1 = round(cycle·K1/(K1+K2)),
    K2 = cycle − K1 (e.g. 1:9 over a 63-step epoch gives 6/57)."""
    if cycle_epochs is None:
        return k1, k2
    cycle = max(int(math.floor(steps_per_epoch * cycle_epochs + 0.5)), 1)
    a = int(math.floor(cycle * k1 / (k1 + k2) + 0.5))
    a = min(max(a, 1 if k1 else 0), cycle - (1 if k2 else 0))
    return a, cycle - a


def _checked(k1, k2, rho, ratio) -> None:
    try:
        validate_lisa_settings(k1, k2, rho, ratio)
    except LisaError as e:  # a ValueError keeps the config key path in the message
        raise ValueError(str(e)) from None


class LisaSettings(BaseModel):
    """``finetune.lisa``: the defaults of every lisa/bso method (the paper's values)."""

    model_config = ConfigDict(extra="forbid")

    k1: int = 100
    k2: int = 900
    rho: float = 1.0
    proximal_warmup_ratio: float = 0.1
    cycle_epochs: float | None = Field(None, gt=0, description="k1:k2 as a ratio, one cycle lasting this many "
                                       "epochs of the user data (e.g. 1.0 with k1: 1, k2: 9); None: k1, k2 in steps")

    @model_validator(mode="after")
    def _check(self):
        _checked(self.k1, self.k2, self.rho, self.proximal_warmup_ratio)
        return self


class Lisa(Defense):
    name: Literal["lisa"] = "lisa"
    k1: int | None = None
    k2: int | None = None
    rho: float | None = None
    proximal_warmup_ratio: float | None = None
    cycle_epochs: float | None = Field(None, gt=0)

    needs = ("alignment",)
    trainer = "lisa_align.training.lisa:LisaTrainer"
    arguments = "lisa_align.training.lisa:LisaArguments"
    datasets = {"alignment_dataset": "alignment"}
    artifacts = {"lisa_switches.json": "switch_log"}

    def resolve(self, section: Any) -> Lisa:
        base: LisaSettings = section.lisa
        pick = lambda mine, default: default if mine is None else mine  # noqa: E731
        done = self.model_copy(update={"k1": pick(self.k1, base.k1), "k2": pick(self.k2, base.k2),
                                       "rho": pick(self.rho, base.rho),
                                       "proximal_warmup_ratio": pick(self.proximal_warmup_ratio,
                                                                     base.proximal_warmup_ratio),
                                       "cycle_epochs": pick(self.cycle_epochs, base.cycle_epochs)})
        _checked(done.k1, done.k2, done.rho, done.proximal_warmup_ratio)
        return done

    def training_arguments(self) -> dict[str, Any]:
        return {"k1": self.k1, "k2": self.k2, "rho": self.rho, "proximal_warmup_ratio": self.proximal_warmup_ratio,
                "cycle_epochs": self.cycle_epochs}

    def describe(self) -> str:
        unit = f" per cycle of {self.cycle_epochs} epoch(s)" if self.cycle_epochs is not None else ""
        return f", K1/K2={self.k1}/{self.k2}{unit}, rho={self.rho}"

    def report_values(self) -> dict[str, Any]:
        return {"k1": self.k1, "k2": self.k2, "rho": self.rho}


class BSO(Lisa):
    name: Literal["bso"] = "bso"

    @model_validator(mode="after")
    def _no_rho(self):
        if self.rho not in (None, 0):
            raise ValueError(f"bso is Lisa with rho=0, so rho={self.rho} is not allowed; "
                             "use name: lisa for rho > 0, or remove rho")
        return self

    def resolve(self, section: Any) -> BSO:
        return super().resolve(section).model_copy(update={"rho": 0.0})
