"""benchmarks/overhead.py, part 2: per-step wall time of SFT and Lisa, interleaved in one process.

Each trainer runs in its own thread; a baton lets exactly one of them run a block of optimizer steps at
a time, SFT and Lisa alternating, so machine noise hits both alike. Everything is observed through
public hooks only:

- a ``TrainerCallback`` (on_step_begin / on_pre_optimizer_step / on_optimizer_step / on_step_end):
  the step's wall time (between consecutive on_step_end, waits for the baton excluded) and its parts;
- subclasses of both trainers that wrap public methods: ``training_step`` (entry and exit),
  ``get_batch_samples`` (fetching a step's batches) and, on Lisa, ``drift`` (‖w − anchor‖, computed at
  a switch and on logging steps);
- torch hooks on the model: a forward pre-hook (the forward starts) and a post-accumulate-grad hook on
  every trainable parameter (the last one marks the end of the backward).

So a step is cut into fetch+log / prep (training_step entry to forward: Lisa's switch work falls
here) / fwd+bwd / tail (end of backward to training_step exit: Lisa's proximal pass falls here) /
clip / optimizer / sched+zero_grad.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import threading
import time

import torch
from overhead_models import (
    METHODS,
    Spec,
    make_trainer,
    tensor_bytes,
    trainable,
    trainable_bytes,
    training_api,
    with_mode,
)

PARTS = ("fetch+log", "prep", "fwd+bwd", "tail", "clip", "optimizer", "sched+zero_grad")


class Baton:
    """Lets one named runner go at a time, in turn; a finished runner is skipped."""

    def __init__(self, names):
        self.names = list(names)
        self.turn = 0
        self.done: set[str] = set()
        self.cv = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.names[self.turn] == name or self.done >= set(self.names) - {name})

    def advance(self) -> None:
        """Hand the turn to the next runner that has not finished (call with ``cv`` held)."""
        for _ in self.names:
            self.turn = (self.turn + 1) % len(self.names)
            if self.names[self.turn] not in self.done:
                break
        self.cv.notify_all()

    def pass_on(self, name: str) -> None:
        with self.cv:
            self.advance()

    def finish(self, name: str) -> None:
        with self.cv:
            self.done.add(name)
            self.advance()


class Probe:
    """What the timing subclasses and hooks record for one trainer (host clock, seconds)."""

    def __init__(self):
        self.marks: dict[str, float] = {}  # this step's instants
        self.in_step = False
        self.fetch: list[tuple[int, float]] = []  # (global step, seconds) per get_batch_samples call
        self.drift: list[tuple[int, float, bool]] = []  # (global step, seconds, inside training_step)

    def mark(self, name: str, first: bool = False) -> None:
        if not (first and name in self.marks):
            self.marks[name] = time.perf_counter()

    def since(self, calls, first_step: int) -> list[float]:
        return [c[1] for c in calls if c[0] >= first_step]


class ProbedTraining:
    """Mixin (first in the MRO) over a trainer: times the public training_step and get_batch_samples."""

    probe: Probe

    def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
        self.probe.mark("enter", first=True)  # the first micro-batch's entry under accumulation
        self.probe.in_step = True
        try:
            return super().training_step(model, inputs, num_items_in_batch, **kwargs)
        finally:
            self.probe.in_step = False
            self.probe.mark("exit")

    def get_batch_samples(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return super().get_batch_samples(*args, **kwargs)
        finally:
            self.probe.fetch.append((self.state.global_step, time.perf_counter() - t))


class ProbedDrift:
    """Mixin over LisaTrainer: times the public ``drift`` (inside training_step: a switch; else a log)."""

    def drift(self):
        t = time.perf_counter()
        try:
            return super().drift()
        finally:
            self.probe.drift.append((self.state.global_step, time.perf_counter() - t, self.probe.in_step))


def probed_classes() -> dict:
    base, _, lisa, _ = training_api()
    return {"sft": type("ProbedSFT", (ProbedTraining, base), {}),
            "lisa": type("ProbedLisa", (ProbedTraining, ProbedDrift, lisa), {})}


def add_model_hooks(model, probe: Probe) -> list:
    """Forward pre-hook (the forward starts) and post-accumulate-grad hooks (the latest: the backward's end)."""
    handles = [model.register_forward_pre_hook(lambda module, args: probe.mark("forward", first=True))]
    for p in trainable(model):
        handles.append(p.register_post_accumulate_grad_hook(lambda param: probe.mark("grads")))
    return handles


def step_timer(name: str, baton: Baton, block: int, cuda: bool, probe: Probe):
    """A TrainerCallback that records each optimizer step's wall time and its parts, and hands the baton
    on every ``block`` steps (the wait is not counted)."""
    from transformers import TrainerCallback

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.segments: list[dict[str, float]] = []  # per step: where its time went (host clock)
            self.last = None

        def on_train_begin(self, args, state, control, **kwargs):
            baton.wait(name)
            sync()
            self.last = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            probe.marks.clear()
            probe.mark("begin")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            probe.mark("pre")

        def on_optimizer_step(self, args, state, control, **kwargs):
            probe.mark("opt")

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            now = time.perf_counter()
            self.times.append(now - self.last)
            at = [self.last]  # the instants between the parts (a hook that did not fire: a part of 0)
            for key in ("begin", "forward", "grads", "exit", "pre", "opt"):
                at.append(probe.marks.get(key, at[-1]))
            at.append(now)
            self.segments.append({part: b - a for part, a, b in zip(PARTS, at, at[1:])})
            if len(self.times) % block == 0:
                baton.pass_on(name)
                baton.wait(name)
            sync()
            self.last = time.perf_counter()

    return StepTimer()


def run_interleaved(trainers: dict, baton: Baton) -> None:
    errors: dict[str, BaseException] = {}

    def go(name):
        try:
            trainers[name].train()
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors[name] = e
        finally:
            baton.finish(name)

    threads = [threading.Thread(target=go, args=(n,), name=f"train-{n}") for n in trainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        name, err = next(iter(errors.items()))
        raise RuntimeError(f"{name} training failed: {err!r}") from err


def median_ms(xs) -> float:
    return 1000 * statistics.median(xs) if xs else 0.0


def timed_call(fn, cuda: bool) -> float:
    """Wall time of one fn() in seconds (synchronized on CUDA)."""
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def time_it(fn, reps: int, cuda: bool, best: bool = False) -> float:
    """Median (or best) wall time of fn() in ms."""
    out = [timed_call(fn, cuda) for _ in range(reps)]
    return 1000 * min(out) if best else median_ms(out)


def segments(timers: dict, spec: Spec) -> dict:
    """Median ms per part of the step, per method."""
    out = {}
    for m in METHODS:
        segs = timers[m].segments[spec.warmup:]
        out[m] = {k: median_ms([s[k] for s in segs]) for k in PARTS} if segs else {}
    return out


def time_pair(spec: Spec, base, on_done=None) -> dict:
    """Interleaved SFT and Lisa on copies of ``base``: per-step times and parts, what the probes saw, the
    anchor and trainable bytes; ``on_done(trainers)``'s result (e.g. micro-benchmarks on the trained
    trainers) under "on_done"."""
    cuda = spec.device == "cuda"
    baton = Baton(METHODS)
    probes = {m: Probe() for m in METHODS}
    timers = {m: step_timer(m, baton, spec.block, cuda, probes[m]) for m in METHODS}
    classes = probed_classes()
    with tempfile.TemporaryDirectory(prefix="lisa-overhead-") as tmp:
        trainers = {}
        for m in METHODS:
            trainers[m] = make_trainer(m, with_mode(base, spec.mode, spec.seed), spec, os.path.join(tmp, m),
                                       [timers[m]], classes=classes)
            trainers[m].probe = probes[m]
        handles = [h for m in METHODS for h in add_model_hooks(trainers[m].model, probes[m])]
        run_interleaved(trainers, baton)
        for h in handles:
            h.remove()
        lisa, sft = trainers["lisa"], trainers["sft"]
        res = {"times_s": {m: timers[m].times for m in METHODS},
               "trainable_bytes": trainable_bytes(lisa.model),
               "anchor_bytes": tensor_bytes(lisa.anchor),
               "sft_trainable_bytes": trainable_bytes(sft.model),
               "switch_steps": lisa.schedule.switch_steps(),
               "params": sum(p.numel() for p in base.parameters()),
               "trainable_params": sum(p.numel() for p in trainable(lisa.model)),
               "probes": probes,
               "segments_all": {m: timers[m].segments for m in METHODS},
               "segments": segments(timers, spec),
               "on_done": on_done(trainers) if on_done else None}
        del trainers, lisa, sft
    gc.collect()
    return res


def matmul_peak(device: str, dtype: str) -> float:
    """Measured matmul FLOP/s in the run's dtype (the MFU denominator)."""
    n = 8192 if device == "cuda" else 1024
    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    reps = 20 if device == "cuda" else 3
    for _ in range(2):
        a @ b
    ms = time_it(lambda: [a @ b for _ in range(reps)], 3, device == "cuda") / reps
    return 2 * n ** 3 / (ms / 1000)
