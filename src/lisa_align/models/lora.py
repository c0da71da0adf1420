"""LoRA: attach (the settings of ``config.LoraSettings``), load a saved adapter, merge into the base weights."""

from __future__ import annotations

import os

from lisa_align.config import LoraSettings
from lisa_align.errors import LisaError
from lisa_align.models.loading import check_safe_weights


def linear_module_names(model) -> list[str]:
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def attach_lora(model, settings: LoraSettings):
    from peft import LoraConfig, get_peft_model

    have = linear_module_names(model)
    missing = [t for t in settings.target_modules if t not in have]
    if missing:
        raise LisaError(f"LoRA target modules {missing} are not in the model; "
                        f"its linear modules are: {', '.join(have)}")
    cfg = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _hub_has_safetensors_adapter(repo: str) -> bool | None:
    """Whether the HF repo has ``adapter_model.safetensors`` (None: cannot tell; peft reports why)."""
    import huggingface_hub

    try:
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            return isinstance(huggingface_hub.try_to_load_from_cache(repo, "adapter_model.safetensors"), str)
        return bool(huggingface_hub.file_exists(repo, "adapter_model.safetensors"))
    except Exception:  # not found, gated, no network: peft's own error says which
        return None


def load_adapter(model, path: str, *, is_trainable: bool = False, allow_pickle: bool = False):
    """A saved LoRA adapter (local folder or HF id) on ``model``, from ``adapter_model.safetensors``
    only: ``adapter_model.bin`` (pickle) is refused unless ``allow_pickle``."""
    from peft import PeftModel


    path = str(path)
    check_safe_weights(path, allow_pickle=allow_pickle)
    local = os.path.exists(os.path.expanduser(path)) or path.startswith(("/", "./", "../", "~"))
    if not allow_pickle and not local and _hub_has_safetensors_adapter(path) is False:
        raise LisaError(f"adapter '{path}' has no adapter_model.safetensors: its pickle weights (adapter_model.bin) "
                        "can run code when loaded; use a copy with safetensors, or pass --allow-pickle "
                        "(model.allow_pickle: true) if you trust the files")
    try:
        return PeftModel.from_pretrained(model, path, is_trainable=is_trainable)
    except (OSError, ValueError) as e:
        raise LisaError(f"adapter '{path}' could not be loaded ({str(e).splitlines()[0][:160]}); "
                        "pass a folder written by save_pretrained with adapter_config.json") from None


def merge(model):
    """Fold a LoRA adapter into the base weights and return the plain model."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
