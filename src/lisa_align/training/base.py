"""The base of every trainer here: ``transformers.Trainer`` plus what each defense's trainer shares.

- ``loss_reduction``: ``"token"`` is the Hugging Face default (mean over all response tokens of the
  optimizer step); ``"example"`` averages each example's response tokens first, then the examples,
  so short labels (a one-word SST2 answer) are not swamped by long answers, which matters for small
  models (README, "Exact semantics").
- ``warmup_ratio``: the warm-up as a share of the run's steps (1.0 = all of them).
- A trainer's own state (Lisa's anchor, EWC's reference and Fisher) saved in every checkpoint and
  taken back on resume; no checkpoint of non-finite weights; a one-line error on a nan/inf loss.
- Penalties (Lisa's proximal term, EWC's pull) go to ``.grad`` after backward, or into the loss
  under DeepSpeed (:meth:`BaseTrainer.penalty_in_loss`, :meth:`BaseTrainer.add_to_loss`).

Used as is, it is plain SFT.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from lisa_align.data.templates import IGNORE_INDEX
from lisa_align.errors import LisaError
from lisa_align.io import atomic_write_json
from lisa_align.training.callbacks import check_finite_loss, guarded_checkpoint, local_shard

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


PENALTY_MODES = ("auto", "grad", "loss")


def check_penalty_mode(name: str, mode: str) -> None:
    if mode not in PENALTY_MODES:
        raise LisaError(f"{name}='{mode}': use one of {', '.join(PENALTY_MODES)}")


@dataclass
class BaseArguments(TrainingArguments):
    loss_reduction: str = field(default="token", metadata={"help": "token | example"})
    warmup_ratio: float | None = field(default=None, metadata={
        "help": "warm-up steps as a share of the total (0..1, 1.0 = every step); overrides warmup_steps"})

    def __post_init__(self):
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise LisaError(f"loss_reduction='{self.loss_reduction}': use one of {', '.join(LOSS_REDUCTIONS)}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio <= 1:
            raise LisaError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1] (a share of the stage's steps)")
        super().__post_init__()

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """``warmup_ratio`` of the steps when it is set: transformers reads a ``warmup_steps`` of 1.0
        as one step, so a ratio never goes through ``warmup_steps``."""
        if self.warmup_ratio is None:
            return super().get_warmup_steps(num_training_steps)
        return math.ceil(num_training_steps * self.warmup_ratio)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over each example's labelled tokens (next-token shifted); shape (batch,)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    tok = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
    mask = target.ne(IGNORE_INDEX)
    return (tok * mask).sum(1) / mask.sum(1).clamp(min=1)


STATE_TENSORS = "lisa_align_state.safetensors"
STATE_META = "lisa_align_state.json"


def _sharded(trainer) -> bool:
    """FSDP: each rank holds its own shard of the parameters (and of Lisa's anchor)."""
    return bool(getattr(trainer, "is_fsdp_enabled", False))


def _state_name(name: str, trainer) -> str:
    """One state file, or one per rank when the parameters are sharded (FSDP)."""
    if _sharded(trainer) and trainer.args.world_size > 1:
        stem, dot, ext = name.partition(".")
        return f"{stem}.rank{trainer.args.process_index}{dot}{ext}"
    return name


class BaseMixin:
    """What :class:`BaseTrainer` adds to a ``transformers.Trainer`` (``loss_reduction``, checkpointed trainer
    state, the non-finite guards, the penalty plumbing), as a mixin that also goes before a Trainer
    subclass (e.g. TRL's ``SFTTrainer``; see :mod:`lisa_align.training.trl`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.args, "loss_reduction", "token") == "example":
            # compute_loss returns a batch mean; the Trainer divides it by the accumulation steps.
            self.loss_is_scaled_for_ga = False
        self._params: list[torch.nn.Parameter] | None = None

    # ---- trainer state that must survive a resume (Lisa's anchor, EWC's reference and Fisher) ----
    def trainer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON metadata) this trainer adds to each checkpoint; none for plain SFT."""
        return {}, {}

    def restore_trainer_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Take back what :meth:`trainer_state` saved (called once, when a resumed run starts)."""

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._resume_dir = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def resumed_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """What the checkpoint this run resumed from holds for this trainer (None: a fresh run, or a
        checkpoint written without it)."""
        folder = getattr(self, "_resume_dir", None)
        if not folder:
            return None
        meta_path = Path(folder) / _state_name(STATE_META, self)
        if not meta_path.is_file():
            return None
        from safetensors.torch import load_file

        tensor_path = Path(folder) / _state_name(STATE_TENSORS, self)
        tensors = load_file(str(tensor_path)) if tensor_path.is_file() else {}
        return tensors, json.loads(meta_path.read_text(encoding="utf-8"))

    def restore_if_resumed(self) -> bool:
        """At the first step of a resumed run, take back this trainer's state from the checkpoint (not
        re-taken at the resume step); False on a fresh run or a checkpoint written without it."""
        state = self.resumed_state() if self.state.global_step > 0 else None
        if state is None:
            return False
        self.restore_trainer_state(*state)
        return True

    @guarded_checkpoint  # no checkpoint of nan/inf weights; a full disk leaves no half-written folder
    def _save_checkpoint(self, model, trial):
        # Written into the checkpoint folder before the Trainer's own files: trainer_state.json, the
        # Trainer's last file, marks a complete checkpoint (see callbacks.last_good_checkpoint).
        tensors, meta = self.trainer_state()
        if meta and (self.args.should_save or _sharded(self)):
            from safetensors.torch import save_file
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            if tensors:
                save_file({k: local_shard(v).detach().contiguous().cpu() for k, v in tensors.items()},
                          str(folder / _state_name(STATE_TENSORS, self)))
            atomic_write_json(folder / _state_name(STATE_META, self), meta)
        super()._save_checkpoint(model, trial)

    def _trainable(self) -> list[torch.nn.Parameter]:
        """The trainable parameters (LoRA A/B under LoRA), in a fixed order; what the penalties act on."""
        if self._params is None:
            self._params = [p for p in self.model.parameters() if p.requires_grad]
        return self._params

    # ---- penalties: in .grad (fused, after backward) or in the loss (DeepSpeed) ------------------
    def deepspeed_zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage this trainer runs under, or None without DeepSpeed."""
        if not getattr(self, "is_deepspeed_enabled", False):
            return None
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return int(getattr(plugin, "zero_stage", 0) or 0) if plugin is not None else None

    def penalty_in_loss(self, mode: str, what: str) -> bool:
        """Whether a penalty goes into the loss (``mode`` "loss", or "auto" under DeepSpeed, which keeps
        gradients in its own buffers so an addition to ``.grad`` would be lost) rather than into
        ``.grad``. ZeRO-3 is refused: its parameters exist only inside forward/backward."""
        zero_stage = self.deepspeed_zero_stage()
        if zero_stage == 3:
            raise LisaError(f"{what} does not support DeepSpeed ZeRO-3 (its parameters are gathered only inside "
                            "forward/backward, so the reference weights and the penalty cannot see them): use "
                            "ZeRO-2, FSDP2 or DDP (configs/accelerate/)")
        return mode == "loss" or (mode == "auto" and zero_stage is not None)

    def add_to_loss(self, out, term: torch.Tensor, num_items_in_batch, return_outputs: bool):
        """``compute_loss``'s output with a penalty ``term`` added so that the optimizer step's gradient
        holds it once: the Trainer divides an unscaled loss by the accumulation steps; a loss it will not
        divide gets 1/GA here."""
        loss = out[0] if return_outputs else out
        scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)
        loss = loss + (term / self.current_gradient_accumulation_steps if scaled else term)
        return (loss, *out[1:]) if return_outputs else loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if getattr(self.args, "loss_reduction", "token") != "example":
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch, **kwargs)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = per_example_loss(outputs.logits, labels).mean()
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
        """The Trainer's step, stopped at once (one-line LisaError naming the stage and the optimizer
        step) when the micro-batch loss is nan or inf: before the optimizer applies its gradient, so the
        weights and every checkpoint written so far stay finite."""
        loss = super().training_step(model, inputs, num_items_in_batch, **kwargs)
        check_finite_loss(self, loss)
        return loss


class BaseTrainer(BaseMixin, Trainer):
    """``transformers.Trainer`` plus ``loss_reduction``, checkpointed trainer state, the non-finite
    guards and the penalty plumbing; the base of every trainer in lisa-align (alone: plain SFT)."""
