"""Trainers: SFT (plain Trainer + loss reduction) and Lisa / BSO (bi-state with a proximal term)."""

from lisa_align.training.ewc import EWCArguments, EWCTrainer
from lisa_align.training.lisa import LisaArguments, LisaConfig, LisaTrainer
from lisa_align.training.schedule import ALIGNMENT, FINETUNE, BiStateSchedule
from lisa_align.training.sft import SFTTrainer, TrainArguments, per_example_loss
from lisa_align.training.vaccine import VaccineArguments, VaccineTrainer, attention_modules

__all__ = ["ALIGNMENT", "EWCArguments", "EWCTrainer", "FINETUNE", "BiStateSchedule", "LisaArguments", "LisaConfig", "LisaTrainer",
           "SFTTrainer", "TrainArguments", "VaccineArguments", "VaccineTrainer",
           "attention_modules", "per_example_loss"]
