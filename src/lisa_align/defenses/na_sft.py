"""NA-SFT: SFT of the unaligned base (no alignment stage before it)."""

from __future__ import annotations

from typing import Literal

from lisa_align.defenses.base import Defense


class NASFT(Defense):
    name: Literal["na_sft"] = "na_sft"

    starts_from = "base"

    def describe(self) -> str:
        return " from the unaligned base"
