"""Re-judge a finished run folder (``lisa evaluate RUN_DIR``): no generation.

:func:`rejudge_run` scores the saved predictions of every evaluated model again, the harmful answers
with a harmfulness judge (HS; Cohen's kappa against the previous judge goes to ``metrics.json``) and
the answers of a pairwise task (``alpaca_eval``) with a pairwise judge (FA = win rate), then rewrites
``summary.json``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from lisa_align.errors import LisaError
from lisa_align.evaluation.evaluate import rejudge, rejudge_pairwise, summary_row
from lisa_align.evaluation.judges import JUDGES, Judge, cohen_kappa, get_judge
from lisa_align.evaluation.pairwise import PAIRWISE_JUDGES, PairwiseJudge, get_pairwise_judge, judge_key
from lisa_align.evaluation.tasks import get_task
from lisa_align.io import atomic_write_json, read_json, read_jsonl
from lisa_align.models.loading import allow_pickle_kwargs
from lisa_align.rundir import EvalDir, RunDir

__all__ = ["rejudge_run"]


def rejudge_run(
    run_dir: str | os.PathLike | RunDir,
    *,
    judge: Judge | str | None = None,
    judge_model: str | None = None,
    pairwise_judge: PairwiseJudge | str = "local",
    pairwise_judge_model: str | None = None,
    allow_pickle: bool = False,
    echo: Callable[[str], Any] = print,
    judge_dtype: str | None = None,
    cut_at_response_marker: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Re-judge the saved predictions of every evaluated model of ``run_dir`` (no generation).

    * ``judge`` (a name or a :class:`Judge`; ``judge_model`` is its model path or HF id): every
      ``eval/<model>/predictions/harmful.jsonl`` is scored again (:func:`rejudge`). When the previous
      judge was another one, Cohen's kappa between the two is recorded in ``metrics.json`` under
      ``judge_agreement["<old>~<new>"]``.
    * ``pairwise_judge_model`` (with ``pairwise_judge``, default ``local``), or a
      :class:`PairwiseJudge` object: the task answers of every model evaluated on a pairwise task
      (``alpaca_eval``) are judged (:func:`rejudge_pairwise`); FA becomes the win rate.

    ``judge_dtype`` (``auto``, ``float32``, ...) goes to a judge built by name that takes a dtype (None:
    the judge's default, float32 for BeaverDam as in the reference). ``cut_at_response_marker`` None
    cuts the answers as each evaluation did (its ``metrics.json``); HS+ is recomputed with HS.
    ``allow_pickle`` lets the judge models load pickle weights. Each model's row of ``summary.json``
    is updated and the file rewritten atomically once everything is judged. ``echo`` gets the
    progress lines. Returns the summary. One-line :class:`LisaError` for nothing to judge or
    nothing saved.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    harmful_wanted = isinstance(judge, Judge) or bool(judge)
    pairwise_wanted = isinstance(pairwise_judge, PairwiseJudge) or bool(pairwise_judge_model)
    if not harmful_wanted and not pairwise_wanted:
        raise LisaError("nothing to judge: pass --judge X (harmful answers) and/or --pairwise-judge-model PATH "
                        "(alpaca_eval win rate)")
    if not run.eval_root.is_dir():
        raise LisaError(f"{run.path}: no eval/ folder with saved predictions; run `lisa run` first")
    summary = read_json(run.summary) if run.summary.is_file() else {}
    if harmful_wanted:
        _rejudge_harmful(run, summary, judge, judge_model, allow_pickle, echo, judge_dtype, cut_at_response_marker)
    if pairwise_wanted:
        _rejudge_pairwise(run, summary, pairwise_judge, pairwise_judge_model, allow_pickle, echo)
    atomic_write_json(run.summary, summary)
    return summary


def _rejudge_harmful(run: RunDir, summary: dict, judge: Judge | str, judge_model: str | None,
                     allow_pickle: bool, echo: Callable[[str], Any], judge_dtype: str | None = None,
                     cut: bool | None = None) -> None:
    evals = [ev for ev in run.evaluated() if ev.predictions("harmful").is_file()]
    if not evals:
        raise LisaError(f"{run.path}: no saved predictions under eval/*/predictions/harmful.jsonl; "
                        "run `lisa run` first")
    if isinstance(judge, str):
        kwargs = {"model_name_or_path": judge_model} if judge_model else {}
        kwargs |= allow_pickle_kwargs(JUDGES.get(judge_key(judge)), allow_pickle)
        judge = get_judge(judge, options={"dtype": judge_dtype}, **kwargs)
    for ev in evals:
        summary[ev.name] = summary_row(_rejudge_one(ev, judge, echo, cut))
    echo(f"judge: {judge.name}")


def _rejudge_one(ev: EvalDir, judge: Judge, echo: Callable[[str], Any], cut: bool | None = None) -> dict[str, Any]:
    """Re-judge one model's harmful answers; Cohen's kappa against the previous judge's verdicts (when it
    was another judge and had judged every answer) goes to ``metrics.json``. Returns the metrics."""
    preds = ev.predictions("harmful")
    before = read_jsonl(preds)
    old_judge = ev.read_metrics().get("judge")
    metrics = rejudge(ev.path, judge, cut_at_response_marker=cut)
    if old_judge and old_judge != judge.name and before and all("flagged" in r for r in before):
        after = read_jsonl(preds)
        kappa = cohen_kappa([bool(r["flagged"]) for r in before], [bool(r["flagged"]) for r in after])
        metrics.setdefault("judge_agreement", {})[f"{old_judge}~{judge.name}"] = {"cohen_kappa": kappa}
        atomic_write_json(ev.metrics, metrics)
        echo(f"{ev.name}: Cohen's kappa {old_judge} vs {judge.name} = {kappa:.3f}")
    return metrics


def _is_pairwise(ev: EvalDir) -> bool:
    """Whether ``ev`` holds task answers of a pairwise task (a missing task name counts as sst2)."""
    return (ev.predictions("task").is_file() and ev.metrics.is_file()
            and get_task(ev.read_metrics().get("task") or "sst2").pairwise)


def _rejudge_pairwise(run: RunDir, summary: dict, judge: PairwiseJudge | str, judge_model: str | None,
                      allow_pickle: bool, echo: Callable[[str], Any]) -> None:
    evals = [ev for ev in run.evaluated() if _is_pairwise(ev)]
    if not evals:
        raise LisaError(f"{run.path}: no alpaca_eval predictions to judge (eval/*/predictions/task.jsonl of a run "
                        "with data.task: alpaca_eval)")
    if isinstance(judge, str):
        allow = allow_pickle_kwargs(PAIRWISE_JUDGES.get(judge_key(judge)), allow_pickle)
        judge = get_pairwise_judge(judge, model_name_or_path=judge_model, **allow)
    for ev in evals:
        metrics = rejudge_pairwise(ev.path, judge)
        summary[ev.name] = summary_row(metrics)
        echo(f"{ev.name}: win rate {metrics['fa']:.1f}% ({judge.name})")
