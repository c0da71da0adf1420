"""The proximal pull on CPU: cache-sized blocks in a reused workspace vs fused ``torch._foreach_*`` ops.

lisa_align.training.penalty once had two code paths for ``add_pull_gradient`` (grad += coef·F⊙(w − ref))
and ``pull_distance`` (‖w − ref‖): on CPU, w − ref formed in cache-sized blocks (<= 1M elements) in one
reused workspace, tensor by tensor; elsewhere fused ``torch._foreach_*`` ops on groups of whole tensors
(w − ref formed in chunks of at most CHUNK elements). The blocked path is kept here, verbatim, as
``blocked_*``; ``foreach_*`` is the fused path alone. Both run on the same tensors, INTERLEAVED (the
order alternating per repeat), each sample long enough to time (many calls of a small pull); the
median per call over the repeats is reported, with the ratio blocked / foreach. Both paths must give
bit-identical gradients, and distances within 2e-5 of float64's (checked before timing); the
shipped functions of lisa_align.training.penalty are timed alongside ("shipped"). The transient
memory of one call of each path (peak bytes it allocates: w − ref, or the blocked path's workspace)
is counted with overhead_memory's live-tensor meter.

Parameter sets, the project's defaults:
  lora-100m   the paper's fine-tuning LoRA (r=8, q_proj,v_proj) on a ~100M Llama: 48 small tensors
  demo-full   the embedded demo (`lisa demo`): full fine-tuning of the tiny Llama (demo preset's model.tiny)
  full-100m   (--full-100m, not a default) full fine-tuning of the ~100M Llama: what the blocked path
              was written for

The demo's whole step (--no-step skips it): forward, backward, the pull, clipping, AdamW and
zero_grad on the demo model at its batch (16 x 128 tokens), the two paths taking turns step by step;
the median step per path, their ratio, and the pull's share of the step.

    python benchmarks/penalty_paths.py [--quick] [--reps 15] [--threads 1] [--dtype float32|bfloat16]
                                       [--full-100m] [--no-step]

Measured (2 shared cores, 1 thread, float32): blocked/foreach 2.48 (add) and 2.13 (distance) on
lora-100m, 1.28 and 1.20 on demo-full; the demo step 1.012, the pull 1.1% of it; full-100m (not a
default) 0.86-1.02 and 0.77-0.80, transient 4 MiB vs 256 MiB. Hence one (fused) path in penalty.py.

The last line of stdout is JSON: {"sets": {name: {"add_ratio", "distance_ratio", ...}}, "demo_step": {...}}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from overhead_models import SIZES, build_base, tiny_arch, with_mode  # noqa: E402

from lisa_align.training.penalty import chunks  # noqa: E402  (unchanged: both paths group tensors alike)

# --------------------------------------------------------------------------------------------------
# The CPU-blocked path, as it was in lisa_align/training/penalty.py (verbatim but for the names)
# --------------------------------------------------------------------------------------------------

CHUNK = 1 << 26
CPU_BLOCK = 1 << 20  # 4 MiB of float32: stays in cache between forming w − ref and adding it
ALIGN = 64  # slice boundaries on multiples of the widest SIMD step: vector loops cover slices as the whole


def _cpu_blocked(p, r, *others) -> bool:
    tensors = [p.detach(), r, *(t for t in others if t is not None)]
    return (all(type(t) is torch.Tensor and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and torch.result_type(tensors[0], r) == p.dtype)


def _workspace(work: dict, params, p, block: int):
    if p.dtype not in work:
        work[p.dtype] = torch.empty(min(block, max(q.numel() for q in params if q.dtype == p.dtype)), dtype=p.dtype)
    return work[p.dtype]


def _slices(n: int, block: int):
    for i in range(0, n, block):
        yield i, min(i + block, n)


def cpu_block(limit: int) -> int:
    return max(ALIGN, min(limit, CPU_BLOCK) // ALIGN * ALIGN)


@torch.no_grad()
def blocked_add_pull_gradient(params, ref, coef, weights=None, limit=None) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    limit = CHUNK if limit is None else limit
    block = cpu_block(limit)
    work: dict = {}
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
def blocked_pull_distance(params, ref, limit=None) -> float:
    block = cpu_block(CHUNK if limit is None else limit)
    sq = 0.0
    work: dict = {}
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


# --------------------------------------------------------------------------------------------------
# The fused path alone
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def foreach_add_pull_gradient(params, ref, coef, weights=None, limit=None) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for idx in chunks([p.numel() for p in params], CHUNK if limit is None else limit):
        diff = torch._foreach_sub([params[i].detach() for i in idx], [ref[i] for i in idx])
        if weights is not None:
            torch._foreach_mul_(diff, [weights[i] for i in idx])
        torch._foreach_add_([params[i].grad for i in idx], diff, alpha=coef)
        del diff


NORM_BLOCK = 1 << 20  # float32 norms of at most this many elements: a long CPU norm accumulates its rounding


@torch.no_grad()
def foreach_pull_distance(params, ref, limit=None) -> float:
    sq = 0.0
    for idx in chunks([p.numel() for p in params], CHUNK if limit is None else limit):
        diff = torch._foreach_sub([params[i].detach() for i in idx], [ref[i] for i in idx])
        blocks = [b for d in diff for b in (d.view(-1).split(NORM_BLOCK) if d.numel() > NORM_BLOCK else [d])]
        sq += float(torch.stack(torch._foreach_norm(blocks, 2, dtype=torch.float32)).double().square().sum())
        del diff, blocks
    return sq ** 0.5


def shipped():
    from lisa_align.training import penalty

    return penalty.add_pull_gradient, penalty.pull_distance


# --------------------------------------------------------------------------------------------------
# Parameter sets
# --------------------------------------------------------------------------------------------------


def shapes(name: str) -> list[torch.Size]:
    """The trainable tensors' shapes of a set (models built on the meta device: shapes only)."""
    if name == "demo-full":
        model = build_base(tiny_arch(), 128, "float32", 0, device="meta")
    else:
        model = build_base(SIZES["100m"], 128, "float32", 0, device="meta")
        if name == "lora-100m":
            model = with_mode(model, "lora", 0, copy_base=False)
    return [p.shape for p in model.parameters() if p.requires_grad]


