"""The post-fine-tuning stage's transforms (torch code), one module per post defense.

A post defense (``stages = ("post",)``, e.g. :class:`~lisa_align.defenses.antidote.Antidote`) names
its transform in ``post_transform``: ``function(defense, model, tokenizer, context)`` changes the
fine-tuned model's weights in place and returns a JSON-able record. The pipeline loads the model
(its start model with the user adapter unmerged, or the full fine-tune), calls the transform, and
writes the result atomically to ``post/<method>+<post>/`` (:mod:`lisa_align.rundir`). This module
imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PostContext:
    """What a transform may use beside the model: the run's data by role, the prompt format, the
    device, and the base and aligned models (paths, resolved only when asked for, and a loader that
    returns a model's weights by parameter name)."""

    data: Mapping[str, list[dict]] = field(default_factory=dict)
    prompt_format: Any = None  # lisa_align.data.templates.PromptFormat (None: Alpaca)
    max_length: int = 2048
    device: str = "cpu"
    base: Callable[[], str] | None = None
    aligned: Callable[[], str] | None = None
    load_weights: Callable[[str], dict[str, Any]] | None = None


def lora_layers(model) -> dict[str, Any]:
    """name → peft LoRA layer (a module with ``lora_A``/``lora_B`` holding the active adapter) of
    ``model``, in module order; the name is the wrapped linear's path in the plain model
    (``model.layers.0.self_attn.q_proj``)."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "active_adapters"):
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                out[name.removeprefix("base_model.model.")] = module
    return out


def active_adapter(layer) -> str:
    return next(a for a in layer.active_adapters if a in layer.lora_A)
