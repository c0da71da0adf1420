"""The Bi-State schedule of Lisa (README, "Exact semantics"): which state each optimizer step is in.

Steps are 0-based optimizer-step indices (``trainer.state.global_step`` before the update).
Training starts in the alignment state and alternates K1 alignment steps with K2 fine-tuning
steps. The total budget T is SFT's. The final partial cycle of r = T mod (K1+K2) steps is split in
the same ratio, round(r·K1/(K1+K2)) alignment steps (capped at r − 1) then the rest fine-tuning, so every run
with K2 > 0 ends on a fine-tuning phase (a run that ends on an alignment phase flatters HS). A
run shorter than one cycle (T < K1+K2, T ≥ 2, K1 > 0) still starts with at least one alignment
step.
"""

from __future__ import annotations

import math
from functools import cached_property

from lisa_align.defenses.lisa import validate_lisa_settings
from lisa_align.errors import LisaError

ALIGNMENT = "alignment"
FINETUNE = "finetune"


class BiStateSchedule:
    def __init__(self, k1: int, k2: int, total_steps: int):
        validate_lisa_settings(k1, k2, 0.0)
        if total_steps <= 0:
            raise LisaError(f"the run has {total_steps} optimizer steps: give it data and at least one epoch")
        self.k1, self.k2, self.total_steps = k1, k2, total_steps
        cycle = k1 + k2
        self._full_end = (total_steps // cycle) * cycle
        tail = total_steps - self._full_end
        if k2 == 0:
            self._tail_align = tail
        else:
            self._tail_align = min(int(math.floor(tail * k1 / cycle + 0.5)), max(tail - 1, 0))
            if self._full_end == 0 and k1 > 0 and tail >= 2:
                self._tail_align = max(self._tail_align, 1)  # a run shorter than one cycle still starts aligned

    def state(self, step: int) -> str:
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside [0, {self.total_steps})")
        if step >= self._full_end:
            return ALIGNMENT if step - self._full_end < self._tail_align else FINETUNE
        return ALIGNMENT if step % (self.k1 + self.k2) < self.k1 else FINETUNE

    @cached_property
    def states(self) -> list[str]:
        return [self.state(s) for s in range(self.total_steps)]

    @cached_property
    def _alignment_before(self) -> list[int]:
        out, n = [0], 0
        for s in self.states:
            n += s == ALIGNMENT
            out.append(n)
        return out

    def count_before(self, state: str, step: int) -> int:
        """How many of the steps 0..step-1 are in ``state``."""
        a = self._alignment_before[step]
        return a if state == ALIGNMENT else step - a

    def is_switch(self, step: int) -> bool:
        return step > 0 and self.state(step) != self.state(step - 1)

    def switch_steps(self) -> list[int]:
        return [s for s in range(1, self.total_steps) if self.states[s] != self.states[s - 1]]

    def last_switch(self, step: int) -> int:
        """The most recent switch at or before ``step`` (0 if none): where the anchor was taken."""
        while step > 0 and self.states[step] == self.states[step - 1]:
            step -= 1
        return step

    def proximal_active(self, step: int, ratio: float) -> bool:
        """The reference threshold: the term is on once step > ratio · T."""
        return step > ratio * self.total_steps
