"""Vlguard: SFT on the user set with ``alignment_rows`` alignment (guide) rows mixed in (the reference's
1000). ``mode: replace`` (Lisa's reference, git-disl/Lisa): the guide rows take the place of benign user
rows, so the set stays n rows: the round(p·n) harmful rows, the first int((1-p)·n - guide) benign rows
(n - round(p·n) - guide: the same number whenever p·n is an integer) and the guide rows; with more guide
rows than benign ones no benign row is kept (the reference's loop does the same), so the set is harmful +
guide rows.
``mode: append`` (the Vaccine repo, git-disl/Vaccine): the n user rows plus the guide rows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import Field

from lisa_align.defenses.base import Defense, check_rows


class Vlguard(Defense):
    name: Literal["vlguard"] = "vlguard"
    alignment_rows: int = Field(1000, gt=0, description="alignment rows mixed into the user set")
    mode: Literal["replace", "append"] = Field(
        "replace", description="replace: the alignment rows take the place of benign user rows, n rows in all "
        "(Lisa's reference); append: added to the n user rows (the Vaccine repo)")

    needs = ("alignment",)

    def training_rows(self, rows: list[dict], data: Mapping[str, list[dict]]) -> list[dict]:
        alignment = data["alignment"]
        check_rows(self, "alignment", alignment, self.alignment_rows, "alignment_rows")
        guide = [dict(r, harmful=False) for r in alignment[: self.alignment_rows]]
        if self.mode == "append":
            return rows + guide
        benign = sum(not r.get("harmful") for r in rows)
        # as the reference counts them (the first int((1-p)·n - guide) benign rows); with more guide rows than
        # benign ones it keeps none, as the reference's loop does, and trains on harmful + guide rows
        keep = max(benign - self.alignment_rows, 0)
        kept = []
        for r in rows:
            if r.get("harmful") or keep > 0:
                kept.append(r)
                keep -= not r.get("harmful")
        return kept + guide

    def describe(self) -> str:
        how = "in place of benign rows" if self.mode == "replace" else "added"
        return f", {self.alignment_rows} alignment rows {how}"
