"""Models: load HF causal LMs, LoRA attach / load / merge, and the tiny offline base's parts."""

from lisa_align.config import ALIGN_LORA, FINETUNE_LORA, LoraSettings
from lisa_align.models.loading import ensure_pad_token, load_causal_lm, load_model_and_tokenizer, load_tokenizer
from lisa_align.models.lora import attach_lora, load_adapter, merge

__all__ = ["ALIGN_LORA", "FINETUNE_LORA", "LoraSettings", "attach_lora", "ensure_pad_token", "load_adapter",
           "load_causal_lm", "load_model_and_tokenizer", "load_tokenizer", "merge"]
