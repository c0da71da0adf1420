"""Booster (alignment stage): the alignment gradient plus λ times the harmful-perturbation attenuation.

Per micro-batch, with a harmful batch as large as the alignment batch:
1. g = ∇h(w) on the harmful batch (``torch.autograd.grad``: ``.grad``, where earlier micro-batches of the
   optimizer step accumulate, is untouched, and no DDP gradient hook fires);
2. the trainable weights move to w′ = w − α · g / (‖g‖ + 1e-7), ‖g‖ the L2 norm over all trainable tensors
   together; g′ = ∇h(w′) on the same batch; the weights are copied back (bit-exact);
3. c = λ · (g − g′) joins the alignment loss as a term whose value is 0 and whose gradient is c, so the
   Trainer's own backward (gradient accumulation, loss scaling, the DDP all-reduce, DeepSpeed) treats
   ∇f(w) + c as one micro-batch gradient; gradient clipping then acts on the summed gradient, as in the
   reference. The logged loss is f alone.

Harmful batches come from an endless stream of the harmful rows, one permutation per pass seeded from
``args.seed`` (batches are always full and may straddle passes); draw k of rank r takes the rows at
positions (k·world_size + r)·B … +B. The number of draws so far is saved in every checkpoint, so a resumed
run continues the stream where the straight run would be.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lisa_align.errors import LisaError
from lisa_align.training.base import BaseArguments, BaseTrainer, check_nonnegative, model_columns
from lisa_align.training.callbacks import check_finite_loss
from lisa_align.training.sampler import _Stream

NORM_EPS = 1e-7  # the reference's ε in w − α · g / (‖g‖ + ε)
STREAM_SALT = 7_919  # keeps the harmful permutations apart from the other seeded streams of a run


@dataclass
class BoosterArguments(BaseArguments):
    booster_lambda: float = field(default=5.0, metadata={"help": "weight λ of the harmful-perturbation term"})
    booster_alpha: float = field(default=0.1, metadata={"help": "step α along the normalised harmful gradient"})

    def __post_init__(self):
        check_nonnegative("booster_lambda", self.booster_lambda, "the reference uses 5; 0 is plain SFT")
        check_nonnegative("booster_alpha", self.booster_alpha, "the reference uses 0.1")
        super().__post_init__()


class BoosterTrainer(BaseTrainer):
    def __init__(self, *args, harmful_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        if harmful_dataset is None or len(harmful_dataset) == 0:
            raise LisaError("BoosterTrainer needs harmful_dataset= (the harmful rows: prompt -> harmful answer)")
        self.penalty_in_loss("loss", "Booster")  # refuses DeepSpeed ZeRO-3
        self.harmful_dataset = model_columns(harmful_dataset)
        self._stream = _Stream(len(self.harmful_dataset), 0, int(self.args.seed) + STREAM_SALT)
        self.harmful_draws = 0  # harmful batches this rank has drawn (micro-batches trained)
        self._started = False
        self._correction: list[torch.Tensor] | None = None
        self.last_harmful_loss: float | None = None

    # ---- the harmful stream ----------------------------------------------------------------------
    def harmful_indices(self, draw: int) -> list[int]:
        """Rows of the harmful set in this rank's ``draw``-th batch."""
        b, w = self.args.per_device_train_batch_size, max(int(self.args.world_size), 1)
        return self._stream.take((draw * w + int(self.args.process_index)) * b, b)

    def harmful_batch(self, draw: int) -> dict:
        """This rank's ``draw``-th harmful batch, collated and on the device."""
        rows = [self.harmful_dataset[i] for i in self.harmful_indices(draw)]
        return self._prepare_inputs(self.data_collator(rows))

    def trainer_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {"trainer": "booster", "global_step": self.state.global_step, "harmful_draws": self.harmful_draws}

    def restore_trainer_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if "harmful_draws" not in meta:
            raise LisaError(f"the checkpoint {self._resume_dir} was not written by Booster (no harmful-batch "
                            "position): start in a new output folder")
        self.harmful_draws = int(meta["harmful_draws"])

    # ---- the step ----------------------------------------------------------------------------------
    def _harmful_grad(self, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        params = self._trainable()
        with self.compute_loss_context_manager():
            loss = self.compute_loss(self.model, batch)  # unwrapped: no DDP reducer for these passes
        check_finite_loss(self, loss)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]

    def booster_correction(self, batch) -> list[torch.Tensor]:
        """λ · (∇h(w) − ∇h(w′)) per trainable tensor, w′ = w − α · ∇h(w) / (‖∇h(w)‖ + 1e-7); the weights
        are back at w on return."""
        params = self._trainable()
        lam, alpha = float(self.args.booster_lambda), float(self.args.booster_alpha)
        loss, g = self._harmful_grad(batch)
        self.last_harmful_loss = float(loss)
        norms = torch._foreach_norm(g, 2, dtype=torch.float32) if g else []
        total = float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))) if g else 0.0
        if total != total or total == float("inf"):
            raise LisaError(f"Booster: the harmful gradient norm is {total} at optimizer step "
                            f"{self.state.global_step + 1}; lower the learning rate or use bf16/fp32")
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                torch._foreach_add_([p.data for p in params], g, alpha=-alpha / (total + NORM_EPS))
            _, g2 = self._harmful_grad(batch)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.data.copy_(s)
            del saved
        torch._foreach_sub_(g, g2)
        torch._foreach_mul_(g, lam)
        return g

    def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
        if not self._started:
            self._started = True
            if not self.restore_if_resumed() and self.state.global_step > 0:
                # a checkpoint without Booster state: the position a run of full accumulation steps reaches
                self.harmful_draws = self.state.global_step * self.args.gradient_accumulation_steps
        model.train()
        draw = self.harmful_draws
        self.harmful_draws += 1
        if self.args.booster_lambda > 0:
            self._correction = self.booster_correction(self.harmful_batch(draw))
        try:
            return super().training_step(model, inputs, num_items_in_batch, **kwargs)
        finally:
            self._correction = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch, **kwargs)
        if self._correction is None or not model.training:
            return out
        params = self._trainable()
        # value 0, gradient c: Σ c · (w − sg(w))
        term = sum((c * (p - p.detach())).sum() for c, p in zip(self._correction, params))
        return self.add_to_loss(out, term, num_items_in_batch, return_outputs)
