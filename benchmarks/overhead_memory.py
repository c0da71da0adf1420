"""benchmarks/overhead.py, part 4: peak memory of one method's training run, in a child process of its own.

Measured from after the model and trainer are built, over a short run (2 steps: an alignment step,
a switch, a fine-tuning step, so the optimizer state, the anchor, the proximal pass and the drift
logs all happen).

CPU: the peak of live tensor bytes, counted by ``LiveTensorMeter``, a torch dispatch mode that sees
every op's outputs: a storage first seen as an op's output (not one of its inputs) is counted at its
size until it is freed (a weakref finalizer on the storage). It counts what every tensor op
allocates, on any CPU build (no profiler, no allocator hook), and is deterministic: the same run
gives the same bytes. It does not see scratch memory that a kernel allocates and frees inside
itself. Coarser, the peak RSS (VmHWM reset via /proc/self/clear_refs; glibc told to hand large blocks
back) is reported too. CUDA: ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import asdict

import torch
from overhead_models import Spec, build_base, make_trainer, tensor_bytes, with_mode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

TENSOR_METER = "peak live tensor bytes (dispatch-mode meter) above those before training"


class LiveTensorMeter(TorchDispatchMode):
    """Peak bytes of the CPU tensor storages created by ops while the mode is active and still alive."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}  # id of a storage object -> its bytes (the object lives while counted)
        self.current = 0
        self.peak = 0
        self.lock = threading.RLock()  # finalizers may run in any thread, and inside our own bookkeeping

    def _free(self, key: int) -> None:
        with self.lock:
            self.current -= self.live.pop(key, 0)

    def _storages(self, tree) -> dict[int, torch.UntypedStorage]:
        out = {}
        for t in tree_leaves(tree):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.layout == torch.strided:
                s = t.untyped_storage()
                out[id(s)] = s
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = self._storages((args, kwargs))
        out = func(*args, **kwargs)
        with self.lock:
            for key, s in self._storages(out).items():
                size = s.nbytes()
                if key in self.live:  # resized in place (an out= op)
                    self.current += size - self.live[key]
                    self.live[key] = size
                elif key not in inputs:  # a new storage (an empty one too: an out= op may grow it)
                    self.live[key] = size
                    self.current += size
                    weakref.finalize(s, self._free, key).atexit = False
            self.peak = max(self.peak, self.current)
        return out


def proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def release_large_blocks() -> None:
    """glibc: serve blocks >= 64 KiB by mmap and trim the heap at once, so the RSS follows live bytes."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also turns off its dynamic growth)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def measure_memory(spec: Spec, method: str, classes: dict | None = None) -> dict:
    """Peak memory of one method's training run, from after the trainer is built. CPU: the peak of live
    tensor bytes (``LiveTensorMeter``) and the peak RSS (VmHWM); CUDA: ``max_memory_allocated``.
    ``classes``: as in ``make_trainer`` (a trainer subclass per method)."""
    cuda = spec.device == "cuda"
    if not cuda:
        release_large_blocks()
    base = build_base(spec.arch, spec.seq_len, spec.dtype, spec.seed, spec.device)
    model = with_mode(base, spec.mode, spec.seed, copy_base=False)
    del base
    gc.collect()
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="lisa-overhead-mem-") as tmp:
        trainer = make_trainer(method, model, spec, tmp, classes=classes)
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            trainer.train()
            torch.cuda.synchronize()
            out["peak_bytes"] = torch.cuda.max_memory_allocated() - before
            out["meter"] = "cuda max_memory_allocated - allocated before training"
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            except OSError:
                out["rss_note"] = "VmHWM not resettable: includes the build"
            before = proc_status("VmRSS")
            meter = LiveTensorMeter()
            with meter:
                trainer.train()
            out["rss_peak_bytes"] = proc_status("VmHWM") - before
            out["peak_bytes"] = meter.peak
            out["meter"] = TENSOR_METER
        out["anchor_bytes"] = tensor_bytes(trainer.anchor) if method == "lisa" else 0
    return out


def memory_spec(spec: Spec) -> Spec:
    """A short run for the memory children: 2 steps (alignment, then fine-tuning), so the optimizer
    state, a switch (anchor copy), the proximal pass and drift logs all happen."""
    return Spec(**{**asdict(spec), "steps": 2, "warmup": 0, "k1": 1, "k2": 1, "logging_steps": 1})


def _fork_child(spec: Spec, method: str, conn) -> None:
    # One thread: torch then enters no OpenMP region, so the fork is safe even if the parent had
    # started a thread pool (the tensor bytes measured do not depend on the thread count).
    torch.set_num_threads(1)
    try:
        conn.send(("ok", measure_memory(spec, method)))
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", repr(e)))
    finally:
        conn.close()


def memory_in_children(jobs: list[tuple[Spec, str]], script: str, timeout: float = 900) -> list[dict]:
    """measure_memory for each (spec, method), each in a child process of its own (peak bytes do not
    depend on what else runs). CPU: forks with one torch thread each, two at a time; CUDA: fresh
    interpreters running ``script --_memory-child`` (this process has not touched CUDA, and a fork
    cannot inherit it), one at a time."""
    results: list[dict | None] = [None] * len(jobs)
    if jobs and jobs[0][0].device == "cuda":
        import subprocess

        for i, (spec, method) in enumerate(jobs):
            out = subprocess.run([sys.executable, os.path.abspath(script), "--_memory-child",
                                  json.dumps({"spec": asdict(spec), "method": method})],
                                 capture_output=True, text=True, timeout=timeout)
            if out.returncode != 0:
                raise RuntimeError(f"memory child for {spec.config}/{spec.mode}/{method} failed: {out.stderr[-2000:]}")
            results[i] = json.loads(out.stdout.strip().splitlines()[-1])
        return results
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("fork")
    pending, running, deadline = list(enumerate(jobs)), [], time.time() + timeout
    while pending or running:
        while pending and len(running) < 2:
            i, (spec, method) = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_fork_child, args=(spec, method, send))
            proc.start()
            send.close()
            running.append((i, proc, recv))
        ready = wait([r for _, _, r in running], timeout=max(deadline - time.time(), 0))
        if not ready:
            for _, proc, _ in running:
                proc.kill()
            raise RuntimeError("memory children timed out")
        for i, proc, recv in [x for x in running if x[2] in ready]:
            try:
                status, value = recv.recv()
            except EOFError:
                status, value = "error", f"exit code {proc.join() or proc.exitcode}"
            proc.join()
            running.remove((i, proc, recv))
            if status != "ok":
                for _, p, _ in running:
                    p.kill()
                spec, method = jobs[i]
                raise RuntimeError(f"memory child for {spec.config}/{spec.mode}/{method} failed: {value}")
            results[i] = value
    return results
