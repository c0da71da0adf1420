"""EWC baseline: a Fisher-weighted L2 pull toward the start-of-fine-tuning trainable weights.

Loss: h(w) + λ · Σ_i F_i (w_i − w0_i)², so the added gradient is 2λ F ⊙ (w − w0) (applied to
``.grad`` once per optimizer step, like Lisa's proximal term; under DeepSpeed, which keeps
gradients in its own buffers, the term goes into the loss instead: ``ewc_mode``). F is the diagonal empirical Fisher
of the alignment data at w0: the mean over alignment batches of the squared batch gradient of the
training loss. w0 and F are taken at the first optimizer step, and kept in each checkpoint (restored
shard by shard, :func:`~lisa_align.training.state.restore_like`). FSDP is refused: accelerate runs no
FSDP on the CPU, so EWC on sharded parameters has not been run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from lisa_align.errors import LisaError
from lisa_align.training.base import BaseArguments, BaseTrainer, check_nonnegative, check_penalty_mode, model_columns
from lisa_align.training.penalty import add_pull_gradient, grad_scale
from lisa_align.training.state import restore_like


@dataclass
class EWCArguments(BaseArguments):
    ewc_lambda: float = field(default=0.001, metadata={"help": "strength λ of the Fisher-weighted pull"})
    fisher_batches: int | None = field(default=None, metadata={"help": "alignment batches for the Fisher (None: all)"})
    fisher_reduction: str = field(default="mean", metadata={
        "help": "sum: the sum over alignment batches of the squared batch gradient (the reference); mean: their mean"})
    fisher_mode: str = field(default="eval", metadata={
        "help": "train: the Fisher measured with the model in train mode, dropout on (the reference); eval: off"})
    ewc_mode: str = field(default="auto", metadata={
        "help": "grad: add 2λF(w − w0) to .grad after backward; loss: add λΣF(w − w0)² to the loss (for "
                "DeepSpeed); auto: loss under DeepSpeed, else grad"})

    def __post_init__(self):
        check_nonnegative("ewc_lambda", self.ewc_lambda, "the reference uses 0.001")
        check_penalty_mode("ewc_mode", self.ewc_mode)
        for name, value, options in (("fisher_reduction", self.fisher_reduction, ("sum", "mean")),
                                     ("fisher_mode", self.fisher_mode, ("train", "eval"))):
            if value not in options:
                raise LisaError(f"{name}='{value}': use one of {', '.join(options)}")
        super().__post_init__()


class EWCTrainer(BaseTrainer):
    def __init__(self, *args, fisher_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self, "is_fsdp_enabled", False):
            raise LisaError("EWC does not support FSDP yet (its Fisher and w0 on sharded parameters are untested): "
                            "use DDP or DeepSpeed ZeRO-2 (configs/accelerate/)")
        if fisher_dataset is None or len(fisher_dataset) == 0:
            raise LisaError("EWCTrainer needs fisher_dataset= (the alignment data the Fisher is measured on)")
        self.fisher_dataset = model_columns(fisher_dataset)
        self.fisher: list[torch.Tensor] | None = None
        self.reference: list[torch.Tensor] | None = None
        self._pull_step = -1
        self.pull_in_loss = self.penalty_in_loss(self.args.ewc_mode, "EWC")

    def compute_fisher(self) -> list[torch.Tensor]:
        """Diagonal empirical Fisher: the sum (``fisher_reduction: sum``, the reference) or the mean over
        alignment batches of (∂loss/∂w)², in train mode (``fisher_mode: train``, the reference: dropout
        on) or eval mode."""
        params, model = self._trainable(), self.model
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        loader = DataLoader(self.fisher_dataset, batch_size=self.args.per_device_train_batch_size,
                            collate_fn=self.data_collator)
        was_training = model.training
        model.train(self.args.fisher_mode == "train")
        n = 0
        for i, batch in enumerate(loader):
            if self.args.fisher_batches is not None and i >= self.args.fisher_batches:
                break
            batch = self._prepare_inputs(batch)
            model.zero_grad(set_to_none=True)
            self.compute_loss(model, batch).backward()
            for f, p in zip(fisher, params):
                if p.grad is not None:
                    f.add_(p.grad.detach().float() ** 2)
            n += 1
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        scale = 1.0 if self.args.fisher_reduction == "sum" else 1.0 / max(n, 1)
        return [(f * scale).to(p.dtype) for f, p in zip(fisher, params)]

    def trainer_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        if self.reference is None:
            return {}, {}
        tensors = {f"reference.{i}": r for i, r in enumerate(self.reference)}
        tensors.update({f"fisher.{i}": f for i, f in enumerate(self.fisher)})
        return tensors, {"trainer": "ewc", "global_step": self.state.global_step, "tensors": len(self.reference)}

    def restore_trainer_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        params = self._trainable()
        if meta.get("tensors") != len(params):
            raise LisaError(f"the checkpoint {self._resume_dir} holds EWC state for {meta.get('tensors')} tensors, "
                            f"this model has {len(params)} trainable tensors: start in a new output folder")
        self.reference = restore_like(params, tensors, "reference", f"the checkpoint {self._resume_dir}")
        self.fisher = restore_like(params, tensors, "fisher", f"the checkpoint {self._resume_dir}")

    def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
        if self.reference is None and not self.restore_if_resumed():  # w0 and F of the start of fine-tuning
            self.reference = [p.detach().clone() for p in self._trainable()]
            self.fisher = self.compute_fisher()
        step = self.state.global_step
        loss = super().training_step(model, inputs, num_items_in_batch, **kwargs)
        if step != self._pull_step:
            self._apply_pull()
            self._pull_step = step
        return loss

    def pull_term(self) -> torch.Tensor:
        """λ Σ F (w − w0)² as a differentiable tensor (the loss mode)."""
        params = self._trainable()
        sq = sum((f.float() * (p - r.to(p.dtype)).float() ** 2).sum()
                 for p, r, f in zip(params, self.reference, self.fisher))
        return self.args.ewc_lambda * sq

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch, **kwargs)
        if not (self.pull_in_loss and model.training and self.reference is not None and self.args.ewc_lambda > 0):
            return out
        return self.add_to_loss(out, self.pull_term(), num_items_in_batch, return_outputs)

    def _apply_pull(self) -> None:
        """grad += 2λ F ⊙ (w − w0): the gradient of λ Σ F (w − w0)²."""
        if self.args.ewc_lambda > 0 and not self.pull_in_loss:
            coef = 2.0 * self.args.ewc_lambda * grad_scale(self.accelerator)
            add_pull_gradient(self._trainable(), self.reference, coef, weights=self.fisher)
