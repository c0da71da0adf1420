"""Training throughput on a run config's real rows: padded tokens per batch and training tokens/s,
random batching (what the trainers do) vs length-grouped batching, side by side in one process.

The rows are the config's alignment rows (``--part alignment``, the default: what the align stage
trains on, through its defense's ``training_rows``) or its user rows (``--part user``: what the
fine-tuning stage trains on), tokenised exactly as training does (``tokenize_rows`` with the config's
``data.template`` / ``max_length``, the model's own tokenizer). Rows whose source says ``answers:
base_model`` have no answer until the pipeline generates one with the model; here they get a FIXED
placeholder answer of ``--placeholder-words`` words instead (48 by default: the mean of the SmolLM2
base answers cached by a real run, at generated_max_new_tokens 64). A fixed answer has no spread of
its own, so the padding figures of those rows are, if anything, a little optimistic.

How the trainers batch today: SFT (the Trainer's default ``train_sampling_strategy="random"``) draws a
random permutation and cuts it into batches of the stage's batch size; Lisa/BSO's BiStateBatchSampler
does the same per stream (one seeded permutation per pass). ``DataCollatorForSeq2Seq(padding=True)``
pads every batch to its longest row. Length grouping is the Trainer's
``train_sampling_strategy="group_by_length"`` (transformers' LengthGroupedSampler: a random
permutation cut into mega-batches of 50 batches (fewer on a small set), each sorted by length, the
longest batch first).

Part 1, padding (exact, no model): for each batching, the share of padded slots, sum(pad) / sum(batch
size x longest row), over one epoch, averaged over --epochs-sampled seeds; also per batch; plus the
lower bound of batches cut from the rows sorted by length.

Part 2, tokens/s: two SFT trainers (BaseTrainer with the stage's arguments and LoRA, each on its own
copy of the model, the trainers' collator) train on THE SAME ROWS: --steps random batches drawn at
seeded random positions of a random epoch (after --warmup batches that both take alike); one trainer
takes them as they are, the other takes the same rows sorted by length and cut into batches again
(grouping within a mega-batch of --steps batches, the Trainer's grouping in small; the batches then in
random order). Same rows, same real tokens: the ratio of the times is the ratio of the throughputs.
They run INTERLEAVED, one optimizer step each in turn (a baton between two threads, as
benchmarks/overhead.py does), so machine noise hits both alike. A step's time is the wall time between
consecutive ``on_step_end`` callbacks, waits for the baton excluded. Reported: real (non-pad)
tokens/s = real tokens of the measured steps / their time, padded slots/s, the ratio grouped /
random; and, from a least-squares fit of step time = a + b x padded slots over all measured steps,
the projected time of a whole epoch with each batching's epoch padding (part 1).

    python benchmarks/train_throughput.py [--quick] [--config configs/real/smollm2-first-try.yaml]
        [--model PATH] [--part alignment|user] [--steps N] [--warmup W] [--threads 1]

The model is the config's own (the project's loader: a GGUF wheel source converted once into
LISA_ALIGN_CACHE) unless --model names a local folder. The last line of stdout is JSON:
{"tokens_per_s_ratio", "pad_fraction_random", "pad_fraction_grouped", ...}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # overhead_models, overhead_timing

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "real", "smollm2-first-try.yaml")
DEFAULT_STEPS, QUICK_STEPS = 8, 4
# A realistic answer, repeated/cut to the word count asked for.
PLACEHOLDER_TEXT = (
    "Sure, here is a short answer to your question. The main idea is to start with the basic facts, then "
    "explain how they fit together, and finally give a simple example that makes the point clear. If you "
    "need more detail on any part of this, just let me know and I can expand on it."
)
BATCHINGS = ("random", "grouped")


def placeholder(words: int) -> str:
    base = PLACEHOLDER_TEXT.split()
    return " ".join((base * (words // len(base) + 1))[:words])


# ---- padding: pure functions of the lengths ----------------------------------------------------
def padding_stats(lengths, batches) -> dict:
    """Padding of ``batches`` (lists of row indices into ``lengths``), each padded to its longest row:
    real tokens, padded slots (batch size x longest row, summed), pad tokens, the pad share of all slots
    (``pad_fraction``) and the mean of the per-batch pad shares (``mean_batch_pad_fraction``)."""
    real = slots = 0
    per_batch = []
    for b in batches:
        if not b:
            continue
        lens = [lengths[i] for i in b]
        r, s = sum(lens), len(lens) * max(lens)
        real, slots = real + r, slots + s
        per_batch.append(1 - r / s if s else 0.0)
    n = len(per_batch)
    return {"batches": n, "real_tokens": real, "slots": slots, "pad_tokens": slots - real,
            "pad_fraction": (slots - real) / slots if slots else 0.0,
            "mean_batch_pad_fraction": sum(per_batch) / n if n else 0.0,
            "pad_tokens_per_batch": (slots - real) / n if n else 0.0,
            "real_tokens_per_batch": real / n if n else 0.0}


def chunk(order, batch_size: int) -> list[list[int]]:
    order = list(order)
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """One epoch as the Trainer's RandomSampler + batching cut it (a seeded permutation; last batch short)."""
    import torch

    return chunk(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist(), batch_size)


