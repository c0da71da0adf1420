"""Trainer callbacks and guards: structured logs (one JSON object per line) for every logged event, and
the "never lose a run" guards: a non-finite loss stops training at once with a one-line error, a
checkpoint with non-finite weights is never written, and a full disk while writing a checkpoint
leaves no half-written folder behind.
"""

from __future__ import annotations

import functools
import math
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from lisa_align.errors import LisaError
from lisa_align.io import append_jsonl, is_disk_full

CHECKPOINT_PREFIX = "checkpoint"
CHECKPOINT_DONE = "trainer_state.json"  # the Trainer writes it last: its presence marks a complete checkpoint


class JsonlLogCallback(TrainerCallback):
    """Appends each ``on_log`` record (loss, lr, Lisa switch records, ...) to a ``log.jsonl``."""

    def __init__(self, path, **extra):
        self.path = path
        self.extra = extra
        self.t0 = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, {**self.extra, "step": state.global_step,
                                     "time": round(time.time() - self.t0, 3), **logs})


# ---- non-finite loss / weights ------------------------------------------------------------------
def last_good_checkpoint(output_dir) -> Path | None:
    """The newest complete ``checkpoint-N`` folder in ``output_dir`` (None when there is none): the
    Trainer writes trainer_state.json last, so a folder a kill left half-written is skipped."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [(int(d.name.rsplit("-", 1)[1]), d) for d in root.glob(f"{CHECKPOINT_PREFIX}-*")
             if d.name.rsplit("-", 1)[1].isdigit() and (d / CHECKPOINT_DONE).is_file()]
    return max(found)[1] if found else None


def stage_of(trainer) -> str:
    """The stage name given to the trainer's :class:`NonFiniteGuard` ("finetune/lisa", ...)."""
    for cb in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        if isinstance(cb, NonFiniteGuard):
            return cb.stage
    return "training"


def _lr_setting(stage: str) -> str:
    section = stage.split("/", 1)[0]
    return f"{section}.lr" if section in ("align", "finetune") else "the learning rate"


def nonfinite_error(stage: str, what: str, value: float, step: int, output_dir) -> LisaError:
    """The one-line error for a non-finite ``what`` (training loss, gradient norm, weights) at
    optimizer ``step`` (1-based: the step being taken)."""
    last = last_good_checkpoint(output_dir)
    fix = (f"To fix: lower {_lr_setting(stage)} (or max_grad_norm), train in bfloat16/float32 rather than "
           "float16, or check that step's data")
    if last is not None:
        kept = (f"; the last good checkpoint is {last}. {fix}; a re-run resumes from that checkpoint with the "
                f"learning rate saved in it, so delete {output_dir} first to retrain with a new rate")
    else:
        kept = f"; no checkpoint was saved before it. {fix}; a re-run starts the stage again"
    return LisaError(f"{stage}: the {what} became {value} at step {step}, so training stopped before saving "
                     f"anything from that step{kept}")


def _value(x) -> float:
    return float(x.detach().float().cpu()) if isinstance(x, torch.Tensor) else float(x)


def check_finite_loss(trainer, loss) -> None:
    """Raise the non-finite error when a micro-batch's ``loss`` is nan or inf."""
    t = loss.detach().float().reshape(-1) if isinstance(loss, torch.Tensor) else torch.tensor([float(loss)])
    bad = t[~torch.isfinite(t)]
    if bad.numel():
        raise nonfinite_error(stage_of(trainer), "training loss", _value(bad[0]), trainer.state.global_step + 1,
                              trainer.args.output_dir)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def first_nonfinite_weight(model) -> tuple[str, float] | None:
    """(name, a bad value) of the first trainable parameter holding nan or inf; None if all are finite.
    Under FSDP2 each rank checks its own shard."""
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen weights do not change
        t = local_shard(p.detach())
        if t.numel() and not bool(torch.isfinite(t).all()):
            flat = t.reshape(-1)
            return name, _value(flat[~torch.isfinite(flat)][0])
    return None


def check_finite_weights(trainer, model=None) -> None:
    """Raise the non-finite error when a trainable weight is nan or inf (before a checkpoint is written)."""
    bad = first_nonfinite_weight(model if model is not None else trainer.model)
    if bad is not None:
        raise nonfinite_error(stage_of(trainer), f"weight {bad[0]}", bad[1], trainer.state.global_step,
                              trainer.args.output_dir)


class NonFiniteGuard(TrainerCallback):
    """Stops training with a one-line LisaError naming ``stage`` and the optimizer step when the logged
    loss or gradient norm is nan/inf. The per-micro-batch loss is checked by ``BaseTrainer.training_step``
    (the Trainer logs every ``logging_steps`` only, and its ``logging_nan_inf_filter`` hides a nan loss
    from the logs); the weights are checked before every checkpoint by ``BaseTrainer._save_checkpoint``."""

    def __init__(self, stage: str = "training"):
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, what in (("loss", "training loss"), ("grad_norm", "gradient norm")):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                # logged after the optimizer step of global_step: its update already used the value
                raise nonfinite_error(self.stage, what, value, state.global_step, args.output_dir)


# ---- checkpoints: refuse non-finite weights, survive a full disk --------------------------------
def checkpoint_disk_full_error(path, previous: Path | None) -> LisaError:
    kept = (f"the previous checkpoint {previous} is intact and a re-run resumes from it" if previous is not None
            else "no earlier checkpoint exists, so a re-run starts the stage again")
    return LisaError(f"no space left on device while saving {path}; the half-written folder was removed. "
                     f"Free space (or set output_dir on a larger disk) and re-run: {kept}")


def guarded_checkpoint(save):
    """Decorates ``Trainer._save_checkpoint``: no checkpoint of non-finite weights is written, and a full
    disk while writing one raises a one-line LisaError after removing the half-written folder (the
    previous checkpoint is untouched: the Trainer deletes old checkpoints only after a save succeeds)."""

    @functools.wraps(save)
    def wrapper(self, model, trial, *args, **kwargs):
        check_finite_weights(self, model)
        root = Path(self._get_output_dir(trial=trial))
        folder = root / f"{CHECKPOINT_PREFIX}-{self.state.global_step}"
        previous = last_good_checkpoint(root)
        try:
            return save(self, model, trial, *args, **kwargs)
        except Exception as e:
            if not is_disk_full(e, folder):
                raise
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            raise checkpoint_disk_full_error(folder, previous if previous != folder else None) from e

    return wrapper
