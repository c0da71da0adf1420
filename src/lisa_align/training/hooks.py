"""Forward hooks on submodules: read (and replace) their outputs during a forward pass.

A module's output may be a tensor or a tuple whose first item is the hidden states (decoder
attention and MLP blocks); :func:`first` and :func:`replace_first` handle both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from lisa_align.errors import LisaError


def decoder_blocks(model, attr: str, needed_by: str) -> list[torch.nn.Module]:
    """Each decoder layer's ``attr`` submodule (``self_attn``, ``mlp``), found by structure, not class name:
    the first ``nn.ModuleList`` whose blocks all have one (Llama, Mistral, Qwen, Gemma, OPT, ...)."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and all(hasattr(b, attr) for b in module):
            return [getattr(b, attr) for b in module]
    raise LisaError(f"{type(model).__name__}: no decoder layers with a '{attr}' module found; {needed_by} needs a "
                    "decoder-only transformer (Llama, Mistral, Qwen, Gemma, OPT)")


def first(output):
    """The hidden states of a module's output (its first item when it is a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def replace_first(output, value):
    """``output`` with its hidden states replaced by ``value``."""
    return (value, *output[1:]) if isinstance(output, tuple) else value


@contextlib.contextmanager
def capture_outputs(modules: Sequence[torch.nn.Module]) -> Iterator[list[torch.Tensor]]:
    """A list that holds, after a forward pass inside the block, each module's output hidden states
    (None for a module the pass did not reach); the hooks are removed on leaving the block."""
    outputs: list[torch.Tensor] = [None] * len(modules)  # type: ignore[list-item]

    def capture(i):
        def hook(_m, _inp, out):
            outputs[i] = first(out)
        return hook

    handles = [m.register_forward_hook(capture(i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()