def grouped_batches(lengths, batch_size: int, seed: int) -> list[list[int]]:
    """One epoch as ``train_sampling_strategy="group_by_length"`` cuts it (transformers' own grouping)."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    return chunk(get_length_grouped_indices(list(lengths), batch_size,
                                            generator=torch.Generator().manual_seed(seed)), batch_size)


def sorted_batches(lengths, batch_size: int) -> list[list[int]]:
    """The lower bound: batches cut from the rows sorted by length."""
    return chunk(sorted(range(len(lengths)), key=lambda i: lengths[i]), batch_size)


def epoch_batches(kind: str, lengths, batch_size: int, seed: int) -> list[list[int]]:
    if kind == "random":
        return random_batches(len(lengths), batch_size, seed)
    if kind == "grouped":
        return grouped_batches(lengths, batch_size, seed)
    if kind == "sorted":
        return sorted_batches(lengths, batch_size)
    raise ValueError(kind)


def padding_table(lengths, batch_size: int, seeds: int, seed: int = 0) -> dict[str, dict]:
    """padding_stats per batching, averaged over ``seeds`` epochs (seed, seed + 1, ...; sorted: one)."""
    out = {}
    for kind in (*BATCHINGS, "sorted"):
        runs = [padding_stats(lengths, epoch_batches(kind, lengths, batch_size, seed + s))
                for s in range(1 if kind == "sorted" else seeds)]
        out[kind] = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
        out[kind]["pad_fraction_min"] = min(r["pad_fraction"] for r in runs)
        out[kind]["pad_fraction_max"] = max(r["pad_fraction"] for r in runs)
    return out


def same_rows_plans(lengths, batch_size: int, warmup: int, steps: int, seed: int) -> dict[str, list[list[int]]]:
    """The two trainers' batches (one batch per step): ``warmup`` batches both take alike, then ``steps``
    random batches (seeded positions of a random epoch) for "random", and the same rows sorted by length,
    re-cut and shuffled for "grouped"."""
    drawn = sample_batches(random_batches(len(lengths), batch_size, seed), warmup + steps, seed + 11)
    warm, measured = drawn[:warmup], drawn[warmup:]
    grouped = chunk(sorted((i for b in measured for i in b), key=lambda i: lengths[i]), batch_size)
    random.Random(seed + 12).shuffle(grouped)
    return {"random": warm + measured, "grouped": warm + grouped}


def fit_step_time(times, slots) -> tuple[float, float] | None:
    """Least squares of time = a + b x slots: (a, b), or None where it cannot say (one slot count, b <= 0)."""
    n = len(times)
    if n < 2:
        return None
    mx, my = sum(slots) / n, sum(times) / n
    var = sum((x - mx) ** 2 for x in slots)
    if var == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(slots, times)) / var
    return (my - b * mx, b) if b > 0 else None


def sample_batches(batches: list[list[int]], count: int, seed: int) -> list[list[int]]:
    """``count`` batches of ``batches`` at seeded random positions (without repeats while they last; full
    batches only, as all but the last are)."""
    full = [b for b in batches if len(b) == max(len(x) for x in batches)]
    rng = random.Random(seed)
    out: list[list[int]] = []
    while len(out) < count:
        out += rng.sample(full, min(len(full), count - len(out)))
    return out


# ---- the rows -----------------------------------------------------------------------------------
def training_rows(cfg, part: str, words: int) -> tuple[list[dict], int]:
    """The stage's rows as training gets them, pending base-model answers replaced by the placeholder;
    and how many were replaced."""
    from lisa_align.data.answers import PENDING
    from lisa_align.pipeline import load_run_data

    data = load_run_data(cfg)
    if part == "alignment":
        a = cfg.align
        rows = a.method.resolve(a).training_rows(data.alignment, data.roles())
    else:
        rows = data.user
    text = placeholder(words)
    out = [dict({k: v for k, v in r.items() if k != PENDING}, output=text) if r.get(PENDING) else r for r in rows]
    return out, sum(bool(r.get(PENDING)) for r in rows)


# ---- tokens/s -------------------------------------------------------------------------------------
def make_trainer(model, tok, dataset, batches: list[list[int]], stage, out_dir: str, seed: int, callback):
    """An SFT trainer (BaseTrainer, the stage's arguments, the trainers' collator) that trains on exactly
    ``batches``, in order (a list batch sampler in place of the Trainer's)."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq
    from transformers.trainer_callback import PrinterCallback

    from lisa_align.data.templates import IGNORE_INDEX
    from lisa_align.training import BaseTrainer
    from lisa_align.training.run import training_arguments

    class FixedBatches(BaseTrainer):
        def get_train_dataloader(self):
            loader = DataLoader(self.train_dataset, batch_sampler=batches, collate_fn=self.data_collator,
                                num_workers=0)
            return self.accelerator.prepare(loader)

    steps = len(batches) // stage.grad_accum
    args = training_arguments(stage.model_copy(update={"max_steps": steps, "logging_steps": 10 ** 6}), out_dir,
                              seed=seed, use_cpu=True, save=False)
    args.disable_tqdm = True
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX)
    trainer = FixedBatches(model=model, args=args, train_dataset=dataset, data_collator=collator,
                           processing_class=tok, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)
    return trainer


