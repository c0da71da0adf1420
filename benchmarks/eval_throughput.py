"""Evaluation throughput: batched generation (the shipped path) vs one prompt at a time.

Both paths decode greedily on the SAME prompts and weights: Alpaca-formatted harmful-eval prompts
(as HS evaluation builds them) and SST2 task prompts (as FA builds them), each with the demo preset's
max_new_tokens. The answers must be identical string for string (else the first differing prompt
and both answers are printed and the exit status is 1). Prompts/s is measured per path after a
warm-up, the paths alternating within each repeat; the speedup is batched / one-by-one over all
prompts (median over repeats).

The model is the tiny default base of the demo preset (model.tiny, seed 0), built with the
project's own code and cached (~70 s on 2 cores the first time; LISA_ALIGN_CACHE picks the cache),
or any local model folder given with --model.

With --config CONFIG.yaml (a run config, e.g. configs/real/smollm2-first-try.yaml) the prompts are that
run's HS prompts instead: eval.harmful (HarmBench there; --prompts of them as load_rows picks them: default 16,
--quick 8, one repeat unless --repeats; the one-by-one path of a 135M model takes 2-5 s per prompt
on one shared core, so all 100 at 3 repeats take ~15-25 min), rendered as the run's evaluation renders them
(data.template: chat gives the tokenizer's chat template, through evaluate.prompt_builders) and
generated as it generates them (generation_options: with chat, no added special tokens and a stop at
the end-of-turn token), with eval.max_new_tokens_harmful and eval.batch_size. The model is the
config's own (the project's loader: a GGUF wheel source converted once into LISA_ALIGN_CACHE), or
--model's folder. A real model's greedy answers can differ between the paths where padding changes
the float rounding of a near-tie; every differing prompt is counted ("differing") and the first is
printed.

    python benchmarks/eval_throughput.py [--quick] [--prompts N] [--batch-size B] [--threads T]
                                         [--repeats R] [--model PATH] [--seed S]
    python benchmarks/eval_throughput.py --config configs/real/smollm2-first-try.yaml [--model PATH] [--quick]

The last line of stdout is JSON: {"speedup": x, "identical": true, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUICK_PROMPTS = 128
CONFIG_PROMPTS, QUICK_CONFIG_PROMPTS = 16, 8  # --config: HS prompts of a real model (one-by-one dominates the time)
CONFIG_WARMUP_PROMPTS = 2
DEFAULT_PROMPTS = 400  # the demo's eval sizes: 200 harmful + 200 SST2
WARMUP_PROMPTS = 8


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_PROMPTS} prompts (same as --prompts {QUICK_PROMPTS})")
    ap.add_argument("--prompts", type=int, default=None,
                    help=f"prompts in all, half harmful and half SST2 (default {DEFAULT_PROMPTS}; "
                         f"{QUICK_PROMPTS} with --quick)")
    ap.add_argument("--batch-size", type=int, default=None, help="batched path's batch size (default eval.batch_size)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the tiny model is fastest on one, and more threads on a "
                         "shared CPU oversubscribe it badly)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats of both paths (default 3; --config 1)")
    ap.add_argument("--model", default=None, help="a local model folder (save_pretrained) instead of the tiny base")
    ap.add_argument("--seed", type=int, default=0, help="seed of the tiny base (default 0)")
    ap.add_argument("--preset", default="demo", help="preset giving model.tiny and the eval settings (default demo)")
    ap.add_argument("--config", default=None, metavar="CONFIG.yaml",
                    help="a run config: its HS prompts (eval.harmful), prompt format (data.template), "
                         "max_new_tokens_harmful, eval batch size and (without --model) its model")
    args = ap.parse_args(argv)
    if args.prompts is None and args.config is None:
        args.prompts = QUICK_PROMPTS if args.quick else DEFAULT_PROMPTS
    elif args.prompts is None:
        args.prompts = QUICK_CONFIG_PROMPTS if args.quick else CONFIG_PROMPTS
    if args.repeats is None:
        args.repeats = 1 if args.config else 3
    if args.prompts is not None and args.prompts < (1 if args.config else 2):
        ap.error("--prompts must be at least 2 (one harmful, one SST2); with --config at least 1")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    return args


def _prompt_sets(cfg, n_prompts: int) -> list[tuple[str, list[str], int]]:
    """(name, prompts, max_new_tokens) for the harmful and task sets, built as evaluate_model does."""
    from lisa_align.data.sources import load_rows
    from lisa_align.data.templates import format_prompt

    e = cfg.eval
    n_harmful = (n_prompts + 1) // 2
    n_task = n_prompts - n_harmful
    harmful = load_rows(e.harmful.model_copy(update={"n": n_harmful}))
    task = load_rows(e.task.model_copy(update={"n": n_task}))
    return [
        ("harmful", [format_prompt(str(r["instruction"])) for r in harmful], e.max_new_tokens_harmful),
        (cfg.data.task, [format_prompt(str(r["instruction"]), r.get("input") or None) for r in task],
         e.max_new_tokens_task),
    ]


def _config_sets(cfg, n_prompts: int | None, tok) -> tuple[list[tuple[str, list[str], int]], dict]:
    """(--config) the run's HS prompts as its evaluation builds them: eval.harmful (its first
    ``n_prompts``; None: all of eval.harmful.n), the run's prompt format; and the generation options."""
    from lisa_align.data.sources import load_rows
    from lisa_align.data.templates import PromptFormat
    from lisa_align.evaluation.evaluate import prompt_builders

    e = cfg.eval
    spec = e.harmful if n_prompts is None else e.harmful.model_copy(update={"n": n_prompts})
    rows = load_rows(spec)
    fmt = PromptFormat.of(cfg.data)
    harmful_prompt, _ = prompt_builders(fmt, tok)
    return [("harmful", [harmful_prompt(r) for r in rows], e.max_new_tokens_harmful)], _generation_options(fmt, tok)


