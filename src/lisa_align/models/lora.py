"""LoRA: attach (design.md settings), load a saved adapter, merge into the base weights."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from lisa_align.errors import LisaError


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0)
    alpha: float = Field(4, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


ALIGN_LORA = LoraSettings(r=16, alpha=4, dropout=0.1,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"])
FINETUNE_LORA = LoraSettings(r=8, alpha=4, dropout=0.1, target_modules=["q_proj", "v_proj"])


def linear_module_names(model) -> list[str]:
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def attach_lora(model, settings: LoraSettings):
    from peft import LoraConfig, get_peft_model

    have = linear_module_names(model)
    missing = [t for t in settings.target_modules if t not in have]
    if missing:
        raise LisaError(f"LoRA target modules {missing} are not in the model; its linear modules are: {', '.join(have)}")
    cfg = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def load_adapter(model, path: str, *, is_trainable: bool = False):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, path, is_trainable=is_trainable)
    except (OSError, ValueError) as e:
        raise LisaError(f"adapter '{path}' could not be loaded ({str(e).splitlines()[0][:160]}); "
                        "pass a folder written by save_pretrained with adapter_config.json") from None


def merge(model):
    """Fold a LoRA adapter into the base weights and return the plain model."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
