"""LisaTrainer: Bi-State Optimization with a proximal term (README, "Exact semantics").

Drop-in for ``transformers.Trainer``: pass ``LisaArguments`` and ``alignment_dataset=``.

The logic lives in :class:`LisaMixin` (with its settings in :class:`LisaArgumentsMixin`), so that it also
goes before another Trainer subclass: ``LisaTrainer = LisaMixin + BaseTrainer``, and with TRL,
``class MyTrainer(LisaMixin, SFTTrainer)`` with ``LisaSFTConfig`` (:mod:`lisa_align.training.trl`).

- Optimizer steps follow :class:`~lisa_align.training.schedule.BiStateSchedule` (start in the
  alignment state; K1 alignment steps, K2 fine-tuning steps, alternating; T = SFT's budget; the
  run ends on a fine-tuning phase).
- Batches come from :class:`~lisa_align.training.sampler.BiStateBatchSampler`, so the user stream
  keeps its position and no user batch is dropped.
- The anchor is one copy of the trainable weights, taken at step 0 and refreshed at each switch.
- The proximal term ρ/2·‖w − anchor‖² is applied as its gradient ρ·(w − anchor), added to
  ``.grad`` in place with fused ``torch._foreach_*`` ops (no autograd graph; w − anchor is formed
  first, in bounded chunks, so the result is rounded once as autograd's would be, also in bf16),
  once per optimizer step under gradient accumulation, before clipping. Under
  data parallelism every rank adds the same term to its local gradient, and the all-reduce
  average leaves it unchanged. It is off while step ≤ proximal_warmup_ratio · T.
- BSO is ρ = 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from lisa_align.defenses.lisa import steps_of_cycle, validate_lisa_settings
from lisa_align.errors import LisaError
from lisa_align.rundir import LISA_DRIFT, LISA_STEP
from lisa_align.training.base import (
    MODEL_COLUMNS,
    BaseArguments,
    BaseMixin,
    BaseTrainer,
    check_penalty_mode,
)
from lisa_align.training.penalty import add_pull_gradient, grad_scale, pull_distance
from lisa_align.training.sampler import BiStateBatchSampler, steps_per_epoch
from lisa_align.training.schedule import ALIGNMENT, BiStateSchedule
from lisa_align.training.state import restore_like

log = logging.getLogger(__name__)


@dataclass
class LisaArgumentsMixin:
    """Lisa's settings, to combine with a ``TrainingArguments`` subclass: :class:`LisaArguments` (with
    :class:`~lisa_align.training.base.BaseArguments`), ``LisaSFTConfig`` (with TRL's ``SFTConfig``)."""

    k1: int = field(default=100, metadata={"help": "optimizer steps per alignment phase"})
    k2: int = field(default=900, metadata={"help": "optimizer steps per fine-tuning phase"})
    rho: float = field(default=1.0, metadata={"help": "proximal strength; 0 gives BSO"})
    proximal_warmup_ratio: float = field(default=0.1, metadata={"help": "no proximal term while step <= ratio*T"})
    cycle_epochs: float | None = field(default=None, metadata={
        "help": "k1:k2 as a ratio with one cycle of this many epochs of the user data (None: k1, k2 are steps)"})
    alignment_rows: int | None = field(default=None, metadata={"help": "use the first N alignment rows (None: all)"})
    proximal_mode: str = field(default="auto", metadata={
        "help": "grad: add rho*(w - anchor) to .grad after backward (fused, no graph); loss: add the term "
                "to the loss (autograd; for DeepSpeed, which keeps gradients in its own buffers); "
                "auto: loss under DeepSpeed, else grad"})

    def __post_init__(self):
        validate_lisa_settings(self.k1, self.k2, self.rho, self.proximal_warmup_ratio)
        check_penalty_mode("proximal_mode", self.proximal_mode)
        super().__post_init__()


@dataclass
class LisaArguments(LisaArgumentsMixin, BaseArguments):
    """``TrainingArguments`` (with ``loss_reduction``, ``warmup_ratio``) plus Lisa's K1, K2, ρ, ..."""


LisaConfig = LisaArguments  # the name the paper's design notes use

# The columns the bi-state loader keeps: what the model takes, and the per-row sequence lengths of packed rows
# (TRL's packing), which its collator reads.
LOADER_COLUMNS = (*MODEL_COLUMNS, "seq_lengths")


def loader_columns(ds):
    extra = [c for c in getattr(ds, "column_names", []) if c not in LOADER_COLUMNS]
    return ds.remove_columns(extra) if extra else ds


class LisaMixin(BaseMixin):
    """Lisa / BSO before a ``transformers.Trainer`` subclass: the bi-state schedule and sampler, the anchor,
    the proximal term, the checkpointed state and exact resume. ``LisaTrainer = LisaMixin + BaseTrainer``;
    with TRL, ``class MyTrainer(LisaMixin, SFTTrainer)`` (args: ``LisaSFTConfig``). Takes
    ``alignment_dataset=``, prepared like ``train_dataset`` (:meth:`prepare_alignment_dataset`)."""

    def __init__(self, *args, alignment_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        for name in ("k1", "k2", "rho", "proximal_warmup_ratio"):
            if not hasattr(self.args, name):
                raise LisaError(f"{type(self).__name__} needs LisaArguments (K1, K2, rho): pass "
                                "args=LisaArguments(...) (with TRL's SFTTrainer: LisaSFTConfig(...))")
        if alignment_dataset is None and self.args.k1 > 0:
            raise LisaError(f"{type(self).__name__} needs alignment_dataset= (the provider's safety data) when K1 > 0")
        if alignment_dataset is not None and self.args.alignment_rows is not None:
            if self.args.alignment_rows > len(alignment_dataset):
                raise LisaError(f"alignment_rows={self.args.alignment_rows} but the alignment dataset has "
                                f"{len(alignment_dataset)} rows; lower alignment_rows")
            alignment_dataset = alignment_dataset.select(range(self.args.alignment_rows))
        if alignment_dataset is not None:
            alignment_dataset = self.prepare_alignment_dataset(alignment_dataset)
        self.alignment_dataset = alignment_dataset
        self.proximal_in_loss = self.penalty_in_loss(self.args.proximal_mode, "Lisa")
        self.schedule: BiStateSchedule | None = None
        self._anchor: list[torch.Tensor] | None = None
        self._begun_step = -1
        self._prox_step = -1
        self.switch_log: list[dict] = []

    # ---- data -----------------------------------------------------------------------------
    def prepare_alignment_dataset(self, dataset):
        """The alignment rows prepared as the Trainer prepared ``train_dataset``: as given for a plain
        Trainer (tokenised rows); under TRL's SFTTrainer, through its own dataset preparation (chat
        template, completion-only / assistant-only labels, truncation, packing)."""
        if hasattr(self, "_prepare_dataset"):  # TRL's trainers
            return prepare_like_train_dataset(self, dataset)
        return dataset

    def _steps(self, n_user: int) -> tuple[int, int]:
        a = self.args
        spe = steps_per_epoch(n_user, a.per_device_train_batch_size, a.gradient_accumulation_steps, a.world_size)
        total = a.max_steps if a.max_steps > 0 else math.ceil(a.num_train_epochs * spe)
        return spe, total

    def get_train_dataloader(self) -> DataLoader:
        import datasets

        if self.train_dataset is None:
            raise LisaError(f"{type(self).__name__} needs train_dataset= (the user's fine-tuning data)")
        user = loader_columns(self.train_dataset)
        parts = [user]
        if self.alignment_dataset is not None and len(self.alignment_dataset):
            align = loader_columns(self.alignment_dataset)
            parts.append(align if align.features == user.features else align.cast(user.features))
        data = datasets.concatenate_datasets(parts) if len(parts) > 1 else user
        n_user = len(user)
        n_align = len(data) - n_user
        spe, total = self._steps(n_user)
        self.schedule = BiStateSchedule(*steps_of_cycle(self.args.k1, self.args.k2, self.args.cycle_epochs, spe), total)
        self.warn_if_few_cycles()
        sampler = BiStateBatchSampler(
            self.schedule, n_user=n_user, n_align=n_align, batch_size=self.args.per_device_train_batch_size,
            grad_accum=self.args.gradient_accumulation_steps, world_size=self.args.world_size,
            steps_per_epoch=spe, seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            lengths=([len(ids) for ids in data["input_ids"]]
                     if self.args.train_sampling_strategy == "group_by_length" else None))
        loader = DataLoader(data, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers,
                            pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    # ---- the two states and the proximal term ----------------------------------------------
    @property
    def anchor(self) -> list[torch.Tensor] | None:
        return self._anchor

    def drift(self) -> float:
        """‖w − anchor‖ over the trainable weights."""
        if self._anchor is None:
            return 0.0
        return pull_distance(self._trainable(), self._anchor)

    # ---- checkpointed state -----------------------------------------------------------------
    def trainer_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        if self._anchor is None or self.schedule is None:
            return {}, {}
        step, sch = self.state.global_step, self.schedule
        done = max(step - 1, 0)  # the last step taken
        per_step = self.args.gradient_accumulation_steps * self.args.world_size * self.args.per_device_train_batch_size
        meta = {"trainer": "lisa", "global_step": step, "k1": sch.k1, "k2": sch.k2, "total_steps": sch.total_steps,
                "rho": self.args.rho, "state": sch.state(done), "last_switch": sch.last_switch(done),
                "clock": step - sch.last_switch(done),  # steps taken in the current state
                "next_state": sch.state(step) if step < sch.total_steps else None,
                "stream_positions": {s: sch.count_before(s, step) * per_step for s in (ALIGNMENT, "finetune")},
                "anchor_tensors": len(self._anchor), "switch_log": self.switch_log}
        return {f"anchor.{i}": a for i, a in enumerate(self._anchor)}, meta

    def restore_trainer_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        sch = self.schedule
        if (meta.get("k1"), meta.get("k2"), meta.get("total_steps")) != (sch.k1, sch.k2, sch.total_steps):
            raise LisaError(f"the checkpoint {self._resume_dir} was written with "
                            f"K1/K2={meta.get('k1')}/{meta.get('k2')} over {meta.get('total_steps')} steps, "
                            f"this run has {sch.k1}/{sch.k2} over {sch.total_steps}: resume with the same settings, "
                            "or start in a new output folder")
        params = self._trainable()
        if len(tensors) != len(params):
            raise LisaError(f"the checkpoint {self._resume_dir} holds {len(tensors)} anchor tensors for "
                            f"{len(params)} trainable tensors: it belongs to another model or LoRA setting")
        self._anchor = restore_like(params, tensors, "anchor", f"the checkpoint {self._resume_dir}")
        self.switch_log = list(meta.get("switch_log", []))

    def _begin_step(self, step: int) -> None:
        params = self._trainable()
        if self._anchor is None and not self.restore_if_resumed():
            self._anchor = [p.detach().clone() for p in params]
        if step > 0 and self.schedule.is_switch(step):
            drift = self.drift()
            # the term as the phase that ends here applied it at its last step: none inside the warm-up
            active = self.proximal_active(step - 1)
            rho = self.args.rho if active else 0.0
            record = {LISA_STEP: step, "lisa/state": self.schedule.state(step),
                      "lisa/from_state": self.schedule.state(step - 1), LISA_DRIFT: drift,
                      "lisa/proximal_active": active,
                      "lisa/proximal_term": 0.5 * rho * drift ** 2, "lisa/proximal_grad_norm": rho * drift}
            self.switch_log.append(record)
            self.log({k: float(v) for k, v in record.items() if not isinstance(v, str)}
                     | {"lisa/state_is_alignment": float(record["lisa/state"] == ALIGNMENT)})
            with torch.no_grad():
                torch._foreach_copy_(self._anchor, [p.detach() for p in params])
        self._begun_step = step

    def warn_if_few_cycles(self) -> None:
        """Fewer than 2 bi-state cycles leave no recovery phase after an alignment phase (BSO then behaves
        like SFT): a warning, as this is legal but rarely what a paper setting means."""
        sch = self.schedule
        cycles = sch.total_steps / max(sch.k1 + sch.k2, 1)
        if sch.k1 > 0 and sch.k2 > 0 and cycles < 2:
            log.warning("Lisa/BSO runs %.2f bi-state cycles (K1+K2=%d over %d steps): fewer than 2, so it never "
                        "returns to alignment after fine-tuning; lower K1/K2 (the paper: one cycle per epoch)",
                        cycles, sch.k1 + sch.k2, sch.total_steps)

    def proximal_active(self, step: int) -> bool:
        return self.args.rho > 0 and self.schedule.proximal_active(step, self.args.proximal_warmup_ratio)

    def _apply_proximal(self, step: int) -> None:
        if self.proximal_in_loss or not self.proximal_active(step):
            return
        add_pull_gradient(self._trainable(), self._anchor, self.args.rho * grad_scale(self.accelerator))

    def proximal_term(self) -> torch.Tensor:
        """ρ/2·‖w − anchor‖² as a differentiable tensor (the loss mode)."""
        params = self._trainable()
        sq = sum(((p - a.to(p.dtype)).float() ** 2).sum() for p, a in zip(params, self._anchor))
        return 0.5 * self.args.rho * sq

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch, **kwargs)
        if not (self.proximal_in_loss and model.training and self.proximal_active(self.state.global_step)):
            return out
        return self.add_to_loss(out, self.proximal_term(), num_items_in_batch, return_outputs)

    def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
        step = self.state.global_step
        if self.schedule is None:  # dataloader built elsewhere (e.g. a custom loop)
            self.schedule = BiStateSchedule(self.args.k1, self.args.k2, self.state.max_steps)
        if step != self._begun_step:
            self._begin_step(step)
        loss = super().training_step(model, inputs, num_items_in_batch, **kwargs)
        if step != self._prox_step:
            self._apply_proximal(step)
            self._prox_step = step
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Training-loss records also carry the drift ‖w − anchor‖ and the state (the drift curve)."""
        if "loss" in logs and self._anchor is not None and self.schedule is not None:
            logs = {**logs, LISA_DRIFT: self.drift(),
                    "lisa/state_is_alignment":  # the state of the step just taken
                    float(self.schedule.state(max(self.state.global_step - 1, 0)) == ALIGNMENT)}
        super().log(logs, *args, **kwargs)

    def current_state(self) -> str:
        return self.schedule.state(self.state.global_step)


class LisaTrainer(LisaMixin, BaseTrainer):
    """Lisa / BSO on ``transformers.Trainer`` (:class:`LisaMixin` + :class:`~lisa_align.training.base.BaseTrainer`):
    pass ``args=LisaArguments(...)`` and ``alignment_dataset=``."""


def prepare_like_train_dataset(trainer, dataset):
    """``dataset`` through the preparation a TRL trainer gave its ``train_dataset`` (none when the trainer
    skips it: ``dataset_kwargs={"skip_prepare_dataset": True}`` or a vision dataset)."""
    if getattr(trainer, "_skip_prepare_dataset", False):
        return dataset
    return trainer._prepare_dataset(dataset, trainer.processing_class, trainer.args, trainer.args.packing,
                                    getattr(trainer, "_formatting_func", None), "alignment")