def _generation_options(fmt, tok) -> dict:
    """evaluate_model's generation keyword arguments for ``fmt`` (chat: no added special tokens and an
    end-of-turn stop, where the installed lisa_align has them)."""
    try:
        from lisa_align.evaluation.generation import generation_options
    except ImportError:  # an older lisa_align: chat prompts only skip the added special tokens
        return {"add_special_tokens": False} if fmt.chat else {}
    return generation_options(fmt, tok)


def _load(args, cfg):
    from lisa_align.models.loading import load_model_and_tokenizer

    path = args.model
    if path is None and args.config:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from overhead_models import config_model

        path = config_model(cfg)
    if path is None:
        from lisa_align.models.tiny import build_tiny_base

        t0 = time.perf_counter()
        path = str(build_tiny_base(cfg.model.tiny, seed=args.seed, cache_dir=cfg.model.cache_dir, use_cpu=True))
        took = time.perf_counter() - t0
        print(f"tiny base: {path}" + (f" (built in {took:.0f}s)" if took > 1 else " (cached)"))
    model, tok = load_model_and_tokenizer(path, dtype=cfg.model.dtype)
    return path, model.to("cpu").eval(), tok


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    import torch

    from lisa_align.cli import preset_path
    from lisa_align.config import load_config
    from lisa_align.evaluation.generation import generate, generate_one_by_one

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config if args.config else preset_path(args.preset))
    batch_size = args.batch_size or cfg.eval.batch_size
    path, model, tok = _load(args, cfg)
    if args.config:
        sets, options = _config_sets(cfg, args.prompts, tok)
    else:
        sets, options = _prompt_sets(cfg, args.prompts), {}
    n_total = sum(len(p) for _, p, _ in sets)
    print(f"model {path}; {n_total} prompts ({', '.join(f'{n} {len(p)}' for n, p, _ in sets)}"
          + (f"; {args.config}, template {cfg.data.template}" if args.config else "") + "); "
          f"batch size {batch_size}; {torch.get_num_threads()} thread(s); {args.repeats} repeat(s)")

    paths = {
        "batched": lambda prompts, mnt: generate(model, tok, prompts, max_new_tokens=mnt, batch_size=batch_size,
                                                 **options),
        "one_by_one": lambda prompts, mnt: generate_one_by_one(model, tok, prompts, max_new_tokens=mnt, **options),
    }
    warm = CONFIG_WARMUP_PROMPTS if args.config else WARMUP_PROMPTS
    for _, prompts, mnt in sets:  # warm-up: both paths, both prompt shapes
        for run in paths.values():
            run(prompts[:warm], mnt)

    # seconds[path][set] = one time per repeat; answers[path][set] = the answers of every repeat
    seconds = {p: {name: [] for name, _, _ in sets} for p in paths}
    answers = {p: {name: [] for name, _, _ in sets} for p in paths}
    for rep in range(args.repeats):
        order = list(paths) if rep % 2 == 0 else list(reversed(paths))  # alternate who goes first
        for name, prompts, mnt in sets:
            for p in order:
                t0 = time.perf_counter()
                out = paths[p](prompts, mnt)
                seconds[p][name].append(time.perf_counter() - t0)
                answers[p][name].append(out)

    identical = True
    differing = 0  # prompts whose batched answer (first repeat) differs from the one-by-one answer
    for name, prompts, _ in sets:
        reference = answers["one_by_one"][name][0]
        differing += sum(a != b for a, b in zip(answers["batched"][name][0], reference))
        for p in paths:
            for rep, out in enumerate(answers[p][name]):
                diff = next((i for i, (a, b) in enumerate(zip(out, reference)) if a != b), None)
                if diff is None and len(out) != len(reference):
                    diff = min(len(out), len(reference))
                if diff is not None and identical:
                    identical = False
                    print(f"\nMISMATCH ({name}, {p}, repeat {rep}) at prompt {diff}:\n{prompts[diff]!r}\n"
                          f"  {p:<12}: {out[diff] if diff < len(out) else None!r}\n"
                          f"  {'one_by_one':<12}: {reference[diff] if diff < len(reference) else None!r}\n"
                          "(compared with the first one-by-one run)")

    def rate(p: str, names: list[str], n: int) -> float:
        per_repeat = [sum(seconds[p][name][r] for name in names) for r in range(args.repeats)]
        return n / statistics.median(per_repeat)

    rows = [(name, len(prompts), str(mnt), [name]) for name, prompts, mnt in sets]
    rows.append(("all", n_total, "-", [name for name, _, _ in sets]))
    print(f"\n{'set':<10}{'prompts':>8}{'new tok':>8}{'batched p/s':>13}{'one-by-one p/s':>16}{'speedup':>9}")
    by_set = {}
    for name, n, mnt, names in rows:
        b, o = rate("batched", names, n), rate("one_by_one", names, n)
        by_set[name] = {"prompts_per_s_batched": round(b, 2), "prompts_per_s_one_by_one": round(o, 2),
                        "speedup": round(b / o, 3)}
        print(f"{name:<10}{n:>8}{mnt:>8}{b:>13.1f}{o:>16.1f}{b / o:>8.2f}x")
    total = by_set.pop("all")
    print(f"speedup (batched / one-by-one, all prompts): {total['speedup']:.2f}x; "
          f"outputs {'identical' if identical else f'DIFFER ({differing} of {n_total} prompts)'}")
    print(json.dumps({"speedup": total["speedup"], "identical": identical, "differing": differing,
                      "prompts_per_s_batched": total["prompts_per_s_batched"],
                      "prompts_per_s_one_by_one": total["prompts_per_s_one_by_one"],
                      "n_prompts": n_total, "batch_size": batch_size, "threads": torch.get_num_threads(),
                      "repeats": args.repeats, "by_set": by_set,
                      **({"config": args.config, "model": str(path)} if args.config else {})}))
    return 0 if identical else 1


if __name__ == "__main__":
    from lisa_align.cli import _quiet

    _quiet()  # process-wide logging/warning settings: only when run as a script, not when main() is imported
    sys.exit(main())
