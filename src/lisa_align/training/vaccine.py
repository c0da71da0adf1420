"""Vaccine and RandomVaccine (alignment stage): perturbation-aware training on the attention outputs.

Vaccine, per micro-batch:
1. a first forward/backward records the gradient of the loss with respect to the output of each
   decoder layer's self-attention (``torch.autograd.grad``, so parameter gradients are untouched);
2. those gradients, scaled together to total norm ρ, are added to the same outputs in a second
   forward pass, whose gradient is the one applied;
3. the perturbation hooks are removed after the step.

RandomVaccine adds Gaussian noise of variance ρ to the same outputs instead (one pass).

The decoder layers are found by structure, not by class name: the first ``nn.ModuleList`` whose
blocks have a ``self_attn`` submodule (Llama, Mistral, Qwen2/3, Gemma, OPT, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lisa_align.training.base import BaseArguments, BaseTrainer, check_nonnegative
from lisa_align.training.hooks import capture_outputs, decoder_blocks, first, replace_first


def attention_modules(model) -> list[torch.nn.Module]:
    """Each decoder layer's self-attention module."""
    return decoder_blocks(model, "self_attn", "Vaccine")


@dataclass
class VaccineArguments(BaseArguments):
    vaccine_rho: float = field(default=2.0, metadata={"help": "perturbation norm (Vaccine) or variance (random)"})
    vaccine_random: bool = field(default=False, metadata={"help": "RandomVaccine: Gaussian perturbation"})

    def __post_init__(self):
        check_nonnegative("vaccine_rho", self.vaccine_rho, "the perturbation norm; 0 disables it")
        super().__post_init__()


class VaccineTrainer(BaseTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_perturbation: list[torch.Tensor] | None = None

    def _perturbations(self, model, inputs, modules) -> list[torch.Tensor]:
        """The gradients at the modules' outputs, scaled together to total norm ρ."""
        grads = self.output_gradients(model, inputs, modules)
        total = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
        return [g * (self.args.vaccine_rho / (total + 1e-12)).to(g.dtype) for g in grads]

    def output_gradients(self, model, inputs, modules) -> list[torch.Tensor]:
        """The gradient of the loss on ``inputs`` with respect to each module's output (a zero where the
        output does not reach the loss); parameter gradients are untouched (``torch.autograd.grad``)."""
        with capture_outputs(modules) as outputs, self.compute_loss_context_manager():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        return [torch.zeros_like(o) if g is None else g.detach() for g, o in zip(grads, outputs)]

    def random_perturbation(self, x: torch.Tensor) -> torch.Tensor:
        """RandomVaccine's perturbation: Gaussian noise of variance ρ."""
        return torch.randn_like(x) * math.sqrt(self.args.vaccine_rho)

    def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
        modules = attention_modules(self.model)
        if self.args.vaccine_random:
            def add(i):
                def hook(_m, _inp, out):
                    x = first(out)
                    return replace_first(out, x + self.random_perturbation(x))
                return hook
            self.last_perturbation = None
        else:
            eps = self._perturbations(model, inputs, modules)
            self.last_perturbation = eps

            def add(i):
                def hook(_m, _inp, out):
                    return replace_first(out, first(out) + eps[i])
                return hook
        handles = [m.register_forward_hook(add(i)) for i, m in enumerate(modules)]
        try:
            return super().training_step(model, inputs, num_items_in_batch, **kwargs)
        finally:
            for h in handles:
                h.remove()
