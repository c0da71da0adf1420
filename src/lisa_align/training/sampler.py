"""Batch sampler for Bi-State training: every optimizer step draws its micro-batches from one stream.

The training dataset is ``user rows + alignment rows`` concatenated. Each stream is an endless
sequence of row indices, one seeded permutation per pass, so batches are always full and may
straddle passes. Step s in state X takes the next ``world_size · grad_accum`` batches of stream X,
at a position given by how many steps of state X came before s. Everything is a pure function of
the step, so every rank computes the same schedule and resuming at any step is exact. The user
stream keeps its position across alignment steps: no user batch is dropped (the reference code
discards the user batch that an alignment step replaces). With ``lengths`` (``group_by_length``)
each stream's passes are grouped by length, still a pure function of the pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from lisa_align.training.schedule import ALIGNMENT, BiStateSchedule


class _Stream:
    """``lengths`` (one per row) groups each pass by length: a seeded permutation cut into megabatches,
    each sorted by length (the Trainer's ``group_by_length``), so a batch holds rows of similar length."""

    def __init__(self, n: int, offset: int, seed: int, lengths: Sequence[int] | None = None, batch_size: int = 1):
        self.n, self.offset, self.seed = n, offset, seed
        self.lengths, self.batch_size = lengths, batch_size
        self._perms: dict[int, list[int]] = {}

    def _perm(self, q: int) -> list[int]:
        if q not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + q)
            if self.lengths is None:
                self._perms[q] = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perms[q] = [int(i) for i in get_length_grouped_indices(self.lengths, self.batch_size,
                                                                             generator=g)]
        return self._perms[q]

    def take(self, start: int, count: int) -> list[int]:
        return [self.offset + self._perm(pos // self.n)[pos % self.n] for pos in range(start, start + count)]


def steps_per_epoch(n_user: int, batch_size: int, grad_accum: int, world_size: int) -> int:
    """SFT's optimizer steps per epoch, as the Trainer computes them (per-rank batches, ceil)."""
    per_rank_batches = math.ceil(n_user / (batch_size * world_size))
    return max(math.ceil(per_rank_batches / grad_accum), 1)


class BiStateBatchSampler:
    def __init__(self, schedule: BiStateSchedule, *, n_user: int, n_align: int, batch_size: int,
                 grad_accum: int, world_size: int, steps_per_epoch: int, seed: int,
                 lengths: Sequence[int] | None = None):
        self.schedule = schedule
        self.batch_size, self.grad_accum, self.world_size = batch_size, grad_accum, world_size
        self.per_step = grad_accum * world_size
        self.spe = steps_per_epoch
        self.epoch = 0
        user_len, align_len = (None, None) if lengths is None else (lengths[:n_user], lengths[n_user:])
        self.streams = {"finetune": _Stream(n_user, 0, seed, user_len, batch_size),
                        ALIGNMENT: _Stream(n_align, n_user, seed + 1, align_len, batch_size)}
        if n_align == 0 and schedule.k1 > 0:
            raise ValueError("the alignment dataset is empty but K1 > 0")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.spe * self.per_step

    def batches_for_step(self, step: int) -> list[list[int]]:
        state = self.schedule.state(step)
        first = self.schedule.count_before(state, step) * self.per_step
        stream = self.streams[state]
        return [stream.take((first + j) * self.batch_size, self.batch_size) for j in range(self.per_step)]

    def __iter__(self):
        start = self.epoch * self.spe
        for step in range(start, min(start + self.spe, self.schedule.total_steps)):
            yield from self.batches_for_step(step)
