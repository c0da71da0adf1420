"""EWC baseline: a Fisher-weighted L2 pull toward the start-of-fine-tuning trainable weights.

Loss: h(w) + λ · Σ_i F_i (w_i − w0_i)², so the added gradient is 2λ F ⊙ (w − w0) (applied to
``.grad`` once per optimizer step, like Lisa's proximal term). F is the diagonal empirical Fisher
of the alignment data at w0: the mean over alignment batches of the squared batch gradient of the
training loss. w0 and F are taken at the first optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from lisa_align.errors import LisaError
from lisa_align.training.penalty import add_pull_gradient, grad_scale
from lisa_align.training.sft import SFTTrainer, TrainArguments, check_nonnegative, model_columns

@dataclass
class EWCArguments(TrainArguments):
    ewc_lambda: float = field(default=0.001, metadata={"help": "strength λ of the Fisher-weighted pull"})
    fisher_batches: int | None = field(default=None, metadata={"help": "alignment batches for the Fisher (None: all)"})

    def __post_init__(self):
        check_nonnegative("ewc_lambda", self.ewc_lambda, "the reference uses 0.001")
        super().__post_init__()


class EWCTrainer(SFTTrainer):
    def __init__(self, *args, fisher_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        if fisher_dataset is None or len(fisher_dataset) == 0:
            raise LisaError("EWCTrainer needs fisher_dataset= (the alignment data the Fisher is measured on)")
        self.fisher_dataset = model_columns(fisher_dataset)
        self.fisher: list[torch.Tensor] | None = None
        self.reference: list[torch.Tensor] | None = None
        self._pull_step = -1

    def compute_fisher(self) -> list[torch.Tensor]:
        """Diagonal empirical Fisher: mean over alignment batches of (∂loss/∂w)²."""
        params, model = self._trainable(), self.model
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        loader = DataLoader(self.fisher_dataset, batch_size=self.args.per_device_train_batch_size,
                            collate_fn=self.data_collator)
        was_training = model.training
        model.eval()  # no dropout in the Fisher
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
        return [(f / max(n, 1)).to(p.dtype) for f, p in zip(fisher, params)]

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
        self.reference = [tensors[f"reference.{i}"].to(p.device, p.dtype) for i, p in enumerate(params)]
        self.fisher = [tensors[f"fisher.{i}"].to(p.device, p.dtype) for i, p in enumerate(params)]

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

    def _apply_pull(self) -> None:
        """grad += 2λ F ⊙ (w − w0): the gradient of λ Σ F (w − w0)²."""
        if self.args.ewc_lambda > 0:
            coef = 2.0 * self.args.ewc_lambda * grad_scale(self.accelerator)
            add_pull_gradient(self._trainable(), self.reference, coef, weights=self.fisher)
