"""What `--jobs` buys on this machine's CPUs: the same work done by one process with every thread, or
by J processes with a J-th of the threads each, side by side in one run.

The unit of work is a slice of what a run's stages do on the config's model: --steps LoRA training
steps (r8 on q_proj/v_proj, batch 8 x 128 tokens, AdamW) and a greedy generation of 16 prompts x 32
new tokens. `--jobs 1` is one process with all C threads doing J units one after the other; `--jobs J`
is J processes with C/J threads each, one unit each, at the same time (as `lisa run --jobs J` runs its
stages). Both do the same J units; the ratio of their wall times is the speed-up of `--jobs J`. The two
setups alternate (--repeats times each: A B A B ...) so machine noise hits both alike; the median
ratio is reported. Every process loads the model before the clock starts.

    python benchmarks/jobs_speedup.py [--config configs/real/smollm2.yaml] [--model PATH]
        [--jobs J] [--cores C] [--steps 4] [--repeats 2]

J defaults to the core count C (one thread per process). The model is the config's own (a GGUF wheel
source converted once into LISA_ALIGN_CACHE) unless --model names a local folder. The last line of
stdout is JSON: {"speedup", "ratios", "seconds_one_process", "seconds_jobs", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "real", "smollm2.yaml")
GO = "go"


def unit_of_work(model, tok, steps: int, seed: int) -> None:
    """``steps`` LoRA training steps on random token ids, then a greedy generation of 16 prompts."""
    import torch

    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    for _ in range(steps):
        ids = torch.randint(100, tok.vocab_size, (8, 128), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    ids = torch.randint(100, tok.vocab_size, (16, 24), generator=g)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                       do_sample=False, pad_token_id=tok.eos_token_id)


def worker(model_path: str, threads: int, units: int, steps: int) -> None:
    """Load the model, say it is ready, wait for the go, do ``units`` units, print the seconds taken."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    print("ready", flush=True)
    if sys.stdin.readline().strip() != GO:
        return
    t0 = time.perf_counter()
    for i in range(units):
        unit_of_work(model, tok, steps, seed=i)
    print(f"{time.perf_counter() - t0:.3f}", flush=True)


def timed(model_path: str, processes: int, threads: int, units: int, steps: int) -> float:
    """Wall time of ``processes`` workers with ``threads`` threads each, ``units`` units each, started together."""
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", model_path, str(threads), str(units), str(steps)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise SystemExit(f"a worker failed to load {model_path}")
    t0 = time.perf_counter()
    for p in procs:
        p.stdin.write(GO + "\n")
        p.stdin.flush()
    for p in procs:
        p.stdout.readline()
        p.wait()
    return time.perf_counter() - t0


def resolve_model(args) -> str:
    if args.model:
        return args.model
    from lisa_align.config import load_config
    from lisa_align.pipeline import Pipeline

    return Pipeline(load_config(args.config)).ensure_base()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--model", default=None, help="a local model folder instead of the config's model")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--jobs", type=int, default=None, help="processes of the parallel setup (default: --cores)")
    ap.add_argument("--steps", type=int, default=4, help="training steps per unit of work")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    jobs = args.jobs or args.cores
    model_path = resolve_model(args)
    one, many = [], []
    for r in range(args.repeats):
        one.append(timed(model_path, 1, args.cores, jobs, args.steps))
        many.append(timed(model_path, jobs, max(args.cores // jobs, 1), 1, args.steps))
        print(f"repeat {r}: 1 process x {args.cores} threads {one[-1]:.1f}s; {jobs} processes x "
              f"{max(args.cores // jobs, 1)} thread(s) {many[-1]:.1f}s; speed-up {one[-1] / many[-1]:.2f}x", flush=True)
    ratios = [a / b for a, b in zip(one, many)]
    print(json.dumps({"speedup": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios],
                      "seconds_one_process": [round(x, 1) for x in one], "seconds_jobs": [round(x, 1) for x in many],
                      "jobs": jobs, "cores": args.cores, "steps": args.steps, "model": model_path}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
