"""Forward hooks on submodules: read (and replace) their outputs during a forward pass.

A module's output may be a tensor or a tuple whose first item is the hidden states (decoder
attention and MLP blocks); :func:`first` and :func:`replace_first` handle both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


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
