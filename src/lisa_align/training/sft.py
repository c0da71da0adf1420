"""SFT: the plain Trainer on the mixed user set, with a choice of loss reduction.

``loss_reduction="token"`` is the Hugging Face default (mean over all response tokens of the
optimizer step). ``"example"`` averages each example's response tokens first, then the examples;
short labels (a one-word SST2 answer) are then not swamped by long answers, which matters for
small models (design.md §4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from lisa_align.data.templates import IGNORE_INDEX
from lisa_align.errors import LisaError

LOSS_REDUCTIONS = ("token", "example")
MODEL_COLUMNS = ("input_ids", "attention_mask", "labels")


def model_columns(ds):
    """``ds`` with only the columns the model takes (the pipeline's rows carry metadata too)."""
    extra = [c for c in getattr(ds, "column_names", []) if c not in MODEL_COLUMNS]
    return ds.remove_columns(extra) if extra else ds


def check_nonnegative(name: str, value, hint: str) -> None:
    """One-line LisaError unless ``value`` is a finite number >= 0."""
    if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value) or value < 0:
        raise LisaError(f"{name}={value} must be a finite number >= 0 ({hint})")


@dataclass
class TrainArguments(TrainingArguments):
    loss_reduction: str = field(default="token", metadata={"help": "token | example"})

    def __post_init__(self):
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise LisaError(f"loss_reduction='{self.loss_reduction}': use one of {', '.join(LOSS_REDUCTIONS)}")
        super().__post_init__()


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over each example's labelled tokens (next-token shifted); shape (batch,)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    tok = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
    mask = target.ne(IGNORE_INDEX)
    return (tok * mask).sum(1) / mask.sum(1).clamp(min=1)


class SFTTrainer(Trainer):
    """``transformers.Trainer`` plus ``loss_reduction``; the base of every trainer in lisa-align."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.args, "loss_reduction", "token") == "example":
            # compute_loss returns a batch mean; the Trainer divides it by the accumulation steps.
            self.loss_is_scaled_for_ga = False
        self._params: list[torch.nn.Parameter] | None = None

    def _trainable(self) -> list[torch.nn.Parameter]:
        """The trainable parameters (LoRA A/B under LoRA), in a fixed order; what the penalties act on."""
        if self._params is None:
            self._params = [p for p in self.model.parameters() if p.requires_grad]
        return self._params

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if getattr(self.args, "loss_reduction", "token") != "example":
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch, **kwargs)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = per_example_loss(outputs.logits, labels).mean()
        return (loss, outputs) if return_outputs else loss
