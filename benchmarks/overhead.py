"""Lisa costs almost nothing on top of SFT: per-step wall time and peak memory, SFT vs Lisa.

For each model config (the demo's tiny Llama, and a ~100M or ~1B random Llama) and each mode (the
fine-tuning LoRA of design.md: r=8, alpha=4, q,v; and full fine-tuning), SFT (SFTTrainer) and Lisa
(LisaTrainer, rho=1, proximal warm-up 0, K1:K2=1:9 scaled so that both states and switches fall in
the measured steps) train the same model on the same synthetic token data, INTERLEAVED in one
process: each trainer runs in its own thread, and a baton lets exactly one of them run a block of
optimizer steps at a time, SFT and Lisa alternating, so machine noise hits both alike. A step's time
is the wall time between consecutive ``on_step_end`` callbacks (waits for the baton excluded), so it
holds everything the Trainer does for that step: fetching and collating the batch, forward and
backward, Lisa's anchor copy at a switch, the proximal gradient, clipping, the optimizer, and the
loss/drift logging of the previous step. The warm-up steps are dropped; the median of the rest is
reported, with the ratio Lisa/SFT.

Where the time goes: inside the same steps, Lisa's own pieces are timed (the proximal pass, the
drift on logging steps, the switch work: drift, log record and anchor copy; and both trainers'
batch fetching), and every step is cut into fetch+log / fwd+bwd+clip / optimizer / sched+zero_grad
for both trainers. "est." is 1 + Lisa's pieces / SFT's median at the paper's K1/K2 = 100/900: the
part of the ratio that machine noise cannot move.

Peak memory is measured per method in a child process of its own (a fork on CPU, a fresh
interpreter on CUDA), from after the model and trainer are built: on CPU the peak of live tensor
bytes, from the profiler's allocation events (the CPU analogue of CUDA's max_memory_allocated), and,
coarser, the peak RSS (VmHWM reset via /proc/self/clear_refs; glibc told to hand large blocks back);
on CUDA ``torch.cuda.max_memory_allocated``. The anchor's bytes (LisaTrainer.anchor) and the
trainable-parameter bytes are exact; the target for Lisa's extra memory is one copy of the trainable
parameters (+1%), not two.

CPU runs use one torch thread unless --threads says otherwise: on a machine shared with other jobs,
more threads than free cores make every parallel op wait at its barrier for a scheduler tick
(~4-8 ms each here), and that, not the work, then sets the step times.

    python benchmarks/overhead.py --quick                       # CPU, <= 3 min on 2 cores
    python benchmarks/overhead.py [--steps 40] [--model-size 100m] [--modes lora full] [--threads 0]
    python benchmarks/overhead.py --device cuda --dtype bfloat16 --model-size 1b

The last line of stdout is JSON: {"lora_time_ratio", "full_time_ratio", "lora_extra_mem_bytes",
"lora_trainable_bytes", ...} for the --model-size config.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler (memory children) quiet
warnings.filterwarnings("ignore")

import torch  # noqa: E402

# Llama shapes. "tiny" is read from the demo preset (model.tiny) and the tiny tokenizer's vocabulary.
SIZES = {
    "micro": dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=64, vocab_size=64,
                  tie=True),
    "100m": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2048,
                 vocab_size=32000, tie=True),
    "1b": dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632,
               vocab_size=32000, tie=False),  # the TinyLlama-1.1B shape
}
# (batch, sequence length) per config and device.
SHAPES = {("tiny", "cpu"): (16, 128), ("micro", "cpu"): (2, 16), ("100m", "cpu"): (4, 128), ("1b", "cpu"): (1, 128),
          ("tiny", "cuda"): (16, 128), ("micro", "cuda"): (2, 16), ("100m", "cuda"): (16, 512),
          ("1b", "cuda"): (8, 1024)}
QUICK_SHAPE = (1, 128)  # --quick: the large config's (batch, tokens) on CPU
QUICK_STEPS, QUICK_FULL_STEPS, QUICK_TINY_STEPS, DEFAULT_STEPS = 30, 10, 20, 40
MODES = ("lora", "full")
METHODS = ("sft", "lisa")
LABELS = {"micro": "micro", "tiny": "tiny (demo)", "100m": "~100M", "1b": "~1B"}


@dataclass
class Spec:
    """One measurement: a config, a mode and the run's shape (what a memory child needs to rebuild it)."""

    config: str
    mode: str
    batch: int
    seq_len: int
    steps: int  # optimizer steps per method (warm-up included)
    warmup: int
    block: int
    k1: int
    k2: int
    device: str = "cpu"
    dtype: str = "float32"
    logging_steps: int = 10
    seed: int = 0
    arch: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Model, data, trainers