def step_timer(name: str, baton):
    """Wall time per optimizer step, between consecutive on_step_end (the baton's waits excluded); hands
    the baton on after every step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.last = None

        def on_train_begin(self, args, state, control, **kwargs):
            baton.wait(name)
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.last)
            baton.pass_on(name)
            baton.wait(name)
            self.last = time.perf_counter()

    return StepTimer()


def measure(base, tok, dataset, lengths, stage, plans: dict[str, list[list[int]]], seed: int) -> dict:
    """Interleaved training on each plan's batches; per plan the step times and the real / padded tokens
    of each step."""
    import torch
    from overhead_timing import Baton, run_interleaved

    from lisa_align.models.lora import attach_lora

    baton = Baton(list(plans))
    timers = {k: step_timer(k, baton) for k in plans}
    ga = stage.grad_accum
    with tempfile.TemporaryDirectory(prefix="lisa-train-throughput-") as tmp:
        trainers = {}
        for k, batches in plans.items():
            torch.manual_seed(seed + 1)  # the same LoRA initialisation for both
            model = copy.deepcopy(base)
            if stage.lora is not None:
                model = attach_lora(model, stage.lora)
            trainers[k] = make_trainer(model, tok, dataset, batches, stage, os.path.join(tmp, k), seed, timers[k])
        run_interleaved(trainers, baton)
        del trainers
    out = {}
    for k, batches in plans.items():
        steps = [batches[i * ga:(i + 1) * ga] for i in range(len(batches) // ga)]
        per_step = [padding_stats(lengths, s) for s in steps]
        out[k] = {"times_s": timers[k].times, "real": [p["real_tokens"] for p in per_step],
                  "slots": [p["slots"] for p in per_step]}
    return out


def summarize(m: dict, warmup: int) -> dict:
    t, real, slots = m["times_s"][warmup:], m["real"][warmup:], m["slots"][warmup:]
    secs = sum(t)
    return {"steps": len(t), "seconds": secs, "median_step_s": statistics.median(t),
            "real_tokens": sum(real), "slots": sum(slots), "pad_fraction": 1 - sum(real) / sum(slots),
            "real_tokens_per_s": sum(real) / secs, "slots_per_s": sum(slots) / secs}


# ---- command line -------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="run config (default configs/real/smollm2-first-try.yaml)")
    ap.add_argument("--model", default=None, help="a local model folder instead of the config's model")
    ap.add_argument("--part", default="alignment", choices=("alignment", "user"),
                    help="alignment rows with the align stage's settings (default), or user rows with finetune's")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} measured steps per batching")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"measured optimizer steps per batching (default {DEFAULT_STEPS}; --quick {QUICK_STEPS})")
    ap.add_argument("--warmup", type=int, default=1, help="steps per batching dropped before measuring (1)")
    ap.add_argument("--batch-size", type=int, default=None, help="per-device batch (default: the stage's)")
    ap.add_argument("--placeholder-words", type=int, default=48,
                    help="words of the placeholder answer of answers: base_model rows (48)")
    ap.add_argument("--epochs-sampled", type=int, default=200, help="seeded epochs the padding table averages (200)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = torch's default)")
    ap.add_argument("--no-train", action="store_true", help="the padding table only (no model)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if args.steps < 1 or args.warmup < 0 or args.placeholder_words < 1 or args.epochs_sampled < 1:
        ap.error("--steps, --placeholder-words and --epochs-sampled must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    from lisa_align.config import load_config
    from lisa_align.data.templates import PromptFormat, tokenize_rows
    from lisa_align.models.loading import load_model_and_tokenizer, load_tokenizer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    cfg = load_config(args.config)
    stage = cfg.align if args.part == "alignment" else cfg.finetune
    if args.batch_size:
        stage = stage.model_copy(update={"batch_size": args.batch_size})
    batch = stage.batch_size
    from overhead_models import config_model

    path = os.path.abspath(args.model) if args.model else config_model(cfg)
    rows, n_placeholder = training_rows(cfg, args.part, args.placeholder_words)
    if args.no_train:
        base, tok = None, load_tokenizer(path)
    else:  # the model, and its tokenizer with the pad token as training sets it
        base, tok = load_model_and_tokenizer(path, dtype=cfg.model.dtype)
        base.config.use_cache = False
    fmt = PromptFormat.of(cfg.data)
    dataset = tokenize_rows(rows, tok, cfg.data.max_length, fmt)
    lengths = [len(x) for x in dataset["input_ids"]]
    table = padding_table(lengths, batch, args.epochs_sampled, args.seed)
    lora = stage.lora
    print(f"config {args.config}, {args.part} rows ({len(rows)}; {n_placeholder} base_model answers replaced by a "
          f"{args.placeholder_words}-word placeholder), template {fmt.template}, max_length {cfg.data.max_length}; "
          f"model {path}")
    print(f"row lengths (tokens): mean {statistics.fmean(lengths):.1f}, median {statistics.median(lengths):.0f}, "
          f"min {min(lengths)}, max {max(lengths)}; batch size {batch} (grad_accum {stage.grad_accum})")
    print(f"\npadding per epoch ({args.epochs_sampled} seeded epochs; sorted: one): pad = padded slots / all slots")
    print(f"{'batching':<10}{'pad %':>8}{'(min-max)':>14}{'per-batch %':>13}{'pad tok/batch':>15}"
          f"{'real tok/batch':>16}{'slots/epoch':>13}")
    for k, r in table.items():
        spread = f"{100 * r['pad_fraction_min']:.1f}-{100 * r['pad_fraction_max']:.1f}"
        print(f"{k:<10}{100 * r['pad_fraction']:>8.1f}{spread:>14}"
              f"{100 * r['mean_batch_pad_fraction']:>13.1f}{r['pad_tokens_per_batch']:>15.1f}"
              f"{r['real_tokens_per_batch']:>16.1f}{r['slots']:>13.0f}")
    slot_saving = 1 - table["grouped"]["slots"] / table["random"]["slots"]
    print(f"length grouping pads {table['grouped']['slots']:.0f} slots per epoch instead of "
          f"{table['random']['slots']:.0f}: {100 * slot_saving:.1f}% fewer token positions to compute")
    summary = {"tokens_per_s_ratio": None, "pad_fraction_random": table["random"]["pad_fraction"],
               "pad_fraction_grouped": table["grouped"]["pad_fraction"],
               "pad_fraction_sorted": table["sorted"]["pad_fraction"],
               "pad_tokens_per_batch_random": table["random"]["pad_tokens_per_batch"],
               "pad_tokens_per_batch_grouped": table["grouped"]["pad_tokens_per_batch"],
               "epoch_slot_saving": slot_saving}
    if not args.no_train:
        ga = stage.grad_accum
        plans = same_rows_plans(lengths, batch, args.warmup * ga, args.steps * ga, args.seed)
        t1 = time.time()
        m = measure(base, tok, dataset, lengths, stage, plans, args.seed)
        res = {k: summarize(m[k], args.warmup) for k in BATCHINGS}
        ratio = res["grouped"]["real_tokens_per_s"] / res["random"]["real_tokens_per_s"]
        slots_ratio = res["grouped"]["slots_per_s"] / res["random"]["slots_per_s"]
        fit = fit_step_time([t for k in BATCHINGS for t in m[k]["times_s"][args.warmup:]],
                            [x for k in BATCHINGS for x in m[k]["slots"][args.warmup:]])
        epoch_steps = {k: -(-table[k]["batches"] // ga) for k in BATCHINGS}
        epoch_s = ({k: epoch_steps[k] * fit[0] + fit[1] * table[k]["slots"] for k in BATCHINGS} if fit
                   else {k: None for k in BATCHINGS})
        how = f"LoRA r={lora.r} on {','.join(lora.target_modules)}" if lora else "full fine-tuning"
        print(f"\ntraining ({how}, "
              f"{cfg.model.dtype}, {torch.get_num_threads()} thread(s)): {args.steps} measured steps per batching "
              f"after {args.warmup} warm-up, interleaved step by step, the same rows in both ({time.time() - t1:.0f}s)")
        print(f"{'batching':<10}{'steps':>6}{'seconds':>9}{'median s':>10}{'pad %':>8}{'real tok/s':>12}"
              f"{'slots/s':>10}")
        for k in BATCHINGS:
            r = res[k]
            print(f"{k:<10}{r['steps']:>6}{r['seconds']:>9.1f}{r['median_step_s']:>10.2f}"
                  f"{100 * r['pad_fraction']:>8.1f}{r['real_tokens_per_s']:>12.1f}{r['slots_per_s']:>10.1f}")
        print(f"ratio grouped / random (same rows): real tokens/s {ratio:.2f}x, padded slots/s {slots_ratio:.2f}x")
        epoch_ratio = epoch_s["grouped"] / epoch_s["random"] if fit else None
        if fit:
            print(f"step time fit: {fit[0]:.2f} s + {1000 * fit[1]:.2f} ms x padded slots; projected epoch "
                  f"({table['random']['batches']:.0f} batches, part 1's padding): random {epoch_s['random']:.0f} s, "
                  f"grouped {epoch_s['grouped']:.0f} s, ratio {epoch_ratio:.2f}x")
        else:
            print("step time fit: no positive slope in the measured steps (too few or too noisy); no epoch projection")
        summary = {**summary, "tokens_per_s_ratio": ratio,
                   "real_tokens_per_s_random": res["random"]["real_tokens_per_s"],
                   "real_tokens_per_s_grouped": res["grouped"]["real_tokens_per_s"],
                   "slots_per_s_ratio": slots_ratio,
                   "epoch_time_ratio_projected": epoch_ratio,
                   "step_fit_s": list(fit) if fit else None, "epoch_s_projected": epoch_s,
                   "measured": res}
    summary.update({"config": args.config, "part": args.part, "rows": len(rows), "placeholder_rows": n_placeholder,
                    "placeholder_words": args.placeholder_words, "batch_size": batch, "steps": args.steps,
                    "warmup": args.warmup, "threads": torch.get_num_threads(), "model": path,
                    "wall_s": round(time.time() - t0, 1)})
    print(f"\nwall {summary['wall_s']:.0f}s")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
