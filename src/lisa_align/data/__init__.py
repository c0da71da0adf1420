"""Data layer: prompt templates, row formats, the source registry, synthetic sources and mixing."""

from lisa_align.data.formats import AGNEWS_LABELS, BEAVERTAILS_CATEGORIES, SST2_LABELS, format_rows
from lisa_align.data.mixing import harmful_count, mix_harmful, remove_overlap
from lisa_align.data.sources import SourceSpec, load_rows
from lisa_align.data.templates import IGNORE_INDEX, format_prompt, tokenize_example, tokenize_rows

__all__ = [
    "AGNEWS_LABELS", "BEAVERTAILS_CATEGORIES", "IGNORE_INDEX", "SST2_LABELS", "SourceSpec", "format_prompt",
    "format_rows", "harmful_count", "load_rows", "mix_harmful", "remove_overlap", "tokenize_example", "tokenize_rows",
]
