"""Lisa in TRL: Lisa / BSO on ``trl.SFTTrainer`` (optional extra: ``pip install lisa-align[trl]``).

Two lines on an existing SFTTrainer set-up::

    class LisaSFT(LisaMixin, SFTTrainer): ...                           # or use LisaSFTTrainer
    args = LisaSFTConfig(output_dir="out", k1=100, k2=900, rho=1.0)      # SFTConfig + Lisa's settings
    LisaSFT(model=model, args=args, train_dataset=user_rows, alignment_dataset=safety_rows,
            processing_class=tokenizer).train()

The alignment rows go through SFTTrainer's own dataset preparation (``_prepare_dataset``: the chat
template for ``messages`` rows, assistant-only / completion-only labels, truncation, packing), as the
user rows do. The schedule, the sampler, the anchor, the proximal term, the checkpointed state and
exact resume are :class:`~lisa_align.training.lisa.LisaMixin`'s, the same code as ``LisaTrainer``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from lisa_align.errors import LisaError
from lisa_align.training.lisa import LisaArgumentsMixin, LisaMixin, prepare_like_train_dataset

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise LisaError("lisa_align.training.trl needs TRL: pip install 'lisa-align[trl]'") from e

__all__ = ["LisaArgumentsMixin", "LisaMixin", "LisaSFTConfig", "LisaSFTTrainer", "prepare_like_train_dataset"]


@dataclass
class LisaSFTConfig(LisaArgumentsMixin, SFTConfig):
    """TRL's ``SFTConfig`` plus Lisa's settings (k1, k2, rho, proximal_warmup_ratio, cycle_epochs,
    alignment_rows, proximal_mode; see :class:`~lisa_align.training.lisa.LisaArgumentsMixin`)."""


class LisaSFTTrainer(LisaMixin, SFTTrainer):
    """``trl.SFTTrainer`` with Lisa / BSO: pass ``args=LisaSFTConfig(...)`` and ``alignment_dataset=``."""
