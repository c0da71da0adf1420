"""Trainer state restored from a checkpoint (Lisa's anchor, EWC's w0 and Fisher), shard by shard.

``BaseTrainer._save_checkpoint`` writes each tensor's local shard (a DTensor's, under FSDP2; one
file per rank), so a restored copy is built like its parameter (a DTensor stays one, with the same
sharding) and the saved tensor goes into its local shard.
"""

from __future__ import annotations

import torch

from lisa_align.errors import LisaError
from lisa_align.training.callbacks import local_shard


def restore_like(params: list[torch.Tensor], tensors: dict[str, torch.Tensor], prefix: str,
                 where: object = "the checkpoint") -> list[torch.Tensor]:
    """Copies of ``params`` (detached; each a DTensor where its parameter is one) whose local shards
    hold the saved ``<prefix>.0``, ``<prefix>.1``, ...: a missing tensor or a shard of another shape (a
    checkpoint of another model, or written by another number of processes) is a one-line LisaError."""
    out = [p.detach().clone() for p in params]
    with torch.no_grad():
        for i, copy in enumerate(out):
            local, saved = local_shard(copy), tensors.get(f"{prefix}.{i}")
            if saved is None or saved.shape != local.shape:
                got = "none" if saved is None else f"shape {tuple(saved.shape)}"
                raise LisaError(f"{where} holds {got} for {prefix}.{i}, this run's shard has shape "
                                f"{tuple(local.shape)}: resume with the same model, LoRA and number of processes, "
                                "or start in a new output folder")
            local.copy_(saved.to(local.device, local.dtype))
    return out
