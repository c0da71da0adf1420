"""SFT: plain fine-tuning on the stage's rows (the user set; at the align stage, the alignment set)."""

from __future__ import annotations

from typing import Literal

from lisa_align.defenses.base import Defense


class SFT(Defense):
    name: Literal["sft"] = "sft"

    stages = ("align", "finetune")