# --------------------------------------------------------------------------------------------------


def tiny_arch() -> dict:
    """The demo preset's model.tiny settings, with the tiny tokenizer's vocabulary."""
    from lisa_align.cli import preset_path
    from lisa_align.config import load_config
    from lisa_align.models.tiny import build_tokenizer

    t = load_config(preset_path("demo")).model.tiny
    return dict(hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads, num_kv_heads=t.num_heads,
                intermediate_size=t.intermediate_size, vocab_size=len(build_tokenizer(0)), tie=True)


def arch_for(config: str) -> dict:
    return tiny_arch() if config == "tiny" else dict(SIZES[config])


def build_base(arch: dict, seq_len: int, dtype: str, seed: int, device: str = "cpu"):
    """A randomly initialised Llama (random weights time the same as trained ones), built on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"],
                      intermediate_size=arch["intermediate_size"], num_hidden_layers=arch["num_layers"],
                      num_attention_heads=arch["num_heads"], num_key_value_heads=arch["num_kv_heads"],
                      max_position_embeddings=max(seq_len, 256), tie_word_embeddings=arch["tie"],
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(getattr(torch, dtype))


def with_mode(base, mode: str, seed: int):
    """A copy of ``base``: the fine-tuning LoRA attached (mode "lora") or all weights trainable ("full")."""
    from lisa_align.models.lora import FINETUNE_LORA, attach_lora

    model = copy.deepcopy(base)
    if mode == "lora":
        torch.manual_seed(seed + 1)  # the same LoRA initialisation for SFT and Lisa
        model = attach_lora(model, FINETUNE_LORA)
    return model


def token_rows(n: int, seq_len: int, vocab: int, seed: int):
    """n rows of seq_len random tokens; the first quarter is the "prompt" (label -100)."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq_len), generator=g)
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * n,
                                       "labels": labels.tolist()})


def make_trainer(method: str, model, spec: Spec, out_dir: str, callbacks=()):
    from transformers import default_data_collator
    from transformers.trainer_callback import PrinterCallback

    from lisa_align.training import LisaArguments, LisaTrainer, SFTTrainer, TrainArguments

    # The paper's fine-tuning settings (AdamW, constant schedule with 10% warm-up, weight decay 0, clip 1).
    common = dict(output_dir=out_dir, max_steps=spec.steps, per_device_train_batch_size=spec.batch,
                  learning_rate=1e-5, lr_scheduler_type="constant_with_warmup", warmup_steps=0.1, weight_decay=0.0,
                  max_grad_norm=1.0, optim="adamw_torch", seed=spec.seed, data_seed=spec.seed,
                  logging_steps=spec.logging_steps, report_to="none", save_strategy="no", disable_tqdm=True,
                  remove_unused_columns=False, dataloader_num_workers=0, use_cpu=spec.device == "cpu",
                  bf16=spec.dtype == "bfloat16")
    vocab = spec.arch["vocab_size"]
    n_rows = spec.batch * spec.steps  # one epoch is the whole run: no epoch boundary inside it
    user = token_rows(n_rows, spec.seq_len, vocab, spec.seed)
    kwargs = dict(model=model, train_dataset=user, data_collator=default_data_collator, callbacks=list(callbacks))
    if method == "sft":
        trainer = SFTTrainer(args=TrainArguments(**common), **kwargs)
    else:
        args = LisaArguments(**common, k1=spec.k1, k2=spec.k2, rho=1.0, proximal_warmup_ratio=0.0)
        align = token_rows(n_rows, spec.seq_len, vocab, spec.seed + 7)  # the same shape as the user rows
        trainer = LisaTrainer(args=args, alignment_dataset=align, **kwargs)
    trainer.remove_callback(PrinterCallback)
    return trainer


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def trainable_bytes(model) -> int:
    return tensor_bytes(p for p in model.parameters() if p.requires_grad)


