"""Vlguard: SFT on the n user rows (with their round(p·n) harmful ones) plus ``alignment_rows``
alignment rows mixed in (the reference's 1000)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field

from lisa_align.defenses.base import Defense, check_rows


class Vlguard(Defense):
    name: Literal["vlguard"] = "vlguard"
    alignment_rows: int = Field(1000, gt=0, description="alignment rows mixed into the user set")

    needs = ("alignment",)

    def training_rows(self, rows: list[dict], data: Mapping[str, list[dict]]) -> list[dict]:
        alignment = data["alignment"]
        check_rows(self, "alignment", alignment, self.alignment_rows, "alignment_rows")
        return rows + [dict(r, harmful=False) for r in alignment[: self.alignment_rows]]
