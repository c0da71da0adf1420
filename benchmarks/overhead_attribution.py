"""benchmarks/overhead.py, part 3: where Lisa's extra time goes.

Lisa's own pieces are timed by calling the public functions the trainer calls, on the trained Lisa
trainer's own trainable parameters and anchor, right after its run (a micro-benchmark, the pieces
taking turns, median of the repeats):

- the proximal pass: ``lisa_align.training.penalty.add_pull_gradient(params, anchor, rho)`` with a
  gradient on every parameter (as after a backward);
- the switch: the drift ``pull_distance(params, anchor)``, the switch's log record (``trainer.log``)
  and the anchor refresh (the fused copy of the weights into the anchor).

Inside the measured steps (overhead_timing's probes) come: the drift on logging steps (the public
``drift``), both trainers' batch fetching (``get_batch_samples``), and, as a cross-check of the
micro-benchmark, the step parts where the pieces fall: Lisa's "tail" (end of backward to the exit of
training_step) minus SFT's is the proximal pass; Lisa's "prep" on switch steps minus on the others is
the switch.
"""

from __future__ import annotations

import statistics

import torch
from overhead_models import METHODS, Spec, trainable
from overhead_timing import median_ms, timed_call


def micro_benchmark(trainer, cuda: bool, budget_s: float = 1.0, max_reps: int = 21) -> dict[str, float]:
    """Median ms of Lisa's pieces (the public functions, on ``trainer``'s own parameters and anchor); the
    anchor is overwritten (the run is over). At least 3 repeats, more while they fit in ``budget_s``."""
    from lisa_align.training.penalty import add_pull_gradient, pull_distance

    params, anchor, rho = trainable(trainer.model), trainer.anchor, trainer.args.rho
    saved = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)  # as after a backward
    step = trainer.state.global_step
    record = {"lisa/step": step, "lisa/drift": 0.0, "lisa/proximal_term": 0.0, "lisa/proximal_grad_norm": 0.0,
              "lisa/state_is_alignment": 0.0}

    def anchor_copy():
        with torch.no_grad():
            torch._foreach_copy_(anchor, [p.detach() for p in params])

    fns = {"proximal": lambda: add_pull_gradient(params, anchor, rho),
           "drift": lambda: pull_distance(params, anchor),
           "log": lambda: trainer.log(dict(record)),
           "anchor_copy": anchor_copy}

    def timed(fn) -> float:
        return timed_call(fn, cuda)

    samples = {k: [timed(f)] for k, f in fns.items()}  # the first call: warm-up, and the size of one repeat
    one = sum(v[0] for v in samples.values())
    reps = max(3, min(max_reps, int(budget_s / max(one, 1e-9))))
    samples = {k: [] for k in fns}
    names = list(fns)
    for rep in range(reps):
        for k in names if rep % 2 == 0 else names[::-1]:
            samples[k].append(timed(fns[k]))
    for p, g in zip(params, saved):
        p.grad = g
    out = {f"{k}_ms": median_ms(v) for k, v in samples.items()}
    out["reps"] = reps
    return out


def attribution(probes: dict, micro: dict, spec: Spec, times: dict, segs: dict, switch_steps) -> dict:
    """Where Lisa's extra time went during the measured steps (ms; per step = amortized over them)."""
    w, n = spec.warmup, len(times["lisa"]) - spec.warmup
    lisa = probes["lisa"]
    drift_log = [t for step, t, inside in lisa.drift if not inside and step >= w + 1]  # logged after step s, at s + 1
    switches = [s for s in switch_steps if w <= s < len(times["lisa"])]
    fetch = {m: probes[m].since(probes[m].fetch, w) for m in METHODS}
    switch_ms = micro["drift_ms"] + micro["log_ms"] + micro["anchor_copy_ms"]
    out = {"proximal_ms": micro["proximal_ms"],
           "drift_log_calls": len(drift_log), "drift_log_ms": 1000 * statistics.fmean(drift_log) if drift_log else 0.0,
           "switch_calls": len(switches), "switch_ms": switch_ms,
           "fetch_sft_ms": median_ms(fetch["sft"]), "fetch_lisa_ms": median_ms(fetch["lisa"])}
    out["per_step_ms"] = (out["proximal_ms"] + (1000 * sum(drift_log) + switch_ms * len(switches)) / max(n, 1)
                          + out["fetch_lisa_ms"] - out["fetch_sft_ms"])
    # the same pieces seen inside the steps (noisier: differences of medians of short intervals)
    lisa_segs, sft_segs = segs["lisa"], segs["sft"]
    measured = range(w, len(lisa_segs))
    prep_switch = [1000 * lisa_segs[s]["prep"] for s in switches]
    prep_other = [lisa_segs[s]["prep"] for s in measured if s not in set(switches)]
    out["proximal_instep_ms"] = (median_ms([lisa_segs[s]["tail"] for s in measured])
                                 - median_ms([s["tail"] for s in sft_segs[w:]]))
    out["switch_instep_ms"] = (statistics.fmean(prep_switch) - median_ms(prep_other)) if prep_switch and prep_other \
        else None
    out["micro_ms"] = micro
    return out


def estimate_ratio(a: dict, sft_ms: float, spec: Spec, k1: int = 100, k2: int = 900) -> float:
    """Lisa/SFT from Lisa's pieces, at the paper's K1/K2 (2 switches per 1000 steps) and this run's
    logging interval: less exposed to machine noise than a ratio of two medians."""
    extra = (a["proximal_ms"] + a["drift_log_ms"] / spec.logging_steps + a["switch_ms"] * 2 / (k1 + k2)
             + a["fetch_lisa_ms"] - a["fetch_sft_ms"])
    return 1 + extra / sft_ms
