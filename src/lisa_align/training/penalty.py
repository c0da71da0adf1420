"""Quadratic pulls toward reference weights, applied as gradients (no autograd graph).

``add_pull_gradient`` adds coef · F ⊙ (w − ref) to ``.grad`` of each parameter: the gradient of
coef/2 · Σ F (w − ref)². Lisa's proximal term uses F = 1, coef = ρ; EWC uses the diagonal Fisher F
and coef = 2λ. w − ref is formed first (one rounding, as autograd of the term would give: the
two-pass form grad + coef·w − coef·ref cancels small gradients in low precision), in chunks of at
most ``CHUNK`` elements so the transient memory stays bounded.

On CPU the chunks are cache-sized blocks (at most ``CPU_BLOCK`` elements, a multiple of ``ALIGN``;
a large tensor is cut into slices) formed in one reused workspace: no fresh multi-megabyte
allocation per step (on CPU each one costs page faults: for a 100M-parameter full fine-tuning,
allocating w − ref took ~3x longer than the arithmetic), and w − ref is read back from cache, not
memory. The arithmetic is the same elementwise ops, and slices aligned to ``ALIGN`` elements keep
the result bit-identical to the whole-tensor ops. Other devices use fused ``torch._foreach_*`` ops
on groups of whole tensors (their caching allocators make the transient cheap).
"""

from __future__ import annotations

import torch

CHUNK = 1 << 26
CPU_BLOCK = 1 << 20  # 4 MiB of float32: stays in cache between forming w − ref and adding it
ALIGN = 64  # slice boundaries on multiples of the widest SIMD step: vector loops cover slices as the whole


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


def _cpu_blocked(p: torch.Tensor, r: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether a parameter takes the CPU block path: plain contiguous CPU tensors (not DTensor shards),
    and w − ref keeps the param's dtype (so it fits the workspace exactly as the whole-tensor op forms it)."""
    tensors = [p.detach(), r, *(t for t in others if t is not None)]
    return (all(type(t) is torch.Tensor and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and torch.result_type(tensors[0], r) == p.dtype)


def _workspace(work: dict, params, p: torch.Tensor, block: int) -> torch.Tensor:
    if p.dtype not in work:
        work[p.dtype] = torch.empty(min(block, max(q.numel() for q in params if q.dtype == p.dtype)), dtype=p.dtype)
    return work[p.dtype]


def _slices(n: int, block: int):
    for i in range(0, n, block):
        yield i, min(i + block, n)


def cpu_block(limit: int) -> int:
    """The CPU block: at most ``limit`` (and ``CPU_BLOCK``) elements, a multiple of ``ALIGN`` (at least ALIGN)."""
    return max(ALIGN, min(limit, CPU_BLOCK) // ALIGN * ALIGN)


@torch.no_grad()
def add_pull_gradient(params: list[torch.nn.Parameter], ref: list[torch.Tensor], coef: float,
                      weights: list[torch.Tensor] | None = None, limit: int | None = None) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    limit = CHUNK if limit is None else limit
    block = cpu_block(limit)
    work: dict[torch.dtype, torch.Tensor] = {}
    rest = []
    for i, p in enumerate(params):
        w = None if weights is None else weights[i]
        if not _cpu_blocked(p, ref[i], p.grad, w):
            rest.append(i)
            continue
        buf = _workspace(work, params, p, block)
        pf, rf, gf = p.detach().view(-1), ref[i].view(-1), p.grad.view(-1)
        wf = None if w is None else w.view(-1)
        for a, b in _slices(pf.numel(), block):
            diff = torch.sub(pf[a:b], rf[a:b], out=buf[: b - a])
            if wf is not None:
                diff.mul_(wf[a:b])
            gf[a:b].add_(diff, alpha=coef)
    for group in chunks([params[i].numel() for i in rest], limit):
        idx = [rest[j] for j in group]
        diff = torch._foreach_sub([params[i].detach() for i in idx], [ref[i] for i in idx])
        if weights is not None:
            torch._foreach_mul_(diff, [weights[i] for i in idx])
        torch._foreach_add_([params[i].grad for i in idx], diff, alpha=coef)
        del diff


@torch.no_grad()
def pull_distance(params: list[torch.Tensor], ref: list[torch.Tensor], limit: int | None = None) -> float:
    """‖params − ref‖ over all tensors: w − ref formed in the params' dtype, its norm taken in float32,
    the squares summed in float64 (CPU: in blocks, as in ``add_pull_gradient``)."""
    block = cpu_block(CHUNK if limit is None else limit)
    sq = 0.0
    work: dict[torch.dtype, torch.Tensor] = {}
    for p, r in zip(params, ref):
        if _cpu_blocked(p, r):
            buf = _workspace(work, params, p, block)
            pf, rf = p.detach().view(-1), r.view(-1)
            for a, b in _slices(pf.numel(), block):
                diff = torch.sub(pf[a:b], rf[a:b], out=buf[: b - a])
                sq += float(torch.linalg.vector_norm(diff, dtype=torch.float32)) ** 2
        else:
            sq += float(torch.linalg.vector_norm((p.detach() - r).float()) ** 2)
    return sq ** 0.5


def grad_scale(accelerator) -> float:
    """The loss scale of fp16 mixed precision (gradients are scaled by it until unscaled), else 1."""
    scaler = getattr(accelerator, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
