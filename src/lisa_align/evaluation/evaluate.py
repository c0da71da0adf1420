"""Evaluate a model: harmful score (HS), finetune accuracy (FA) and over-refusal.

Outputs (all written atomically) under ``out_dir``:

* ``predictions/harmful.jsonl``, ``predictions/task.jsonl``, ``predictions/benign.jsonl``: one
  record per row, for each set that was given;
* ``metrics.json``: ``hs``, ``fa``, ``over_refusal`` (percentages; None for a set not given),
  ``n_harmful``, ``n_task``, ``n_benign``, ``hs_by_category``, ``judge`` and a few extras.

For a pairwise task (``alpaca_eval``) FA is the win rate of the answers over the rows' reference
outputs, by a pairwise judge (``win_rate``, ``pairwise_judge``); without a judge the generations are
saved, ``fa`` is None and ``fa_pending`` says how to judge them later (:func:`rejudge_pairwise`).

``hs_by_category`` counts flagged answers per *prompt* category (the row's ``category`` field);
``n_by_category`` holds the number of prompts per category, so per-category HS is
``100 * hs_by_category[c] / n_by_category[c]``. ``judge_categories`` counts the categories the judge
itself reported on flagged answers (empty for the refusal judge).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from lisa_align.data.templates import format_prompt
from lisa_align.errors import LisaError
from lisa_align.evaluation.generation import generate
from lisa_align.evaluation.judges import BEAVERTAILS_CATEGORIES, Judge, Verdict, get_judge, is_refusal
from lisa_align.evaluation.pairwise import PairwiseJudge, get_pairwise_judge, win_rate
from lisa_align.evaluation.tasks import get_task
from lisa_align.io import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl

__all__ = ["evaluate_model", "rejudge", "rejudge_pairwise", "row_categories", "FA_PENDING"]

PREDICTIONS_DIR = "predictions"
METRICS_FILE = "metrics.json"
FA_PENDING = ("no pairwise judge: generations saved in predictions/task.jsonl; judge them with "
              "lisa evaluate RUN_DIR --pairwise-judge-model PATH (or rejudge_pairwise(EVAL_DIR, judge))")


def row_categories(category: Any) -> list[str]:
    """A row's harm categories as a list: a name, a list of names, or a dict of booleans."""
    if category is None or category == "":
        return []
    if isinstance(category, str):
        return [category]
    if isinstance(category, Mapping):
        return [str(name) for name, on in category.items() if on]
    if isinstance(category, Iterable):
        return [str(c) for c in category]
    return [str(category)]


def _category_order(names: Iterable[str]) -> list[str]:
    """BeaverTails categories in their canonical order, then any others alphabetically."""
    names = set(names)
    known = [c for c in BEAVERTAILS_CATEGORIES if c in names]
    return known + sorted(names - set(BEAVERTAILS_CATEGORIES))


def _percent(count: int, total: int) -> float | None:
    return 100.0 * count / total if total else None


def partial_path(pred_dir: Path, name: str) -> Path:
    """Answers generated so far for one set, appended per batch: what a killed evaluation resumes from."""
    return pred_dir / f".{name}.partial.jsonl"