def lisa_k(steps: int, warmup: int) -> tuple[int, int]:
    """K1:K2 = 1:9 (the paper's 100:900) on a cycle of about half the run, so that both states and at
    least one switch fall after the warm-up."""
    cycle = max(2, math.ceil(steps / 2))
    k1 = max(1, round(cycle / 10))
    if cycle < warmup:
        raise SystemExit(f"{steps - warmup} measured steps after {warmup} warm-up steps leave no switch to "
                         "measure: give --steps at least the warm-up")
    return k1, cycle - k1


# --------------------------------------------------------------------------------------------------
# Interleaved timing
# --------------------------------------------------------------------------------------------------


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

    def _advance(self) -> None:
        for _ in self.names:
            self.turn = (self.turn + 1) % len(self.names)
            if self.names[self.turn] not in self.done:
                break
        self.cv.notify_all()

    def pass_on(self, name: str) -> None:
        with self.cv:
            self._advance()

    def finish(self, name: str) -> None:
        with self.cv:
            self.done.add(name)
            self._advance()


def step_timer(name: str, baton: Baton, block: int, cuda: bool):
    """A TrainerCallback that records each optimizer step's wall time and hands the baton on every
    ``block`` steps (the wait is not counted)."""
    from transformers import TrainerCallback

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.segments: list[dict[str, float]] = []  # per step: where its time went (host clock)
            self.last = None
            self.marks: dict[str, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            baton.wait(name)
            sync()
            self.last = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.marks["begin"] = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.marks["pre"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.marks["opt"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            now = time.perf_counter()
            self.times.append(now - self.last)
            m = self.marks
            self.segments.append({"fetch+log": m["begin"] - self.last, "fwd+bwd+clip": m["pre"] - m["begin"],
                                  "optimizer": m["opt"] - m["pre"], "sched+zero_grad": now - m["opt"]})
            if len(self.times) % block == 0:
                baton.pass_on(name)
                baton.wait(name)
            sync()
            self.last = time.perf_counter()

    return StepTimer()


def run_interleaved(trainers: dict, timers: dict, baton: Baton) -> None:
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
    return 1000 * statistics.median(xs)


def time_it(fn, reps: int, cuda: bool, best: bool = False) -> float:
    """Median (or best) wall time of fn() in ms."""
    out = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return 1000 * min(out) if best else median_ms(out)


class Probe:
    """Times chosen methods of a trainer instance while it trains: (global step, seconds) per call. On
    CUDA the times are host (launch) times unless the method synchronizes."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.calls: dict[str, list[tuple[int, float]]] = {}
        self.depth: dict[str, int] = {}

    def wrap(self, attr: str, label: str | None = None, inside: str | None = None) -> None:
        """Record calls of ``trainer.attr`` under ``label`` (``label@inside`` while ``inside`` is running)."""
        fn, label = getattr(self.trainer, attr), label or attr

        def timed(*args, **kwargs):
            key = f"{label}@{inside}" if inside and self.depth.get(inside) else label
            self.depth[label] = self.depth.get(label, 0) + 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth[label] -= 1
                self.calls.setdefault(key, []).append((self.trainer.state.global_step, time.perf_counter() - t))

        setattr(self.trainer, attr, timed)

    def since(self, label: str, first_step: int) -> list[float]:
        return [t for step, t in self.calls.get(label, []) if step >= first_step]


def attribution(probes: dict, spec: Spec, times: dict) -> dict:
    """Where Lisa's extra time went during the measured steps (ms; per step = amortized over them)."""
    w, n = spec.warmup, len(times["lisa"]) - spec.warmup
    lisa, sft = probes["lisa"], probes["sft"]
    prox = lisa.since("_apply_proximal", w)
    drift_log = lisa.since("drift", w + 1)  # logged after step s, at global step s + 1
    switch_steps = set(lisa.trainer.schedule.switch_steps())
    switch = [t for step, t in lisa.calls.get("_begin_step", []) if step >= w and step in switch_steps]
    fetch = {m: probes[m].since("get_batch_samples", w) for m in METHODS}
    out = {"proximal_ms": median_ms(prox) if prox else 0.0,
           "drift_log_calls": len(drift_log), "drift_log_ms": 1000 * statistics.fmean(drift_log) if drift_log else 0.0,
           "switch_calls": len(switch), "switch_ms": 1000 * statistics.fmean(switch) if switch else 0.0,
           "fetch_sft_ms": median_ms(fetch["sft"]), "fetch_lisa_ms": median_ms(fetch["lisa"])}
    out["per_step_ms"] = (out["proximal_ms"] + 1000 * (sum(drift_log) + sum(switch)) / max(n, 1)
                          + out["fetch_lisa_ms"] - out["fetch_sft_ms"])
    return out


def segments(timers: dict, spec: Spec) -> dict:
    """Median ms per part of the step (fetch+log, fwd+bwd+clip, optimizer, sched+zero_grad), per method."""
    out = {}
    for m in METHODS:
        segs = timers[m].segments[spec.warmup:]
        out[m] = {k: median_ms([s[k] for s in segs]) for k in segs[0]} if segs else {}
    return out


def time_pair(spec: Spec, base) -> dict:
    """Interleaved SFT and Lisa on copies of ``base``; per-step times, anchor and trainable bytes."""
    cuda = spec.device == "cuda"
    baton = Baton(METHODS)
    timers = {m: step_timer(m, baton, spec.block, cuda) for m in METHODS}
    with tempfile.TemporaryDirectory(prefix="lisa-overhead-") as tmp:
        trainers = {m: make_trainer(m, with_mode(base, spec.mode, spec.seed), spec, os.path.join(tmp, m), [timers[m]])
                    for m in METHODS}
        probes = {m: Probe(trainers[m]) for m in METHODS}
        for m in METHODS:
            probes[m].wrap("get_batch_samples")
        probes["lisa"].wrap("_apply_proximal")
        probes["lisa"].wrap("_begin_step")
        probes["lisa"].wrap("drift", inside="_begin_step")
        run_interleaved(trainers, timers, baton)
        lisa, sft = trainers["lisa"], trainers["sft"]
        res = {"times_s": {m: timers[m].times for m in METHODS},
               "trainable_bytes": trainable_bytes(lisa.model),
               "anchor_bytes": tensor_bytes(lisa.anchor),
               "sft_trainable_bytes": trainable_bytes(sft.model),
               "switch_steps": lisa.schedule.switch_steps(),
               "params": sum(p.numel() for p in base.parameters()),
               "trainable_params": sum(p.numel() for p in lisa.model.parameters() if p.requires_grad),
               "attribution": attribution(probes, spec, {m: timers[m].times for m in METHODS}),
               "segments": segments(timers, spec)}
        del trainers, lisa, sft, probes
    gc.collect()
    return res


# --------------------------------------------------------------------------------------------------
# Peak memory, one child process per method
# --------------------------------------------------------------------------------------------------


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _release_large_blocks() -> None:
    """glibc: serve blocks >= 64 KiB by mmap and trim the heap at once, so the RSS follows live bytes."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (also turns off its dynamic growth)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class quiet_stderr:
    """Silence file descriptor 2 (the profiler's native start/stop lines) for a block."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)


def tensor_peak(prof) -> int | None:
    """Peak of the live CPU tensor bytes allocated inside a ``torch.profiler`` run (profile_memory=True),
    relative to its start: the CPU analogue of ``torch.cuda.max_memory_allocated``."""
    try:
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError:  # a torch without these (private) accessors
        return None
    cur = peak = 0
    for _, nbytes in sorted(events):
        cur += nbytes
        peak = max(peak, cur)
    return peak


def measure_memory(spec: Spec, method: str) -> dict:
    """Peak memory of one method's training run, measured from after the trainer is built. CPU: the
    peak RSS (VmHWM) and the peak of live tensor bytes (from the profiler's allocation events); CUDA:
    ``max_memory_allocated``."""
    cuda = spec.device == "cuda"
    if not cuda:
        _release_large_blocks()
    base = build_base(spec.arch, spec.seq_len, spec.dtype, spec.seed, spec.device)
    model = with_mode(base, spec.mode, spec.seed)
    del base
    gc.collect()
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="lisa-overhead-mem-") as tmp:
        trainer = make_trainer(method, model, spec, tmp)
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
            from torch.profiler import ProfilerActivity, profile

            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            except OSError:
                out["rss_note"] = "VmHWM not resettable: includes the build"
            before = _proc_status("VmRSS")
            with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                trainer.train()
            out["rss_peak_bytes"] = _proc_status("VmHWM") - before
            out["peak_bytes"] = tensor_peak(prof)
            out["meter"] = "peak live tensor bytes (profiler allocation events) above those before training"
            if out["peak_bytes"] is None:
                out["peak_bytes"] = out["rss_peak_bytes"]
                out["meter"] = "peak RSS (VmHWM) above the RSS before training"
        out["anchor_bytes"] = tensor_bytes(trainer.anchor) if method == "lisa" else 0
    return out


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


def preload() -> None:
    """Import what the trainers need once, here, so that forked children need not (imports start no
    torch thread pool)."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch.profiler  # noqa: F401
    from transformers import LlamaForCausalLM, Trainer  # noqa: F401

    import lisa_align.cli  # noqa: F401
    import lisa_align.models.lora  # noqa: F401
    import lisa_align.training  # noqa: F401


def memory_in_children(jobs: list[tuple[Spec, str]], timeout: float = 900) -> list[dict]:
    """measure_memory for each (spec, method), each in a child process of its own (peak bytes do not
    depend on what else runs). CPU: forks with one torch thread each, two at a time; CUDA: fresh
    interpreters (this process has not touched CUDA, and a fork cannot inherit it), one at a time."""
    results: list[dict | None] = [None] * len(jobs)
    if jobs and jobs[0][0].device == "cuda":
        import subprocess

        for i, (spec, method) in enumerate(jobs):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_memory-child",
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


def memory_spec(spec: Spec) -> Spec:
    """A short run for the memory children: 2 steps (alignment, then fine-tuning), so the optimizer
    state, a switch (anchor copy), the proximal pass and drift logs all happen."""
    return Spec(**{**asdict(spec), "steps": 2, "warmup": 0, "k1": 1, "k2": 1, "logging_steps": 1})


# --------------------------------------------------------------------------------------------------
# Peak FLOP/s for MFU
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return str(n)


def estimate_ratio(a: dict, sft_ms: float, spec: Spec, k1: int = 100, k2: int = 900) -> float:
    """Lisa/SFT from the parts timed inside the steps, at the paper's K1/K2 (2 switches per 1000 steps)
    and this run's logging interval: less exposed to machine noise than a ratio of two medians."""
    extra = (a["proximal_ms"] + a["drift_log_ms"] / spec.logging_steps + a["switch_ms"] * 2 / (k1 + k2)
             + a["fetch_lisa_ms"] - a["fetch_sft_ms"])
    return 1 + extra / sft_ms


def summarize(spec: Spec, t: dict, mem: dict | None, peak_flops: float | None) -> dict:
    w = spec.warmup
    sft, lisa = t["times_s"]["sft"][w:], t["times_s"]["lisa"][w:]
    med = {"sft": median_ms(sft), "lisa": median_ms(lisa)}
    mean = {"sft": 1000 * statistics.fmean(sft), "lisa": 1000 * statistics.fmean(lisa)}
    switches = [s for s in t["switch_steps"] if s >= w]
    switch_ms = [1000 * t["times_s"]["lisa"][s] for s in switches]
    tokens = spec.batch * spec.seq_len
    row = {"config": spec.config, "mode": spec.mode, "params": t["params"], "trainable_params": t["trainable_params"],
           "batch": spec.batch, "seq_len": spec.seq_len, "measured_steps": len(lisa), "k1": spec.k1, "k2": spec.k2,
           "median_ms": med, "mean_ms": mean, "time_ratio": med["lisa"] / med["sft"],
           "mean_time_ratio": mean["lisa"] / mean["sft"],
           "paired_time_ratio": statistics.median(x / y for x, y in zip(lisa, sft)),
           "est_time_ratio": estimate_ratio(t["attribution"], med["sft"], spec),
           "switch_steps_measured": switches,
           "lisa_switch_step_ms": switch_ms,
           "tokens_per_s": {m: tokens / (med[m] / 1000) for m in METHODS},
           "trainable_bytes": t["trainable_bytes"], "anchor_bytes": t["anchor_bytes"],
           "attribution_ms": t["attribution"], "segments_ms": t["segments"]}
    if peak_flops:
        row["peak_flops"] = peak_flops
        row["mfu"] = {m: 6 * t["params"] * row["tokens_per_s"][m] / peak_flops for m in METHODS}
    if mem:
        row["peak_mem_bytes"] = {m: mem[m]["peak_bytes"] for m in METHODS}
        row["extra_mem_bytes"] = mem["lisa"]["peak_bytes"] - mem["sft"]["peak_bytes"]
        row["mem_meter"] = mem["sft"]["meter"]
        if "rss_peak_bytes" in mem["sft"]:
            row["rss_peak_bytes"] = {m: mem[m]["rss_peak_bytes"] for m in METHODS}
            row["extra_rss_bytes"] = mem["lisa"]["rss_peak_bytes"] - mem["sft"]["rss_peak_bytes"]
        row["mem_child_anchor_bytes"] = mem["lisa"]["anchor_bytes"]
    return row


def print_table(rows: list[dict]) -> None:
    head = (f"{'config':<12}{'mode':<6}{'params':>9}{'SFT ms':>10}{'Lisa ms':>10}{'ratio':>8}{'paired':>8}{'mean r':>8}{'est.':>7}"
            f"{'SFT peak':>11}{'Lisa peak':>11}{'extra':>11}{'anchor':>11}{'trainable':>11}{'extra/tr':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        peaks = r.get("peak_mem_bytes", {})
        extra = r.get("extra_mem_bytes")
        print(f"{LABELS.get(r['config'], r['config']):<12}{r['mode']:<6}{r['params'] / 1e6:>8.1f}M"
              f"{r['median_ms']['sft']:>10.1f}{r['median_ms']['lisa']:>10.1f}{r['time_ratio']:>8.3f}{r['paired_time_ratio']:>8.3f}"
              f"{r['mean_time_ratio']:>8.3f}{r['est_time_ratio']:>7.3f}{fmt_bytes(peaks.get('sft')):>11}{fmt_bytes(peaks.get('lisa')):>11}"
              f"{fmt_bytes(extra):>11}{fmt_bytes(r['anchor_bytes']):>11}{fmt_bytes(r['trainable_bytes']):>11}"
              + (f"{extra / r['trainable_bytes']:>9.2f}" if extra is not None else f"{'-':>9}"))
    print("\nms: median wall time per optimizer step over the measured steps; ratio = Lisa/SFT of the medians; paired:")
    print("median of Lisa/SFT over steps taken side by side; mean r: ratio of the means (these hold the switch and")
    print("logging steps); est.: 1 + Lisa's parts timed inside the steps (table below) / SFT's median, at K1/K2 =")
    print("100/900. peak: peak memory above that before training (meter below); extra = Lisa peak - SFT peak;")
    print("extra/tr: in copies of the trainable weights (target: 1.00, +1%).")
    meters = {r["mem_meter"] for r in rows if "mem_meter" in r}
    if meters:
        print(f"memory meter: {'; '.join(sorted(meters))}.")
    if any("rss_peak_bytes" in r for r in rows):
        print("peak RSS above the RSS before training (coarser: it also holds the Python heap, the alignment rows,")
        print("the profiler's records and allocator slack):")
        for r in rows:
            if "rss_peak_bytes" in r:
                print(f"  {LABELS.get(r['config'], r['config']):<12}{r['mode']:<6}SFT {fmt_bytes(r['rss_peak_bytes']['sft'])}, "
                      f"Lisa {fmt_bytes(r['rss_peak_bytes']['lisa'])}, extra {fmt_bytes(r['extra_rss_bytes'])}")
    print(f"\n{'config':<12}{'mode':<6}{'steps':>6}{'K1/K2':>8}{'switch ms':>16}{'tok/s SFT':>11}{'tok/s Lisa':>11}"
          f"{'MFU SFT':>9}{'MFU Lisa':>9}")
    for r in rows:
        sw = ",".join(f"{x:.0f}" for x in r["lisa_switch_step_ms"]) or "-"
        mfu = r.get("mfu")
        print(f"{LABELS.get(r['config'], r['config']):<12}{r['mode']:<6}{r['measured_steps']:>6}"
              f"{r['k1']:>4}/{r['k2']:<3}{sw:>16}{r['tokens_per_s']['sft']:>11.0f}{r['tokens_per_s']['lisa']:>11.0f}"
              + (f"{100 * mfu['sft']:>8.1f}%{100 * mfu['lisa']:>8.1f}%" if mfu else f"{'-':>9}{'-':>9}"))
    print("\nWhere Lisa's extra time goes, timed inside the measured steps (ms): the proximal pass (every step, median);")
    print("the drift on logging steps (mean per call, calls); a switch (drift, log record, anchor copy; mean, calls);")
    print("fetching a step's batches (median, SFT / Lisa); the sum per step (amortized) vs Lisa - SFT (means).")
    print(f"{'config':<12}{'mode':<6}{'proximal':>10}{'drift@log':>14}{'switch':>14}{'fetch S/L':>14}"
          f"{'sum/step':>10}{'measured':>10}")
    for r in rows:
        a = r["attribution_ms"]
        diff = r["mean_ms"]["lisa"] - r["mean_ms"]["sft"]
        print(f"{LABELS.get(r['config'], r['config']):<12}{r['mode']:<6}{a['proximal_ms']:>10.2f}"
              f"{a['drift_log_ms']:>9.2f} ({a['drift_log_calls']}){a['switch_ms']:>9.2f} ({a['switch_calls']})"
              f"{a['fetch_sft_ms']:>7.2f}/{a['fetch_lisa_ms']:<6.2f}{a['per_step_ms']:>10.2f}{diff:>10.2f}")
    print("\nThe step in parts (median ms, SFT / Lisa; Lisa's proximal pass and switch work fall in fwd+bwd+clip;")
    print("on CUDA the parts are host times, the step total is synchronized):")
    parts = list(next(iter(rows))["segments_ms"]["sft"])
    print(f"{'config':<12}{'mode':<6}" + "".join(f"{p:>22}" for p in parts))
    for r in rows:
        seg = r["segments_ms"]
        print(f"{LABELS.get(r['config'], r['config']):<12}{r['mode']:<6}"
              + "".join(f"{seg['sft'][p]:>13.1f} /{seg['lisa'][p]:>7.1f}" for p in parts))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"CPU, <= 3 min on 2 cores: batch {QUICK_SHAPE[0]} x {QUICK_SHAPE[1]} on the large config, "
                         f"{QUICK_STEPS} measured steps per method ({QUICK_FULL_STEPS} for its full fine-tuning, "
                         f"{QUICK_TINY_STEPS} on tiny), 2 warm-up steps")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"measured optimizer steps per method (default {DEFAULT_STEPS}; --quick {QUICK_STEPS})")
    ap.add_argument("--warmup", type=int, default=None, help="steps per method dropped before measuring (5; quick 3)")
    ap.add_argument("--block", type=int, default=1, help="steps a trainer runs before handing over to the other")
    ap.add_argument("--model-size", default="100m", choices=sorted(SIZES), help="the large config (the JSON's)")
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny (demo) config")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the weights' dtype; bfloat16 also turns on the Trainer's bf16 autocast")
    ap.add_argument("--batch", type=int, default=None, help="per-step batch of the large config")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row of the large config")
    ap.add_argument("--logging-steps", type=int, default=10, help="Trainer logging (Lisa logs the drift then)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads on CPU (default 1; 0 = torch's default). On a shared machine more threads "
                         "than free cores stall every parallel op at its barrier for a scheduler tick, which then "
                         "dominates the step times")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def build_specs(args) -> list[Spec]:
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    if (args.steps is not None and args.steps < 1) or warmup < 0 or args.block < 1:
        raise SystemExit("--steps and --block must be >= 1, --warmup >= 0")
    if args.quick and args.device != "cpu":
        raise SystemExit("--quick is the CPU budget run; on CUDA use --steps")
    configs = ([] if args.no_tiny else ["tiny"]) + [args.model_size]
    specs = []
    for config in configs:
        batch, seq = SHAPES[(config, args.device)]
        big = config == args.model_size and config not in ("micro", "tiny")
        if big and args.quick:
            batch, seq = QUICK_SHAPE
        if config == args.model_size:
            batch, seq = args.batch or batch, args.seq_len or seq
        for mode in args.modes:
            measured = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
            if args.quick and args.steps is None:
                measured = QUICK_FULL_STEPS if big and mode == "full" else QUICK_STEPS if big else QUICK_TINY_STEPS
            total = warmup + measured
            k1, k2 = lisa_k(total, warmup)
            specs.append(Spec(config=config, mode=mode, batch=batch, seq_len=seq, steps=total, warmup=warmup,
                              block=args.block, k1=k1, k2=k2, device=args.device, dtype=args.dtype,
                              logging_steps=args.logging_steps, seed=args.seed, arch=arch_for(config)))
    return specs


def run(argv=None) -> dict:
    """Measure every config and mode; print the tables; return the summary (the JSON line's dict)."""
    args = parse_args(argv)
    if args.device == "cpu" and args.threads != 0:
        torch.set_num_threads(args.threads or 1)
    specs = build_specs(args)
    t0 = time.time()
    preload()
    # Memory first, in children, before this process runs any torch op (a fork must not inherit a
    # started OpenMP pool or a CUDA context).
    mems: dict[tuple, dict] = {}
    if not args.no_memory:
        jobs = [(memory_spec(spec), m) for spec in specs for m in METHODS]
        for (spec, m), value in zip(jobs, memory_in_children(jobs)):
            mems.setdefault((spec.config, spec.mode), {})[m] = value
        print(f"[memory: {time.time() - t0:.0f}s]", file=sys.stderr)
    peak_flops = matmul_peak(args.device, args.dtype) if args.device == "cuda" else None
    rows = []
    bases: dict[str, object] = {}
    for spec in specs:
        t1 = time.time()
        if spec.config not in bases:
            bases.clear()
            gc.collect()
            bases[spec.config] = build_base(spec.arch, spec.seq_len, spec.dtype, spec.seed, spec.device)
        t = time_pair(spec, bases[spec.config])
        rows.append(summarize(spec, t, mems.get((spec.config, spec.mode)), peak_flops))
        print(f"[{spec.config}/{spec.mode}: {rows[-1]['params'] / 1e6:.1f}M params, "
              f"{time.time() - t1:.0f}s]", file=sys.stderr)
    bases.clear()
    print(f"Lisa vs SFT, {args.device} {args.dtype}, {torch.get_num_threads()} threads; SFT and Lisa interleaved in "
          f"blocks of {args.block} step(s) after {specs[0].warmup} warm-up steps each; Lisa: rho=1, proximal warm-up 0, "
          f"K1:K2 = 1:9 scaled to the run; logging every {args.logging_steps} steps.")
    for config in dict.fromkeys(s.config for s in specs):
        r = next(r for r in rows if r["config"] == config)
        print(f"{LABELS.get(config, config)}: {r['params']:,} parameters ({spec_arch_text(config, specs)}), "
              f"batch {r['batch']} x {r['seq_len']} tokens")
    print()
    print_table(rows)
    if peak_flops:
        print(f"\nMFU = 6 * N * tokens/s / measured {args.dtype} matmul peak ({peak_flops / 1e12:.1f} TFLOP/s); "
              "under LoRA the backward skips the weight gradients, so 6N overstates the work.")
    big = {r["mode"]: r for r in rows if r["config"] == args.model_size}
    lora, full = big.get("lora", {}), big.get("full", {})
    wall = round(time.time() - t0, 1)
    print(f"\nwall {wall:.0f}s")
    return {"lora_time_ratio": lora.get("time_ratio"), "full_time_ratio": full.get("time_ratio"),
            "lora_extra_mem_bytes": lora.get("extra_mem_bytes"), "lora_trainable_bytes": lora.get("trainable_bytes"),
            "lora_anchor_bytes": lora.get("anchor_bytes"), "full_extra_mem_bytes": full.get("extra_mem_bytes"),
            "full_trainable_bytes": full.get("trainable_bytes"), "full_anchor_bytes": full.get("anchor_bytes"),
            "lora_paired_time_ratio": lora.get("paired_time_ratio"),
            "full_paired_time_ratio": full.get("paired_time_ratio"),
            "lora_est_time_ratio": lora.get("est_time_ratio"), "full_est_time_ratio": full.get("est_time_ratio"),
            "lora_measured_steps": lora.get("measured_steps"), "full_measured_steps": full.get("measured_steps"),
            "config": args.model_size, "params": (lora or full).get("params"), "device": args.device,
            "dtype": args.dtype, "mem_meter": (lora or full).get("mem_meter"), "wall_s": wall, "rows": rows}


def spec_arch_text(config: str, specs: list[Spec]) -> str:
    a = next(s.arch for s in specs if s.config == config)
    return (f"hidden {a['hidden_size']}, {a['num_layers']} layers, {a['num_heads']} heads, intermediate "
            f"{a['intermediate_size']}, vocab {a['vocab_size']}, {'tied' if a['tie'] else 'untied'} embeddings")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        job = json.loads(args.memory_child)
        print(json.dumps(measure_memory(Spec(**job["spec"]), job["method"])))
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    summary = run(argv)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
