"""The ``lisa`` command: run | plan | sweep | evaluate | gate | report | demo."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time
import traceback
import warnings
from importlib import resources
from pathlib import Path

from lisa_align.errors import LisaError
from lisa_align.io import redact_secrets

ALLOW_PICKLE_OVERRIDE = "model.allow_pickle=true"


def preset_path(name: str) -> Path:
    return Path(str(resources.files("lisa_align.presets") / f"{name}.yaml"))


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for handler in logging.getLogger().handlers:  # log lines never show a HF token
        if not any(isinstance(f, _RedactFilter) for f in handler.filters):
            handler.addFilter(_RedactFilter())
    for name in ("transformers", "datasets", "accelerate", "peft", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover
        pass


class _RedactFilter(logging.Filter):
    """Replaces HF tokens in a log record's message by ``hf_***`` (see :func:`redact_secrets`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # pragma: no cover - a malformed record: leave it to logging
            return True
        clean = redact_secrets(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def _overrides(args) -> list[str]:
    """The command line's key=value overrides, plus model.allow_pickle=true with --allow-pickle."""
    return list(args.overrides) + ([ALLOW_PICKLE_OVERRIDE] if getattr(args, "allow_pickle", False) else [])


def cmd_run(args) -> int:
    from lisa_align.config import load_config
    from lisa_align.pipeline import Pipeline, default_jobs, format_table

    cfg = load_config(args.config, _overrides(args))
    pipeline = Pipeline(cfg, force=args.force)
    pipeline.load_data()  # every data source is read and validated before any model is built or trained
    if args.stage == "align":  # the alignment alone (a Slurm sweep's alignment job)
        print(pipeline.ensure_aligned())
        return 0
    summary = pipeline.run(jobs=args.jobs or default_jobs())
    print(format_table(summary))
    print(cfg.rundir.summary)
    return 0


def cmd_demo(args) -> int:
    """The embedded CPU default (preset ``demo``: a tiny Llama on synthetic data), or with ``--real`` a
    real chat model on the CPU (preset ``real``: SmolLM2-135M-Instruct and real prompt sets from pinned
    wheels; ``configs/real/smollm2.yaml``)."""
    from lisa_align.config import load_config
    from lisa_align.pipeline import Pipeline, default_jobs, format_table

    preset = "real" if args.real else "demo"
    name = "demo-real" if args.real else "demo"
    overrides = [f"seed={args.seed}"] + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    overrides += [f"name={name}-seed{args.seed}"] + _overrides(args)
    cfg = load_config(preset_path(preset), overrides)
    t0 = time.time()
    pipeline = Pipeline(cfg, force=args.force)
    pipeline.load_data()  # every data source is read and validated before any model is built or trained
    summary = pipeline.run(jobs=args.jobs or (default_jobs(REAL_DEMO_CORES_PER_JOB) if args.real else default_jobs()))
    print()
    print(f"lisa {' '.join(['demo'] + (['--real'] if args.real else []))} (seed {cfg.seed}, p={cfg.data.p}, "
          f"n={cfg.data.n}, judge={cfg.eval.judge}) in {time.time() - t0:.0f}s")
    print(format_table(summary))
    print(cfg.rundir.summary)
    return 0


def cmd_evaluate(args) -> int:
    """Re-judge the saved predictions of every evaluated model in RUN_DIR (no generation): harmful
    answers with --judge, AlpacaEval answers (win rate = FA) with --pairwise-judge-model."""
    from lisa_align.evaluation import rejudge_run
    from lisa_align.pipeline import format_table
    from lisa_align.rundir import RunDir

    run = RunDir(args.run_dir)
    summary = rejudge_run(run, judge=args.judge, judge_model=args.judge_model, pairwise_judge=args.pairwise_judge,
                          pairwise_judge_model=args.pairwise_judge_model, allow_pickle=args.allow_pickle)
    print(format_table(summary))
    print(run.summary)
    return 0


def cmd_plan(args) -> int:
    """The resolved config and the plan of a run, without training (and without data unless asked)."""
    from lisa_align.config import load_config
    from lisa_align.plan import format_plan, make_plan

    cfg = load_config(args.config, _overrides(args))
    data = None
    if args.load_data:
        from lisa_align.pipeline import load_run_data

        d = load_run_data(cfg)
        data = {"user": d.user, "alignment": d.alignment, "harmful": d.harmful, "eval_harmful": d.eval_harmful,
                "eval_task": d.eval_task, "eval_benign": d.eval_benign}
    print(format_plan(cfg, make_plan(cfg, processes=args.processes, data=data), processes=args.processes))
    return 0


def cmd_sweep(args) -> int:
    from lisa_align.sweep import describe, plan, submit, write_slurm

    root, runs = plan(args.config, args.grid, args.set)
    if args.launcher == "slurm":  # planning needs no training stack
        slurm = write_slurm(root, runs)
        print("\n".join(describe(slurm)))
        if args.submit:
            submit(slurm)
        return 0
    from lisa_align.pipeline import default_jobs, format_table, run_sweep

    for r in run_sweep(runs, jobs=args.jobs or default_jobs()):
        print(f"\n{r['name']}  ({r['run_dir']})")
        print(format_table(r["summary"]))
    print(root)
    return 0


def cmd_report(args) -> int:
    from lisa_align.report import markdown, write_report

    out, report = write_report(args.runs_dir, args.out)
    print(markdown(report), end="")
    print(f"{len(report.rows)} results from {len({r['run'] for r in report.rows})} runs"
          + (f" ({len(report.unfinished)} unfinished, left out)" if report.unfinished else ""))
    print(out / "report.html")
    return 0


def _limit(text: str) -> float | None:
    """A ``lisa gate --max-...`` value: a number of percent points >= 0, or ``off``."""
    if text.strip().lower() in ("off", "none", "null"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of percent points >= 0 (or off)")
    return value


def cmd_gate(args) -> int:
    """The release gate on a finished run: each fine-tuned (and post-processed) model against the aligned
    model; gate.json in RUN_DIR; exit 1 when a model fails."""
    from lisa_align.gate import format_gate, run_gate

    result = run_gate(args.run_dir, max_hs_increase=args.max_hs_increase, max_fa_drop=args.max_fa_drop,
                      max_over_refusal_increase=args.max_over_refusal_increase)
    print(format_gate(result, str(args.run_dir)))
    print(Path(args.run_dir) / "gate.json")
    return 0 if result["passed"] else 1


JOBS_HELP = ("run the stages in N processes that split the threads: the base is evaluated while the main "
             "process aligns, then the methods fine-tune and every model is evaluated in parallel (results as a "
             "sequential run's; default: one per two cores)")
# The real demo's processes have one thread each: on 2 cores two one-thread processes did the same training
# and generation 1.13x faster than one process with two threads (benchmarks/jobs_speedup.py), and the base
# is evaluated beside the alignment.
REAL_DEMO_CORES_PER_JOB = 1
ALLOW_PICKLE_HELP = ("also load pickle weights (pytorch_model.bin, adapter_model.bin, *.pt): pickle can run code "
                     "when loaded, so only for files you trust (default: safetensors only)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lisa", description="Lisa: fine-tune LLMs without losing safety alignment")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="align -> finetune -> evaluate from a YAML config")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="key.path=value, e.g. data.p=0.2 finetune.lisa.rho=10")
    r.add_argument("--force", action="store_true", help="reuse a run dir whose config differs")
    r.add_argument("--jobs", type=int, default=None, help=JOBS_HELP)
    r.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP + "; sets model.allow_pickle=true")
    r.add_argument("--stage", choices=["all", "align"], default="all",
                   help="align: only the alignment stage (a Slurm sweep's alignment job); default: all")
    r.set_defaults(func=cmd_run)
    pl = sub.add_parser("plan", help="print the resolved config and the plan (stages, rows, T, switch steps, "
                                     "scheduler and warm-up) without training")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*", help="key.path=value, e.g. data.p=0.2")
    pl.add_argument("--processes", type=int, default=1, help="data-parallel processes (the global batch grows)")
    pl.add_argument("--load-data", action="store_true", help="read the data sources for the real row counts")
    pl.set_defaults(func=cmd_plan)
    w = sub.add_parser("sweep", help="expand a grid of runs and run them (local, in sequence) or submit a Slurm array")
    w.add_argument("config")
    w.add_argument("--grid", nargs="+", action="extend", default=[],
                   help="axes key=v1,v2 (method, p, n, rho, k1, k2, seed, or dotted config paths); "
                        "default: the config's sweep.grid")
    w.add_argument("--set", nargs="+", action="extend", default=[],
                   help="key.path=value overrides for every run (repeatable)")
    w.add_argument("--launcher", choices=["local", "slurm"], default="local")
    w.add_argument("--jobs", type=int, default=None, help=JOBS_HELP)
    w.add_argument("--submit", action="store_true", help="with --launcher slurm: call sbatch (the alignment "
                   "jobs, then the array after them) and print every job id")
    w.set_defaults(func=cmd_sweep)
    e = sub.add_parser("evaluate", help="re-judge a run's saved predictions (no generation): harmful answers "
                                        "and/or alpaca_eval win rate")
    e.add_argument("run_dir")
    e.add_argument("--judge", default=None, help="harmful-answer judge: refusal | beaverdam | llamaguard")
    e.add_argument("--judge-model", default=None, help="judge model path or HF id (beaverdam, llamaguard)")
    e.add_argument("--pairwise-judge", default="local", help="alpaca_eval win-rate judge (default: local)")
    e.add_argument("--pairwise-judge-model", default=None,
                   help="local HF causal LM (path or id) that judges alpaca_eval answers against the references")
    e.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP + " for the judge models")
    e.set_defaults(func=cmd_evaluate)
    g = sub.add_parser("gate", help="the release gate: each fine-tuned (and post-processed) model of a finished run "
                       "against its aligned model; writes RUN_DIR/gate.json, exit 1 when a model fails")
    g.add_argument("run_dir")
    g.add_argument("--max-hs-increase", type=_limit, default=..., metavar="X",
                   help="the most HS may rise over the aligned model's, in percent points, or off (default: the "
                        "run config's gate.max_hs_increase, else 5)")
    g.add_argument("--max-fa-drop", type=_limit, default=..., metavar="Y",
                   help="the most FA may fall under the aligned model's, in percent points, or off (default: the "
                        "run config's gate.max_fa_drop, else 5)")
    g.add_argument("--max-over-refusal-increase", type=_limit, default=..., metavar="Z",
                   help="the most over-refusal may rise over the aligned model's, in percent points, or off "
                        "(default: the run config's gate.max_over_refusal_increase, else 10)")
    g.set_defaults(func=cmd_gate)
    rp = sub.add_parser("report", help="tables (markdown/CSV), plots (PNG) and report.html for the runs in a folder")
    rp.add_argument("runs_dir", help="a sweep folder (or any folder holding run folders)")
    rp.add_argument("--out", default=None, help="report folder (default: RUNS_DIR/report)")
    rp.set_defaults(func=cmd_report)
    d = sub.add_parser("demo", help="the embedded CPU default: base, aligned, SFT, BSO and Lisa on synthetic data "
                       "(--real: a real chat model, SmolLM2-135M-Instruct, on real prompt sets, still on the CPU)")
    d.add_argument("--real", action="store_true",
                   help="the real-model demo (configs/real/smollm2.yaml): model and prompts from pinned wheels")
    d.add_argument("--jobs", type=int, default=None, help=JOBS_HELP[:-1] + "; with --real, one per core)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--output-dir", default=None)
    d.add_argument("--force", action="store_true")
    d.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP + "; sets model.allow_pickle=true")
    d.add_argument("overrides", nargs="*", help="key.path=value")
    d.set_defaults(func=cmd_demo)
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; argparse's usage errors (which echo arguments) are redacted."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            return build_parser().parse_args(argv)
    finally:
        sys.stderr.write(redact_secrets(buf.getvalue()))


def main(argv: list[str] | None = None) -> int:
    """``lisa ...``. Every message it prints for an error passes through :func:`redact_secrets`, so a
    Hugging Face token (``hf_...`` or the value of $HF_TOKEN) is shown as ``hf_***``."""
    args = _parse(argv)
    _quiet()
    try:
        return args.func(args)
    except LisaError as e:
        print(f"lisa: error: {redact_secrets(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lisa: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception:
        text = traceback.format_exc()
        if redact_secrets(text) == text:
            raise  # nothing to hide: the usual traceback
        print(redact_secrets(text), end="", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