def _read_partial(path: Path, prompts: Sequence[str], max_new_tokens: int) -> dict[int, str]:
    """{prompt index: answer} from a partial file; records of other prompts or settings (a stale file)
    and a torn last line are ignored."""
    done: dict[int, str] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            i = int(rec["i"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if 0 <= i < len(prompts) and rec.get("prompt") == prompts[i] and rec.get("max_new_tokens") == max_new_tokens:
            done[i] = str(rec["answer"])
    return done


def _resumable(generator, prompts: list[str], max_new_tokens: int, name: str, pred_dir: Path,
               batch_size: int) -> list[str]:
    """``generator``'s answers for ``prompts``, appended to the partial file one batch at a time and
    taken back from it on a re-run, so a killed evaluation loses at most one batch. Pending prompts
    go in order of length, so each batch pads little."""
    path = partial_path(pred_dir, name)
    done = _read_partial(path, prompts, max_new_tokens)
    pending = sorted((i for i in range(len(prompts)) if i not in done), key=lambda i: (len(prompts[i]), i))
    chunk = max(1, int(getattr(generator, "chunk_size", 0) or batch_size))
    pred_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(pending), chunk):
            idx = pending[start:start + chunk]
            answers = generator([prompts[i] for i in idx], max_new_tokens=max_new_tokens, desc=name)
            for i, ans in zip(idx, answers):
                done[i] = ans
                f.write(json.dumps({"i": i, "prompt": prompts[i], "max_new_tokens": max_new_tokens,
                                    "answer": ans}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return [done[i] for i in range(len(prompts))]


def _check_rows(rows: Sequence[Mapping[str, Any]], name: str) -> None:
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "instruction" not in row:
            raise LisaError(f"{name} row {i} has no 'instruction' field: rows need instruction/input/output")


def _resolve_judge(judge: Judge | str | None) -> Judge:
    if judge is None:
        raise LisaError("harmful rows were given but no judge: pass judge='refusal' or 'beaverdam'")
    return get_judge(judge) if isinstance(judge, str) else judge


def _resolve_pairwise_judge(judge: PairwiseJudge | str) -> PairwiseJudge:
    return get_pairwise_judge(judge) if isinstance(judge, str) else judge


def _check_references(rows: Sequence[Mapping[str, Any]], name: str, field: str) -> None:
    for i, row in enumerate(rows):
        if not str(row.get(field) or "").strip():
            raise LisaError(f"{name} row {i} has no reference '{field}': a pairwise task compares each answer "
                            "with its row's reference output")


def _apply_preferences(records: list[dict[str, Any]], preferences: list[float], judge_name: str) -> None:
    if len(preferences) != len(records):
        raise LisaError(f"pairwise judge '{judge_name}' returned {len(preferences)} preferences for "
                        f"{len(records)} answers")
    for r, p in zip(records, preferences):
        r["preference"] = float(p)
        r["pairwise_judge"] = judge_name


def _pairwise_summary(records: list[dict[str, Any]], judge: PairwiseJudge) -> dict[str, Any]:
    """FA (= win rate) metrics from records that hold a ``preference``."""
    rate = win_rate([r["preference"] for r in records])
    return {"fa": rate, "win_rate": rate, "n_task": len(records), "pairwise_judge": judge.name,
            "pairwise_judge_model": getattr(judge, "model_name_or_path", None)}


def _harmful_summary(records: list[dict[str, Any]], judge_name: str) -> dict[str, Any]:
    """HS metrics from judged harmful records (each with ``flagged``, ``category``, ``categories``)."""
    flagged = sum(bool(r["flagged"]) for r in records)
    by_cat: dict[str, int] = {}
    n_by_cat: dict[str, int] = {}
    judge_cats: dict[str, int] = {}
    for r in records:
        for c in r.get("category") or []:
            n_by_cat[c] = n_by_cat.get(c, 0) + 1
            by_cat[c] = by_cat.get(c, 0) + int(bool(r["flagged"]))
        if r["flagged"]:
            for c in r.get("categories") or []:
                judge_cats[c] = judge_cats.get(c, 0) + 1
    return {
        "hs": _percent(flagged, len(records)),
        "n_harmful": len(records),
        "n_flagged": flagged,
        "hs_by_category": {c: by_cat[c] for c in _category_order(by_cat)},
        "n_by_category": {c: n_by_cat[c] for c in _category_order(n_by_cat)},
        "judge_categories": {c: judge_cats[c] for c in _category_order(judge_cats)},
        "judge": judge_name,
    }


def _apply_verdicts(records: list[dict[str, Any]], verdicts: list[Verdict], judge_name: str) -> None:
    if len(verdicts) != len(records):
        raise LisaError(f"judge '{judge_name}' returned {len(verdicts)} verdicts for {len(records)} answers")
    for r, v in zip(records, verdicts):
        r["flagged"] = bool(v.flagged)
        r["categories"] = list(v.categories)
        r["scores"] = v.scores
        r["judge"] = judge_name


def evaluate_model(
    model,
    tokenizer,
    *,
    out_dir: str | os.PathLike,
    judge: Judge | str | None,
    harmful_rows: Sequence[Mapping[str, Any]] | None = None,
    task_rows: Sequence[Mapping[str, Any]] | None = None,
    task: str | None = None,
    benign_rows: Sequence[Mapping[str, Any]] | None = None,
    batch_size: int = 32,
    max_new_tokens_harmful: int = 512,
    max_new_tokens_task: int = 200,
    max_new_tokens_benign: int = 128,
    pairwise_judge: PairwiseJudge | str | None = None,
    generator: Callable[..., list[str]] | None = None,
) -> dict[str, Any]:
    """Generate answers for each given set, score them, write predictions and ``metrics.json``.

    * harmful rows: Alpaca prompt without input from ``instruction``; the judge sees the raw
      instruction as the user prompt. HS = 100 x flagged / total.
    * task rows: Alpaca prompt with the row's input; FA = 100 x correct / total (``score_task``).
      For a pairwise task (``alpaca_eval``: rows with ``instruction`` and the reference ``output``)
      FA = the win rate by ``pairwise_judge`` (each record gets its ``preference``); without a
      pairwise judge FA is None and ``fa_pending`` is set (judge later with :func:`rejudge_pairwise`).
    * benign rows: over_refusal = 100 x share of answers that :func:`is_refusal`.

    ``generator(prompts, max_new_tokens=..., desc=...)`` replaces the Hugging Face generation (e.g. the
    vLLM backend); ``model`` and ``tokenizer`` are then unused.

    Returns the metrics dict (the content of ``metrics.json``).
    """
    if generator is None:
        def generator(prompts, *, max_new_tokens, desc):
            return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)
    out = Path(out_dir)
    pred_dir = out / PREDICTIONS_DIR
    harmful_rows = list(harmful_rows or [])
    task_rows = list(task_rows or [])
    benign_rows = list(benign_rows or [])
    # Validate everything before the (long) generation starts.
    _check_rows(harmful_rows, "harmful")
    _check_rows(task_rows, "task")
    _check_rows(benign_rows, "benign")
    task_spec = None
    if task_rows:
        if task is None:
            raise LisaError("task rows were given without a task name: "
                            "pass task='sst2', 'agnews', 'gsm8k' or 'alpaca_eval'")
        task_spec = get_task(task)
        if task_spec.pairwise:
            _check_references(task_rows, "task", "output")
        elif pairwise_judge is not None:
            raise LisaError(f"a pairwise judge was given but task '{task_spec.name}' is scored per answer; "
                            "pairwise judges apply to alpaca_eval")
    pairwise_obj = (_resolve_pairwise_judge(pairwise_judge)
                    if task_spec is not None and task_spec.pairwise and pairwise_judge is not None else None)
    # The judge is only built (a 7B model for BeaverDam) when there is something to judge.
    judge_obj = _resolve_judge(judge) if harmful_rows else None
    judge_name = judge if isinstance(judge, str) or judge is None else judge.name
    if judge_obj is not None:
        judge_name = judge_obj.name

    metrics: dict[str, Any] = {
        "hs": None,
        "fa": None,
        "over_refusal": None,
        "n_harmful": 0,
        "n_task": 0,
        "n_benign": 0,
        "hs_by_category": {},
        "judge": judge_name,
        "task": task_spec.name if task_spec else task,
    }

    if harmful_rows:
        instructions = [str(r["instruction"]) for r in harmful_rows]
        prompts = [format_prompt(i) for i in instructions]
        answers = _resumable(generator, prompts, max_new_tokens_harmful, "harmful", pred_dir, batch_size)
        records = [
            {
                "instruction": ins,
                "input": "",
                "prompt": prompt,
                "answer": ans,
                "reference": row.get("output"),
                "category": row_categories(row.get("category")),
            }
            for ins, prompt, ans, row in zip(instructions, prompts, answers, harmful_rows)
        ]
        _apply_verdicts(records, judge_obj.score(instructions, answers), judge_name)
        atomic_write_jsonl(pred_dir / "harmful.jsonl", records)
        metrics.update(_harmful_summary(records, judge_name))

    if task_rows and task_spec.pairwise:
        prompts = [format_prompt(str(r["instruction"]), r.get("input") or None) for r in task_rows]
        answers = _resumable(generator, prompts, max_new_tokens_task, "task", pred_dir, batch_size)
        records = [
            {
                "instruction": row["instruction"],
                "input": row.get("input") or "",
                "prompt": prompt,
                "answer": ans,
                "reference": str(row["output"]),
            }
            for row, prompt, ans in zip(task_rows, prompts, answers)
        ]
        # The generations are kept even if the judge fails afterwards.
        atomic_write_jsonl(pred_dir / "task.jsonl", records)
        metrics.update({"n_task": len(records), "win_rate": None, "pairwise_judge": None})
        if pairwise_obj is None:
            metrics["fa_pending"] = FA_PENDING
        else:
            preferences = pairwise_obj.compare([str(r["instruction"]) for r in records], answers,
                                               [r["reference"] for r in records])
            _apply_preferences(records, preferences, pairwise_obj.name)
            atomic_write_jsonl(pred_dir / "task.jsonl", records)
            metrics.update(_pairwise_summary(records, pairwise_obj))
    elif task_rows:
        prompts = [format_prompt(str(r["instruction"]), r.get("input") or None) for r in task_rows]
        answers = _resumable(generator, prompts, max_new_tokens_task, "task", pred_dir, batch_size)
        records = []
        correct = 0
        for row, prompt, ans in zip(task_rows, prompts, answers):
            reference = str(row.get("output", ""))
            ok = task_spec.score(ans, reference)
            correct += ok
            records.append(
                {
                    "instruction": row["instruction"],
                    "input": row.get("input") or "",
                    "prompt": prompt,
                    "answer": ans,
                    "reference": reference,
                    "parsed": task_spec.parse(ans),
                    "expected": task_spec.reference(reference),
                    "correct": bool(ok),
                }
            )
        atomic_write_jsonl(pred_dir / "task.jsonl", records)
        metrics.update({"fa": _percent(correct, len(records)), "n_task": len(records), "n_correct": correct})

    if benign_rows:
        prompts = [format_prompt(str(r["instruction"]), r.get("input") or None) for r in benign_rows]
        answers = _resumable(generator, prompts, max_new_tokens_benign, "benign", pred_dir, batch_size)
        records = []
        refused = 0
        for row, prompt, ans in zip(benign_rows, prompts, answers):
            r = is_refusal(ans)
            refused += r
            records.append(
                {
                    "instruction": row["instruction"],
                    "input": row.get("input") or "",
                    "prompt": prompt,
                    "answer": ans,
                    "reference": row.get("output"),
                    "refused": bool(r),
                }
            )
        atomic_write_jsonl(pred_dir / "benign.jsonl", records)
        metrics.update(
            {"over_refusal": _percent(refused, len(records)), "n_benign": len(records), "n_refused": refused}
        )

    atomic_write_json(out / METRICS_FILE, metrics)
    for name in ("harmful", "task", "benign"):  # everything is in the final files now
        partial_path(pred_dir, name).unlink(missing_ok=True)
    return metrics


def rejudge(out_dir: str | os.PathLike, judge: Judge | str) -> dict[str, Any]:
    """Re-score ``out_dir/predictions/harmful.jsonl`` with ``judge`` (no generation).

    Rewrites the predictions with the new verdicts and updates ``hs``, ``hs_by_category`` (and the
    related counts) and ``judge`` in ``metrics.json``; other metrics are kept. Returns the metrics.
    """
    out = Path(out_dir)
    path = out / PREDICTIONS_DIR / "harmful.jsonl"
    if not path.is_file():
        raise LisaError(f"no saved harmful predictions at {path}: run the evaluation first")
    judge_obj = _resolve_judge(judge)
    records = read_jsonl(path)
    prompts = [str(r["instruction"]) for r in records]
    answers = [str(r.get("answer") or "") for r in records]
    _apply_verdicts(records, judge_obj.score(prompts, answers), judge_obj.name)
    atomic_write_jsonl(path, records)
    metrics_path = out / METRICS_FILE
    metrics = read_json(metrics_path) if metrics_path.is_file() else {}
    metrics.update(_harmful_summary(records, judge_obj.name))
    atomic_write_json(metrics_path, metrics)
    return metrics


def rejudge_pairwise(out_dir: str | os.PathLike, judge: PairwiseJudge | str) -> dict[str, Any]:
    """Judge the saved task predictions of a pairwise task (``alpaca_eval``) with ``judge``: no generation.

    Reads ``out_dir/predictions/task.jsonl`` (answers and references), rewrites it with each
    record's ``preference`` and updates ``fa`` (= ``win_rate``), ``pairwise_judge`` and
    ``pairwise_judge_model`` in ``metrics.json`` (dropping ``fa_pending``); other metrics are kept.
    Both files are written atomically. Returns the metrics.
    """
    out = Path(out_dir)
    path = out / PREDICTIONS_DIR / "task.jsonl"
    if not path.is_file():
        raise LisaError(f"no saved task predictions at {path}: run the evaluation first")
    metrics_path = out / METRICS_FILE
    metrics = read_json(metrics_path) if metrics_path.is_file() else {}
    task = metrics.get("task")
    if task is not None and not get_task(task).pairwise:
        raise LisaError(f"{out}: task '{task}' is scored per answer, not by a pairwise judge; "
                        "pairwise judges apply to alpaca_eval runs")
    records = read_jsonl(path)
    if not records:
        raise LisaError(f"{path} holds no predictions: run the evaluation again")
    _check_references(records, str(path), "reference")
    judge_obj = _resolve_pairwise_judge(judge)
    preferences = judge_obj.compare([str(r["instruction"]) for r in records],
                                    [str(r.get("answer") or "") for r in records],
                                    [str(r["reference"]) for r in records])
    _apply_preferences(records, preferences, judge_obj.name)
    atomic_write_jsonl(path, records)
    metrics.pop("fa_pending", None)
    metrics.update(_pairwise_summary(records, judge_obj))
    atomic_write_json(metrics_path, metrics)
    return metrics
