"""Quadratic pulls toward reference weights, applied as gradients (no autograd graph).

``add_pull_gradient`` adds coef · F ⊙ (w − ref) to ``.grad`` of each parameter: the gradient of
coef/2 · Σ F (w − ref)². Lisa's proximal term uses F = 1, coef = ρ; EWC uses the diagonal Fisher F
and coef = 2λ. w − ref is formed first (one rounding, as autograd of the term would give: the
two-pass form grad + coef·w − coef·ref cancels small gradients in low precision), with fused
``torch._foreach_*`` ops on groups of whole tensors of at most ``CHUNK`` elements in all, so the
transient memory stays bounded.

One path on every device. A CPU path that formed w − ref in cache-sized blocks of a reused workspace
was measured against it (benchmarks/penalty_paths.py, 1 thread, float32, interleaved medians): on
the defaults it was slower, 2.5x on the paper's LoRA (r=8, q,v) of a ~100M Llama and 1.3x on the
demo's full fine-tuning, where the whole pull is ~1% of a step. Only full fine-tuning of a large
model on CPU favoured it (~100M: 0.86-1.02x the time of the gradient pass, 0.8x of the distance, and a
4 MiB transient instead of up to CHUNK elements).
"""

from __future__ import annotations

import torch

CHUNK = 1 << 26
# pull_distance takes float32 norms of at most this many elements (views, no copy): a float32 norm of a
# long CPU tensor accumulates its rounding (~1e-3 relative at 25M elements, ~1e-5 at 1M).
NORM_BLOCK = 1 << 20


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
    """grad += coef · F ⊙ (w − ref) for each parameter (F = ``weights``, else 1); a missing grad starts at 0."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for idx in chunks([p.numel() for p in params], CHUNK if limit is None else limit):
        diff = torch._foreach_sub([params[i].detach() for i in idx], [ref[i] for i in idx])
        if weights is not None:
            torch._foreach_mul_(diff, [weights[i] for i in idx])
        torch._foreach_add_([params[i].grad for i in idx], diff, alpha=coef)
        del diff


def _norm_blocks(diff: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor as views of at most NORM_BLOCK elements (a DTensor shard or a short tensor: whole)."""
    out = []
    for d in diff:
        if type(d) is torch.Tensor and d.numel() > NORM_BLOCK and d.is_contiguous():
            flat = d.view(-1)
            out.extend(flat[a:a + NORM_BLOCK] for a in range(0, flat.numel(), NORM_BLOCK))
        else:
            out.append(d)
    return out


@torch.no_grad()
def pull_distance(params: list[torch.Tensor], ref: list[torch.Tensor], limit: int | None = None) -> float:
    """‖params − ref‖ over all tensors: w − ref formed in the params' dtype (fused, in groups of at most
    ``CHUNK`` elements), float32 norms of blocks of at most ``NORM_BLOCK`` elements, their squares
    summed in float64."""
    sq = 0.0
    for idx in chunks([p.numel() for p in params], CHUNK if limit is None else limit):
        diff = torch._foreach_sub([params[i].detach() for i in idx], [ref[i] for i in idx])
        norms = torch._foreach_norm(_norm_blocks(diff), 2, dtype=torch.float32)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for n in norms:
            n = n.full_tensor() if hasattr(n, "full_tensor") else n  # a DTensor's norm: over all its shards
            by_device.setdefault(n.device, []).append(n)
        sq += sum(float(torch.stack(v).double().square().sum()) for v in by_device.values())
        del diff, norms
    return sq ** 0.5


def grad_scale(accelerator) -> float:
    """The loss scale of fp16 mixed precision (gradients are scaled by it until unscaled), else 1."""
    scaler = getattr(accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
