"""The harmful-score (HS) prompt protocols of the Lisa paper and its peers (``eval.hs_protocol``).

Each protocol names which rows of the evaluation's harmful source (``eval.harmful``, by default
BeaverTails ``30k_test``) are the HS prompts:

- ``lisa``: the first 1000 rows, unfiltered, rows with safe responses included (git-disl/Lisa);
- ``booster``: the first 1000 rows with ``is_safe`` false (Booster, Antidote, Panacea, Virus);
- ``vaccine``: the first 500 rows with ``is_safe`` false (Vaccine, T-Vaccine);
- ``custom``: ``eval.harmful`` exactly as written.

A protocol sets the spec's ``filter``, ``n`` and ``sample``; the source, split, format and skip come
from ``eval.harmful``. A value written in ``eval.harmful`` must agree with the protocol, except a
smaller ``n``: the protocol's first n prompts (a quick run). Anything else is refused.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from lisa_align.data.sources import SourceSpec

HSProtocol = Literal["lisa", "booster", "vaccine", "custom"]


class _Preset(NamedTuple):
    filter: Literal["safe", "unsafe"] | None
    n: int
    sample: Literal["first", "random"]


HS_PRESETS: dict[str, _Preset] = {
    "lisa": _Preset(None, 1000, "first"),
    "booster": _Preset("unsafe", 1000, "first"),
    "vaccine": _Preset("unsafe", 500, "first"),
}


def hs_prompt_spec(protocol: str, spec: SourceSpec, written: set[str] | frozenset[str] = frozenset()) -> SourceSpec:
    """``spec`` (``eval.harmful``) under ``protocol``; ``written``: the spec's fields the config wrote.
    Raises ValueError (one line) when a written value disagrees with the protocol."""
    if protocol == "custom":
        return spec
    if protocol not in HS_PRESETS:
        raise ValueError(f"unknown hs_protocol '{protocol}': use one of {', '.join([*HS_PRESETS, 'custom'])}")
    preset = HS_PRESETS[protocol]
    what = (f"hs_protocol '{protocol}' takes the first {preset.n} rows"
            f"{' with is_safe false' if preset.filter == 'unsafe' else ', unfiltered'}")
    fix = "remove it from eval.harmful, or set hs_protocol: custom to use eval.harmful as written"
    for key in ("filter", "sample"):
        if key in written and getattr(spec, key) != getattr(preset, key):
            raise ValueError(f"harmful.{key}={getattr(spec, key)} but {what}; {fix}")
    n = preset.n
    if "n" in written and spec.n != preset.n:
        if spec.n is None or spec.n > preset.n:
            raise ValueError(f"harmful.n={spec.n} but {what}; set n to {preset.n} or less (the protocol's "
                             f"first n prompts), {fix}")
        n = spec.n
    values = {**dict(spec), "filter": preset.filter, "n": n, "sample": preset.sample}
    # the fields the protocol fills count as unwritten: another protocol decides them again
    unwritten = {"filter", "n", "sample"} - set(written)
    return SourceSpec.model_construct(_fields_set=set(spec.model_fields_set) - unwritten, **values)
