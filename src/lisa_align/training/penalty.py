"""Quadratic pulls toward reference weights, applied as gradients (no autograd graph).

``add_pull_gradient`` adds coef · F ⊙ (w − ref) to ``.grad`` of each parameter: the gradient of
coef/2 · Σ F (w − ref)². Lisa's proximal term uses F = 1, coef = ρ; EWC uses the diagonal Fisher F
and coef = 2λ. w − ref is formed first (one rounding, as autograd of the term would give: the
two-pass form grad + coef·w − coef·ref cancels small gradients in low precision), in chunks of at
most ``CHUNK`` elements so the transient memory stays bounded.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 26


def chunks(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive index groups whose sizes sum to at most ``limit`` (a larger single item stands alone)."""
    out, cur, n = [], [], 0
    for i, size in enumerate(sizes):
        if cur and n + size > limit:
            out.append(cur)
            cur, n = [], 0
        cur.append(i)
        n += size
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def add_pull_gradient(params: list[torch.nn.Parameter], ref: list[torch.Tensor], coef: float,
                      weights: list[torch.Tensor] | None = None, limit: int | None = None) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for idx in chunks([p.numel() for p in params], CHUNK if limit is None else limit):
        diff = torch._foreach_sub([params[i].detach() for i in idx], [ref[i] for i in idx])
        if weights is not None:
            torch._foreach_mul_(diff, [weights[i] for i in idx])
        torch._foreach_add_([params[i].grad for i in idx], diff, alpha=coef)
        del diff


def grad_scale(accelerator) -> float:
    """The loss scale of fp16 mixed precision (gradients are scaled by it until unscaled), else 1."""
    scaler = getattr(accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
