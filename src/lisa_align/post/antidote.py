"""Antidote's transform: Wanda scores on harmful calibration rows, then the top ``dense_ratio`` of
each output row zeroed (settings: :class:`lisa_align.defenses.antidote.Antidote`).

As git-disl/Antidote (``utils.py``: ``find_layers``, ``WrappedGPT.add_batch``, ``prune_wanda_outlier``;
``train.py`` applies ``param *= 1 - mask``): the scored layers are the LoRA factors themselves,
``lora_A`` (input: the layer's input) and ``lora_B`` (input: A·x), or in a full fine-tune the
``full_modules`` projections; the activation norm runs over every token of the calibration rows
(prompt, answer and EOS; the reference feeds one row at a time, so padding, which is left out here,
never counts), with the model in eval mode (no dropout) and all masks computed before any weight is
changed. Per output row the weights are sorted by score (stable, ascending); the first
``int(cols · (1 − dense_ratio))`` are kept and the rest are set to zero.
"""

from __future__ import annotations

import torch

from lisa_align.data.templates import tokenize_example
from lisa_align.errors import LisaError
from lisa_align.post import PostContext, active_adapter, lora_layers


def wanda_mask(weight: torch.Tensor, act_sq: torch.Tensor, dense_ratio: float) -> torch.Tensor:
    """True where a weight is pruned: in each row of ``weight`` (out × in), the entries outside the
    ``int(in · (1 − dense_ratio))`` lowest scores |W_ij| · sqrt(act_sq_j), ``act_sq`` the sum over
    the calibration tokens of the squared input of column j."""
    metric = weight.detach().abs().float() * act_sq.float().sqrt().reshape(1, -1)
    keep = int(metric.shape[1] * (1 - dense_ratio))
    order = torch.sort(metric, dim=-1, stable=True).indices
    mask = torch.zeros(metric.shape, dtype=torch.bool, device=metric.device)
    mask.scatter_(1, order[:, keep:], True)
    return mask


def target_layers(model, full_modules: list[str]) -> tuple[str, dict[str, torch.nn.Linear]]:
    """("lora" or "full", name → linear layer scored): the LoRA factors of the active adapter, or
    (no LoRA) the linear layers named in ``full_modules``."""
    layers = lora_layers(model)
    if layers:
        out = {}
        for name, layer in layers.items():
            adapter = active_adapter(layer)
            out[f"{name}.lora_A"] = layer.lora_A[adapter]
            out[f"{name}.lora_B"] = layer.lora_B[adapter]
        return "lora", out
    return "full", {name: m for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in full_modules}


def activation_norms(model, tokenizer, rows: list[dict], layers: dict[str, torch.nn.Module], ctx: PostContext,
                     batch_size: int) -> tuple[dict[str, torch.Tensor], int]:
    """(name → Σ over the calibration tokens of x_j², the number of tokens) for each layer's input x."""
    sums = {name: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device)
            for name, m in layers.items()}
    tokens: dict[str, torch.Tensor] = {}

    def hook(name):
        def add(_module, inputs):
            x = inputs[0]
            x = x[tokens["mask"]] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
            sums[name] += (x.detach().float() ** 2).sum(dim=0)
        return add

    encoded = [tokenize_example(r, tokenizer, ctx.max_length, ctx.prompt_format)["input_ids"] for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    count = 0
    try:
        with torch.no_grad():
            for i in range(0, len(encoded), batch_size):
                batch = encoded[i: i + batch_size]
                width = max(len(ids) for ids in batch)
                ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch], device=device)
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch], device=device)
                tokens["mask"] = mask.bool()
                count += int(mask.sum())
                model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums, count


def prune(layers: dict[str, torch.nn.Linear], sums: dict[str, torch.Tensor], dense_ratio: float) -> dict[str, int]:
    """Zero the masked weights of every layer (all masks first, then the changes); name → weights zeroed."""
    masks = {name: wanda_mask(m.weight, sums[name], dense_ratio) for name, m in layers.items()}
    with torch.no_grad():
        for name, m in layers.items():
            m.weight[masks[name].to(m.weight.device)] = 0
    return {name: int(mask.sum()) for name, mask in masks.items()}


def apply(defense, model, tokenizer, ctx: PostContext) -> dict:
    """Antidote on ``model`` in place; the record of ``post.json``."""
    rows = defense.calibration(ctx.data)
    mode, layers = target_layers(model, defense.full_modules)
    if not layers:
        raise LisaError(f"antidote: the fine-tuned model has no LoRA layers and no linear layer named "
                        f"{', '.join(defense.full_modules)} (full_modules); set full_modules")
    sums, count = activation_norms(model, tokenizer, rows, layers, ctx, defense.batch_size)
    pruned = prune(layers, sums, defense.dense_ratio)
    return {"defense": defense.name, "mode": mode, "dense_ratio": defense.dense_ratio,
            "calibration_rows": len(rows), "calibration_tokens": count, "layers": len(layers),
            "weights": sum(m.weight.numel() for m in layers.values()), "pruned": sum(pruned.values()),
            "pruned_per_layer": pruned}
