"""Data layer: prompt templates, row formats, the source registry, synthetic sources, mixing and the HS
prompt protocols."""

from lisa_align.data.formats import AGNEWS_LABELS, BEAVERTAILS_CATEGORIES, SST2_LABELS, format_rows
from lisa_align.data.hs_protocols import HS_PRESETS, hs_prompt_spec
from lisa_align.data.mixing import dedup_prompts, harmful_count, mix_harmful, remove_overlap
from lisa_align.data.sources import SourceSpec, load_rows
from lisa_align.data.templates import IGNORE_INDEX, format_prompt, tokenize_example, tokenize_rows

__all__ = [
    "AGNEWS_LABELS", "BEAVERTAILS_CATEGORIES", "HS_PRESETS", "IGNORE_INDEX", "SST2_LABELS", "SourceSpec",
    "dedup_prompts", "format_prompt", "format_rows", "harmful_count", "hs_prompt_spec", "load_rows", "mix_harmful",
    "remove_overlap", "tokenize_example", "tokenize_rows",
]
