"""Trainers: the base (plain SFT with loss reduction), Lisa / BSO (bi-state with a proximal term), EWC
and Vaccine, and the stage runner the pipeline uses. ``SFTTrainer`` and ``TrainArguments`` are the
old names of ``BaseTrainer`` and ``BaseArguments`` (deprecated; they go in the next release).
``LisaMixin`` puts Lisa before another Trainer subclass; ``LisaSFTConfig`` and ``LisaSFTTrainer`` (TRL's
SFTTrainer, the ``trl`` extra) are imported on first use."""

import warnings

from lisa_align.training.base import BaseArguments, BaseTrainer, per_example_loss
from lisa_align.training.ewc import EWCArguments, EWCTrainer
from lisa_align.training.lisa import LisaArguments, LisaArgumentsMixin, LisaConfig, LisaMixin, LisaTrainer
from lisa_align.training.schedule import ALIGNMENT, FINETUNE, BiStateSchedule
from lisa_align.training.vaccine import VaccineArguments, VaccineTrainer, attention_modules

_DEPRECATED = {"SFTTrainer": "BaseTrainer", "TrainArguments": "BaseArguments"}
_TRL = ("LisaSFTConfig", "LisaSFTTrainer")  # need the trl extra: imported on first use

__all__ = ["ALIGNMENT", "FINETUNE", "BaseArguments", "BaseTrainer", "BiStateSchedule", "EWCArguments", "EWCTrainer",
           "LisaArguments", "LisaArgumentsMixin", "LisaConfig", "LisaMixin", "LisaSFTConfig", "LisaSFTTrainer",
           "LisaTrainer", "VaccineArguments", "VaccineTrainer", "attention_modules", "per_example_loss"]


def __getattr__(name: str):
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(f"lisa_align.training.{name} is deprecated: use {new} (same class)", DeprecationWarning,
                      stacklevel=2)
        return globals()[new]
    if name in _TRL:
        from lisa_align.training import trl

        return getattr(trl, name)
    raise AttributeError(f"module 'lisa_align.training' has no attribute '{name}'")
