"""lisa-align: fine-tune LLMs without losing their safety alignment (Lisa, Huang et al. 2024)."""

__version__ = "0.1.0"

from lisa_align.errors import LisaError

__all__ = ["LisaError", "__version__"]
