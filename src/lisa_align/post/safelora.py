"""SafeLoRA's transform: project the LoRA updates least similar to their projection onto the
alignment matrix (settings: :class:`lisa_align.defenses.safelora.SafeLoRA`).

As IBM/SafeLoRA (``model.py``: ``get_aligned_matrix`` builds C = V·Vᵀ / ‖V‖_F per target module, V =
W_aligned − W_base; ``projected_weighted`` compares C·B·A with B·A by the cosine of the flattened
matrices, rounded to 5 decimals, and sets B ← C·B where it is ≤ the threshold; the ``number`` mode
takes the num_proj_layers-th smallest cosine as the threshold). Modules are matched by name here
(the reference pairs them by parameter order, the same pairing when both models list the same
modules).
"""

from __future__ import annotations

import numpy
import torch

from lisa_align.errors import LisaError
from lisa_align.post import PostContext, active_adapter, lora_layers


def alignment_matrix(aligned: torch.Tensor, base: torch.Tensor, name: str = "") -> torch.Tensor:
    """C = V·Vᵀ / ‖V‖_F with V = aligned − base (float32)."""
    if aligned.shape != base.shape:
        raise LisaError(f"safelora: {name} has shape {tuple(aligned.shape)} in the aligned model and "
                        f"{tuple(base.shape)} in the base model; they must be the same architecture")
    v = aligned.float() - base.float()
    norm = torch.linalg.norm(v)
    if not norm > 0:
        raise LisaError(f"safelora: {name} is the same in the aligned and the base model (V = 0), so there is no "
                        "alignment direction to project onto; align that module, or give aligned_model/base_model")
    return v @ v.T / norm


def cosine(c: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """cos(C·B·A, B·A) of the flattened matrices, rounded to 5 decimals (the reference's)."""
    ba = b.float() @ a.float()
    cba = c.float() @ ba
    cos = torch.nn.functional.cosine_similarity(cba.reshape(1, -1), ba.reshape(1, -1)).item()
    return float(numpy.round(cos, 5))


def select_layers(cosines: dict[str, float], select: str, threshold: float,
                  num_proj_layers: int) -> tuple[list[str], float]:
    """(the layers projected, the threshold used): cosine ≤ threshold; ``number``: the threshold is the
    num_proj_layers-th smallest cosine (every layer up to it, ties included)."""
    if select == "number" and cosines:
        threshold = sorted(cosines.values())[:num_proj_layers][-1]
    return [name for name, cos in cosines.items() if cos <= threshold], threshold


def project(model, weights_aligned: dict[str, torch.Tensor], weights_base: dict[str, torch.Tensor], *,
            select: str = "threshold", threshold: float = 0.5, num_proj_layers: int = 10) -> dict:
    """SafeLoRA on the peft ``model`` in place; the record (cosines, projected layers, threshold)."""
    layers = lora_layers(model)
    if not layers:
        raise LisaError("safelora: the fine-tuned model holds no LoRA adapter (a full fine-tune): SafeLoRA projects "
                        "LoRA updates; set finetune.lora")
    mats, cosines = {}, {}
    for name, layer in layers.items():
        key = f"{name}.weight"
        if key not in weights_aligned or key not in weights_base:
            raise LisaError(f"safelora: {key} is not in the aligned or the base model")
        adapter = active_adapter(layer)
        c = alignment_matrix(weights_aligned[key], weights_base[key], key)
        b, a = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
        c = c.to(b.device)
        cosines[name] = cosine(c, b.detach(), a.detach())
        mats[name] = c
    chosen, used = select_layers(cosines, select, threshold, num_proj_layers)
    with torch.no_grad():
        for name in chosen:
            layer = layers[name]
            b = layer.lora_B[active_adapter(layer)].weight
            b.copy_((mats[name] @ b.float()).to(b.dtype))
    return {"select": select, "threshold": used, "layers": len(layers), "projected": chosen, "cosines": cosines}


def apply(defense, model, tokenizer, ctx: PostContext) -> dict:
    aligned = defense.aligned_model or ctx.aligned()
    base = defense.base_model or ctx.base()
    if aligned == base:
        raise LisaError(f"safelora: the aligned and the base model are the same ({aligned}); align first "
                        "(align.enabled: true) or give aligned_model and base_model")
    record = project(model, ctx.load_weights(aligned), ctx.load_weights(base), select=defense.select,
                     threshold=defense.threshold, num_proj_layers=defense.num_proj_layers)
    return {"defense": defense.name, "aligned_model": aligned, "base_model": base, **record}