def tensors(shape_list, dtype, seed: int = 0):
    """Weights, an anchor that they have drifted from, and gradients of the size training has."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).mul_(0.02).to(dtype)) for s in shape_list]
    ref = [(p.detach().float() + torch.randn(s, generator=g) * 1e-3).to(dtype) for p, s in zip(params, shape_list)]
    grads = [(torch.randn(s, generator=g) * 1e-3).to(dtype) for s in shape_list]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    return params, ref, grads


def check_identical(params, ref, grads) -> None:
    """Every path gives the bits of grad.add_(w − ref, alpha=coef) tensor by tensor (w − ref formed first), and the
    distance to within 2e-5 of float64's (w − ref formed in the params' dtype)."""
    out = {}
    paths = {"blocked": (blocked_add_pull_gradient, blocked_pull_distance),
             "foreach": (foreach_add_pull_gradient, foreach_pull_distance), "shipped": shipped()}
    for name, (add, dist) in paths.items():
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        add(params, ref, 0.7)
        out[name] = ([p.grad.clone() for p in params], dist(params, ref))
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    want = [gr.clone().add_(p.detach() - r, alpha=0.7) for p, r, gr in zip(params, ref, grads)]  # tensor by tensor
    truth = sum(float((p.detach() - r).double().square().sum()) for p, r in zip(params, ref)) ** 0.5
    for name, (g, d) in out.items():
        if not all(torch.equal(a, b) for a, b in zip(g, want)):
            raise SystemExit(f"{name}: add_pull_gradient is not grad.add_(w − ref, alpha=coef)")
        if abs(d - truth) > 2e-5 * truth:
            raise SystemExit(f"{name}: pull_distance {d!r} is not float64's {truth!r}")


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def calls_for(fn, target_s: float) -> int:
    """Calls per sample so that one sample lasts about ``target_s``."""
    fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-6)
    return max(1, round(target_s / one))


def interleaved(fns: dict, reps: int, target_s: float) -> dict[str, float]:
    """Median seconds per call of each fn, the fns taking turns (order reversed every other repeat)."""
    n = {k: calls_for(f, target_s) for k, f in fns.items()}
    n = dict.fromkeys(fns, min(n.values()))  # the same number of calls per sample for each
    samples = {k: [] for k in fns}
    names = list(fns)
    for rep in range(reps):
        for k in names if rep % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            for _ in range(n[k]):
                fns[k]()
            samples[k].append((time.perf_counter() - t) / n[k])
    return {k: statistics.median(v) for k, v in samples.items()}


def time_set(name: str, dtype, reps: int, target_s: float) -> dict:
    shape_list = shapes(name)
    params, ref, grads = tensors(shape_list, dtype)
    check_identical(params, ref, grads)
    add, dist = shipped()
    t_add = interleaved({"blocked": lambda: blocked_add_pull_gradient(params, ref, 1.0),
                         "foreach": lambda: foreach_add_pull_gradient(params, ref, 1.0),
                         "shipped": lambda: add(params, ref, 1.0)}, reps, target_s)
    t_dist = interleaved({"blocked": lambda: blocked_pull_distance(params, ref),
                          "foreach": lambda: foreach_pull_distance(params, ref),
                          "shipped": lambda: dist(params, ref)}, reps, target_s)
    numel = sum(p.numel() for p in params)
    transient = {"add": {"blocked": peak_bytes(lambda: blocked_add_pull_gradient(params, ref, 1.0)),
                         "foreach": peak_bytes(lambda: foreach_add_pull_gradient(params, ref, 1.0))},
                 "distance": {"blocked": peak_bytes(lambda: blocked_pull_distance(params, ref)),
                              "foreach": peak_bytes(lambda: foreach_pull_distance(params, ref))}}
    return {"tensors": len(params), "elements": numel, "largest": max(p.numel() for p in params),
            "bytes": sum(p.numel() * p.element_size() for p in params),
            "add_ms": {k: 1000 * v for k, v in t_add.items()}, "distance_ms": {k: 1000 * v for k, v in t_dist.items()},
            "add_ratio": t_add["blocked"] / t_add["foreach"], "distance_ratio": t_dist["blocked"] / t_dist["foreach"],
            "transient_bytes": transient}


def peak_bytes(fn) -> int:
    """Peak bytes of the tensors one call allocates (overhead_memory's live-tensor meter)."""
    from overhead_memory import LiveTensorMeter

    gc.collect()
    with LiveTensorMeter() as meter:
        fn()
    return meter.peak


def demo_step(dtype, steps: int, warmup: int) -> dict:
    """The demo's training step with each path's pull, taking turns step by step."""
    arch = tiny_arch()
    batch, seq = 16, 128
    model = build_base(arch, seq, "float32", 0).to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, arch["vocab_size"], (batch, seq), generator=g)
    paths = {"blocked": blocked_add_pull_gradient, "foreach": foreach_add_pull_gradient}
    samples: dict[str, list[float]] = {k: [] for k in paths}
    pull: dict[str, list[float]] = {k: [] for k in paths}
    names = list(paths)
    for i in range(2 * (warmup + steps)):
        k = names[(i // 2 + i) % 2]  # blocked, foreach, foreach, blocked, ...: each goes first equally often
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        t1 = time.perf_counter()
        paths[k](params, ref, 1.0)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2 * warmup:
            samples[k].append(time.perf_counter() - t)
            pull[k].append(t2 - t1)
    step = {k: 1000 * statistics.median(v) for k, v in samples.items()}
    pull_ms = {k: 1000 * statistics.median(v) for k, v in pull.items()}
    return {"params": sum(p.numel() for p in params), "batch": batch, "seq_len": seq, "steps_per_path": steps,
            "step_ms": step, "pull_in_step_ms": pull_ms, "step_ratio": step["blocked"] / step["foreach"],
            "pull_share_of_step": {k: pull_ms[k] / step[k] for k in paths},
            "pull_difference_share": (pull_ms["blocked"] - pull_ms["foreach"]) / step["foreach"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and steps (~1 min on 2 cores)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved repeats per timing (default 15; quick 7)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--full-100m", action="store_true", help="also full fine-tuning of the ~100M Llama (not a default)")
    ap.add_argument("--no-step", action="store_true", help="skip the demo's whole-step comparison")
    ap.add_argument("--steps", type=int, default=None, help="demo steps per path (default 20; quick 8)")
    args = ap.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (7 if args.quick else 15)
    target = 0.02 if args.quick else 0.05
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    names = ["lora-100m", "demo-full"] + (["full-100m"] if args.full_100m else [])
    sets = {}
    for name in names:
        sets[name] = time_set(name, dtype, reps if name != "full-100m" else max(3, reps // 3), target)
        print(f"[{name}: {time.time() - t0:.0f}s]", file=sys.stderr)
    step = None if args.no_step else demo_step(dtype, args.steps or (8 if args.quick else 20), 2)
    print(f"add_pull_gradient and pull_distance, CPU-blocked vs fused foreach; {args.dtype}, "
          f"{torch.get_num_threads()} thread(s), median per call over {reps} interleaved repeats; "
          "gradients checked bit-identical, distances to float64's")
    print(f"{'set':<11}{'tensors':>8}{'elements':>12}{'fn':>10}{'blocked ms':>12}{'foreach ms':>12}{'shipped ms':>12}"
          f"{'blocked/foreach':>17}{'transient B/F (MiB)':>22}{'F/weights':>11}")
    for name, r in sets.items():
        for fn, key, ratio in (("add", "add_ms", "add_ratio"), ("distance", "distance_ms", "distance_ratio")):
            t, m = r[key], r["transient_bytes"][fn]
            print(f"{name:<11}{r['tensors']:>8}{r['elements']:>12,}{fn:>10}{t['blocked']:>12.4f}{t['foreach']:>12.4f}"
                  f"{t['shipped']:>12.4f}{r[ratio]:>17.3f}{m['blocked'] / 2**20:>12.2f} /{m['foreach'] / 2**20:>8.2f}"
                  f"{m['foreach'] / r['bytes']:>11.2f}")
    print("transient: peak bytes one call allocates (w - ref; the blocked path's workspace); F/weights: the fused")
    print("path's, in copies of the weights (bounded by CHUNK elements, or the largest tensor)")
    if step:
        print(f"\ndemo step ({step['params']:,} params, full fine-tuning, batch {step['batch']} x {step['seq_len']}; "
              f"median of {step['steps_per_path']} steps per path, taking turns):")
        print(f"  step ms: blocked {step['step_ms']['blocked']:.1f}, foreach {step['step_ms']['foreach']:.1f}, "
              f"ratio blocked/foreach {step['step_ratio']:.3f}")
        print(f"  the pull inside the step: blocked {step['pull_in_step_ms']['blocked']:.3f} ms "
              f"({100 * step['pull_share_of_step']['blocked']:.2f}% of the step), foreach "
              f"{step['pull_in_step_ms']['foreach']:.3f} ms ({100 * step['pull_share_of_step']['foreach']:.2f}%); "
              f"blocked - foreach: {100 * step['pull_difference_share']:+.2f}% of the step")
    print(f"\nwall {time.time() - t0:.0f}s")
    print(json.dumps({"dtype": args.dtype, "threads": torch.get_num_threads(), "reps": reps, "sets": sets,
                      "demo_step": step}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
