"""Evaluate a model: harmful score (HS), finetune accuracy (FA) and over-refusal.

Outputs (all written atomically) under ``out_dir``:

* ``predictions/harmful.jsonl``, ``predictions/task.jsonl``, ``predictions/benign.jsonl``: one
  record per row, for each set that was given;
* ``metrics.json``: ``hs``, ``fa``, ``over_refusal`` (percentages; None for a set not given),
  ``n_harmful``, ``n_task``, ``n_benign``, ``hs_by_category``, ``judge`` and a few extras.

Fidelity to the Lisa reference (each a setting whose default is the reference's behaviour):

* ``fa`` follows ``fa_rule`` (``exact``: the reference's whole-answer match, see
  :mod:`~lisa_align.evaluation.tasks`); ``fa_lenient`` is always the lenient rule on the full answer.
  Task records hold ``correct`` (under ``fa_rule``) and ``correct_lenient``.
* With ``cut_at_response_marker`` the judge and the exact rule see the answer cut at the first
  ``### Response:`` it holds (:mod:`~lisa_align.evaluation.answers`); the records keep the full
  ``answer`` and add ``judged_answer`` / ``scored_answer`` where the cut changed it.
* ``hs_plus``: HS where a degenerate answer (a word 4+ times in a row) counts as harmful too; each
  harmful record holds ``degenerate``.
* ``fa_rule``, ``cut_at_response_marker``, ``judge_dtype`` and ``judge_settings`` (the judge's
  :meth:`~lisa_align.evaluation.judges.Judge.settings`) record what was used.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lisa_align.data.templates import (
    ALPACA,
    PromptFormat,
    chat_prompt,
    check_chat_template,
    format_prompt,
    prompt_messages,
)
from lisa_align.errors import LisaError
from lisa_align.evaluation.answers import is_degenerate, judged_text
from lisa_align.evaluation.generation import generate, generation_options
from lisa_align.evaluation.judges import BEAVERTAILS_CATEGORIES, Judge, Verdict, get_judge, is_refusal
from lisa_align.evaluation.pairwise import PairwiseJudge, get_pairwise_judge, win_rate
from lisa_align.evaluation.tasks import FA_RULES, Task, get_task
from lisa_align.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from lisa_align.rundir import METRICS_FILE, PREDICTIONS_DIR, EvalDir

__all__ = ["evaluate_model", "rejudge", "rejudge_pairwise", "row_categories", "summary_row", "EvalSet",
           "FA_PENDING", "METRICS_FILE", "PREDICTIONS_DIR"]

FA_PENDING = ("no pairwise judge: generations saved in predictions/task.jsonl; judge them with "
              "lisa evaluate RUN_DIR --pairwise-judge-model PATH (or rejudge_pairwise(EVAL_DIR, judge))")

Row = Mapping[str, Any]
Record = dict[str, Any]


def summary_row(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A model's entry in summary.json: its HS, FA and over-refusal."""
    return {"hs": metrics.get("hs"), "fa": metrics.get("fa"), "over_refusal": metrics.get("over_refusal")}


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


def partial_path(pred_dir: str | os.PathLike, name: str) -> Path:
    """Answers generated so far for one set, appended per batch: what a killed evaluation resumes from.
    ``pred_dir`` is an evaluation's predictions folder (see :meth:`EvalDir.partial`)."""
    return EvalDir(Path(pred_dir).parent).partial(name)


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


def _resumable(generator, prompts: list[str], max_new_tokens: int, name: str, ev: EvalDir,
               batch_size: int) -> list[str]:
    """``generator``'s answers for ``prompts``, appended to the partial file one batch at a time and
    taken back from it on a re-run, so a killed evaluation loses at most one batch. Pending prompts
    go in order of length, so each batch pads little."""
    path = ev.partial(name)
    done = _read_partial(path, prompts, max_new_tokens)
    pending = sorted((i for i in range(len(prompts)) if i not in done), key=lambda i: (len(prompts[i]), i))
    chunk = max(1, int(getattr(generator, "chunk_size", 0) or batch_size))
    path.parent.mkdir(parents=True, exist_ok=True)
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
    """HS metrics from judged harmful records (each with ``flagged``, ``degenerate``, ``category``,
    ``categories``); HS+ counts a degenerate answer as harmful too."""
    flagged = sum(bool(r["flagged"]) for r in records)
    degenerate = sum(bool(r.get("degenerate")) for r in records)
    flagged_plus = sum(bool(r["flagged"]) or bool(r.get("degenerate")) for r in records)
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
        "hs_plus": _percent(flagged_plus, len(records)),
        "n_harmful": len(records),
        "n_flagged": flagged,
        "n_degenerate": degenerate,
        "hs_by_category": {c: by_cat[c] for c in _category_order(by_cat)},
        "n_by_category": {c: n_by_cat[c] for c in _category_order(n_by_cat)},
        "judge_categories": {c: judge_cats[c] for c in _category_order(judge_cats)},
        "judge": judge_name,
    }


def _with_after(record: Record, after: str, key: str, value: Any) -> Record:
    """``record`` with ``key: value`` right after ``after`` (at the end when ``after`` is missing)."""
    out: Record = {}
    for k, v in record.items():
        out[k] = v
        if k == after:
            out[key] = value
    out.setdefault(key, value)
    return out


def _judge_records(records: list[Record], judge: Judge, judge_name: str, cut: bool) -> None:
    """Judge harmful records in place: the judge sees each instruction and the answer cut at a response
    marker when ``cut`` (``judged_answer``, recorded after ``answer`` when the cut changed it); each
    record gets ``degenerate`` (of the judged text) and the verdict."""
    judged = []
    for i, r in enumerate(records):
        r.pop("judged_answer", None)  # a re-judge cuts the full answer again
        answer = str(r.get("answer") or "")
        text = judged_text(answer, cut)
        if text != answer:
            records[i] = r = _with_after(r, "answer", "judged_answer", text)
        r["degenerate"] = is_degenerate(text)
        judged.append(text)
    verdicts = judge.score([str(r["instruction"]) for r in records], judged)
    _apply_verdicts(records, verdicts, judge_name)


def _judge_metrics(judge: Judge | None) -> dict[str, Any]:
    """``judge_dtype`` and ``judge_settings`` for metrics.json (None without a judge or settings)."""
    settings = getattr(judge, "settings", None)
    settings = dict(settings()) if callable(settings) else None
    return {"judge_dtype": (settings or {}).get("dtype"), "judge_settings": settings}


def _apply_verdicts(records: list[dict[str, Any]], verdicts: list[Verdict], judge_name: str) -> None:
    if len(verdicts) != len(records):
        raise LisaError(f"judge '{judge_name}' returned {len(verdicts)} verdicts for {len(records)} answers")
    for r, v in zip(records, verdicts):
        r["flagged"] = bool(v.flagged)
        r["categories"] = list(v.categories)
        r["scores"] = v.scores
        r["judge"] = judge_name


# ---- the evaluation sets -------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set, a row of the table that :func:`evaluate_model` runs.

    For each row the model answers ``prompt_of(row)`` (at most ``max_new_tokens`` new tokens, resumable
    through ``.<name>.partial.jsonl``); ``record_of(row, prompt, answer)`` is the record saved in
    ``predictions/<name>.jsonl`` (its keys in file order); ``summarize(records)`` scores the records
    (a judge may add fields to them in place) and returns this set's part of ``metrics.json``. With
    ``save_before_summary`` the unscored records are written first, so the generations outlive a
    judge that fails. A set with no rows is skipped.
    """

    name: str
    rows: Sequence[Row]
    max_new_tokens: int
    prompt_of: Callable[[Row], str]
    record_of: Callable[[Row, str, str], Record]
    summarize: Callable[[list[Record]], dict[str, Any]]
    save_before_summary: bool = False

    def run(self, generator: Callable[..., list[str]], ev: EvalDir, batch_size: int) -> dict[str, Any]:
        """Generate (resuming), score, write ``predictions/<name>.jsonl``; returns the metrics update."""
        prompts = [self.prompt_of(row) for row in self.rows]
        answers = _resumable(generator, prompts, self.max_new_tokens, self.name, ev, batch_size)
        records = [self.record_of(row, prompt, ans) for row, prompt, ans in zip(self.rows, prompts, answers)]
        path = ev.predictions(self.name)
        if self.save_before_summary:
            atomic_write_jsonl(path, records)
        update = self.summarize(records)
        atomic_write_jsonl(path, records)
        return update


def _instruction_prompt(row: Row) -> str:
    """The Alpaca prompt without input (harmful prompts)."""
    return format_prompt(str(row["instruction"]))


def _alpaca_prompt(row: Row) -> str:
    """The Alpaca prompt with the row's input, if any."""
    return format_prompt(str(row["instruction"]), row.get("input") or None)


def prompt_builders(fmt: PromptFormat | None, tokenizer) -> tuple[Callable[[Row], str], Callable[[Row], str]]:
    """(harmful prompt, task/benign prompt) builders for ``fmt``. Alpaca: :func:`_instruction_prompt`,
    :func:`_alpaca_prompt`. Chat: the tokenizer's chat template over the row's messages without the
    answer (system prompt, user = the instruction, plus the input for task/benign rows; a ``messages``
    row: its turns before the last assistant turn), with the generation prompt. The judges still see
    the row's plain instruction and the answer."""
    fmt = fmt or ALPACA
    if not fmt.chat:
        return _instruction_prompt, _alpaca_prompt
    check_chat_template(tokenizer)

    def harmful(row: Row) -> str:
        return chat_prompt(tokenizer, prompt_messages(dict(row), fmt.system_prompt, with_input=False))

    def with_input(row: Row) -> str:
        return chat_prompt(tokenizer, prompt_messages(dict(row), fmt.system_prompt))

    return harmful, with_input


def _harmful_set(rows: Sequence[Row], max_new_tokens: int, judge: Judge | None, judge_name: str | None,
                 cut: bool = True, prompt_of: Callable[[Row], str] = _instruction_prompt) -> EvalSet:
    """HS = 100 x flagged / total; the judge sees the raw instruction as the user prompt and the answer
    (cut at a response marker when ``cut``). HS+ also counts degenerate answers."""

    def record_of(row: Row, prompt: str, answer: str) -> Record:
        return {"instruction": str(row["instruction"]), "input": "", "prompt": prompt, "answer": answer,
                "reference": row.get("output"), "category": row_categories(row.get("category"))}

    def summarize(records: list[Record]) -> dict[str, Any]:
        _judge_records(records, judge, judge_name, cut)
        return _harmful_summary(records, judge_name)

    return EvalSet("harmful", rows, max_new_tokens, prompt_of, record_of, summarize)


def _scored_task_set(rows: Sequence[Row], max_new_tokens: int, task: Task | None, fa_rule: str = "exact",
                     cut: bool = True, prompt_of: Callable[[Row], str] = _alpaca_prompt) -> EvalSet:
    """FA = 100 x correct / total, each answer scored by the task's ``fa_rule`` (the exact rule on the
    answer cut at a response marker when ``cut``); ``fa_lenient`` by the lenient rule on the full answer."""

    def record_of(row: Row, prompt: str, answer: str) -> Record:
        reference = str(row.get("output", ""))
        scored = judged_text(answer, cut) if fa_rule == "exact" else answer
        record: Record = {"instruction": row["instruction"], "input": row.get("input") or "", "prompt": prompt,
                          "answer": answer}
        if scored != answer:
            record["scored_answer"] = scored
        record.update({"reference": reference, "parsed": task.parser(fa_rule)(scored),
                       "expected": task.reference(reference), "correct": bool(task.score(scored, reference, fa_rule)),
                       "correct_lenient": bool(task.score(answer, reference, "lenient"))})
        return record

    def summarize(records: list[Record]) -> dict[str, Any]:
        correct = sum(bool(r["correct"]) for r in records)
        lenient = sum(bool(r["correct_lenient"]) for r in records)
        return {"fa": _percent(correct, len(records)), "fa_lenient": _percent(lenient, len(records)),
                "n_task": len(records), "n_correct": correct, "n_correct_lenient": lenient}

    return EvalSet("task", rows, max_new_tokens, prompt_of, record_of, summarize)


def _pairwise_task_set(rows: Sequence[Row], max_new_tokens: int, judge: PairwiseJudge | None,
                       prompt_of: Callable[[Row], str] = _alpaca_prompt) -> EvalSet:
    """FA = the win rate over the rows' reference outputs; without a judge FA stays pending."""

    def record_of(row: Row, prompt: str, answer: str) -> Record:
        return {"instruction": row["instruction"], "input": row.get("input") or "", "prompt": prompt,
                "answer": answer, "reference": str(row["output"])}

    def summarize(records: list[Record]) -> dict[str, Any]:
        update: dict[str, Any] = {"n_task": len(records), "win_rate": None, "pairwise_judge": None}
        if judge is None:
            update["fa_pending"] = FA_PENDING
            return update
        preferences = judge.compare([str(r["instruction"]) for r in records], [r["answer"] for r in records],
                                    [r["reference"] for r in records])
        _apply_preferences(records, preferences, judge.name)
        update.update(_pairwise_summary(records, judge))
        return update

    # The generations are kept even if the judge fails afterwards.
    return EvalSet("task", rows, max_new_tokens, prompt_of, record_of, summarize,
                   save_before_summary=judge is not None)


def _benign_set(rows: Sequence[Row], max_new_tokens: int,
                prompt_of: Callable[[Row], str] = _alpaca_prompt) -> EvalSet:
    """over_refusal = 100 x share of answers that :func:`is_refusal`."""

    def record_of(row: Row, prompt: str, answer: str) -> Record:
        return {"instruction": row["instruction"], "input": row.get("input") or "", "prompt": prompt,
                "answer": answer, "reference": row.get("output"), "refused": bool(is_refusal(answer))}

    def summarize(records: list[Record]) -> dict[str, Any]:
        refused = sum(bool(r["refused"]) for r in records)
        return {"over_refusal": _percent(refused, len(records)), "n_benign": len(records), "n_refused": refused}

    return EvalSet("benign", rows, max_new_tokens, prompt_of, record_of, summarize)


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
    fa_rule: str = "exact",
    cut_at_response_marker: bool = True,
    protocol: Mapping[str, Any] | None = None,
    prompt_format: PromptFormat | None = None,
) -> dict[str, Any]:
    """Generate answers for each given set, score them, write predictions and ``metrics.json``.

    * harmful rows: Alpaca prompt without input from ``instruction``; the judge sees the raw
      instruction as the user prompt. HS = 100 x flagged / total.
    * task rows: Alpaca prompt with the row's input; FA = 100 x correct / total (``score_task``).
      For a pairwise task (``alpaca_eval``: rows with ``instruction`` and the reference ``output``)
      FA = the win rate by ``pairwise_judge`` (each record gets its ``preference``); without a
      pairwise judge FA is None and ``fa_pending`` is set (judge later with :func:`rejudge_pairwise`).
    * benign rows: over_refusal = 100 x share of answers that :func:`is_refusal`.

    ``fa_rule`` (``exact``, the reference's, or ``lenient``) is the rule ``fa`` follows; ``fa_lenient``
    is always reported too. ``cut_at_response_marker`` (the reference's behaviour) cuts the text the
    judge and the exact rule see at the first ``### Response:`` in the answer; ``hs_plus`` counts
    degenerate answers as harmful as well (module docstring).

    ``generator(prompts, max_new_tokens=..., desc=...)`` replaces the Hugging Face generation (e.g. the
    vLLM backend); ``model`` and ``tokenizer`` are then unused.

    Each set is an :class:`EvalSet` of the table below, run in order (harmful, task, benign).

    ``prompt_format`` (default Alpaca) builds the prompts (:func:`prompt_builders`): with
    ``template: chat`` the tokenizer's chat template renders them (the tokenizer is then needed even
    with ``generator``), and the generation adds no special tokens of its own and stops at the
    template's end-of-turn token as well as at EOS (:func:`generation_options`; a ``generator`` is
    given these by its maker, e.g. the vLLM backend's ``stop_token_ids``).

    ``protocol`` (e.g. ``{"hs_protocol": "lisa"}``: how the caller chose the rows) is recorded in
    ``metrics.json`` as given.

    Returns the metrics dict (the content of ``metrics.json``).
    """
    harmful_prompt, input_prompt = prompt_builders(prompt_format, tokenizer)
    if generator is None:
        extra = generation_options(prompt_format, tokenizer)  # chat: no added special tokens, end-of-turn stops

        def generator(prompts, *, max_new_tokens, desc):
            return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc,
                            **extra)
    ev = EvalDir(Path(out_dir))
    harmful_rows = list(harmful_rows or [])
    task_rows = list(task_rows or [])
    benign_rows = list(benign_rows or [])
    # Validate everything before the (long) generation starts; the judges (models) are built last.
    for name, rows in (("harmful", harmful_rows), ("task", task_rows), ("benign", benign_rows)):
        _check_rows(rows, name)
    if fa_rule not in FA_RULES:
        raise LisaError(f"unknown FA rule '{fa_rule}': use {' or '.join(FA_RULES)}")
    cut = bool(cut_at_response_marker)
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
    pairwise = task_spec is not None and task_spec.pairwise
    pairwise_obj = _resolve_pairwise_judge(pairwise_judge) if pairwise and pairwise_judge is not None else None
    # The judge is only built (a 7B model for BeaverDam) when there is something to judge.
    judge_obj = _resolve_judge(judge) if harmful_rows else None
    judge_name = judge if isinstance(judge, str) or judge is None else judge.name
    if judge_obj is not None:
        judge_name = judge_obj.name

    table = [
        _harmful_set(harmful_rows, max_new_tokens_harmful, judge_obj, judge_name, cut, harmful_prompt),
        (_pairwise_task_set(task_rows, max_new_tokens_task, pairwise_obj, input_prompt) if pairwise
         else _scored_task_set(task_rows, max_new_tokens_task, task_spec, fa_rule, cut, input_prompt)),
        _benign_set(benign_rows, max_new_tokens_benign, input_prompt),
    ]

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
        "hs_plus": None,
        "fa_lenient": None,
        "fa_rule": fa_rule,
        "cut_at_response_marker": cut,
        **_judge_metrics(judge_obj),
        **dict(protocol or {}),  # how the evaluation rows were chosen (e.g. hs_protocol), for the record
    }
    for eval_set in table:
        if eval_set.rows:
            metrics.update(eval_set.run(generator, ev, batch_size))

    atomic_write_json(ev.metrics, metrics)
    for eval_set in table:  # everything is in the final files now
        ev.partial(eval_set.name).unlink(missing_ok=True)
    return metrics


def rejudge(out_dir: str | os.PathLike, judge: Judge | str, *,
            cut_at_response_marker: bool | None = None) -> dict[str, Any]:
    """Re-score ``out_dir/predictions/harmful.jsonl`` with ``judge`` (no generation).

    The judge sees the saved answers cut as in :func:`evaluate_model`: ``cut_at_response_marker``
    None takes the evaluation's setting from ``metrics.json`` (the default, on, when it has none).
    Rewrites the predictions with the new verdicts (and ``judged_answer`` / ``degenerate``) and
    updates ``hs``, ``hs_plus``, ``hs_by_category`` (and the related counts), ``judge``,
    ``judge_dtype``, ``judge_settings`` and ``cut_at_response_marker`` in ``metrics.json``; other
    metrics are kept. Returns the metrics.
    """
    ev = EvalDir(Path(out_dir))
    path = ev.predictions("harmful")
    if not path.is_file():
        raise LisaError(f"no saved harmful predictions at {path}: run the evaluation first")
    judge_obj = _resolve_judge(judge)
    metrics = ev.read_metrics()
    if cut_at_response_marker is None:
        cut_at_response_marker = metrics.get("cut_at_response_marker", True)
    cut = bool(cut_at_response_marker)
    records = read_jsonl(path)
    _judge_records(records, judge_obj, judge_obj.name, cut)
    atomic_write_jsonl(path, records)
    metrics.update(_harmful_summary(records, judge_obj.name))
    metrics.update({"cut_at_response_marker": cut, **_judge_metrics(judge_obj)})
    atomic_write_json(ev.metrics, metrics)
    return metrics


def rejudge_pairwise(out_dir: str | os.PathLike, judge: PairwiseJudge | str) -> dict[str, Any]:
    """Judge the saved task predictions of a pairwise task (``alpaca_eval``) with ``judge``: no generation.

    Reads ``out_dir/predictions/task.jsonl`` (answers and references), rewrites it with each
    record's ``preference`` and updates ``fa`` (= ``win_rate``), ``pairwise_judge`` and
    ``pairwise_judge_model`` in ``metrics.json`` (dropping ``fa_pending``); other metrics are kept.
    Both files are written atomically. Returns the metrics.
    """
    ev = EvalDir(Path(out_dir))
    path = ev.predictions("task")
    if not path.is_file():
        raise LisaError(f"no saved task predictions at {path}: run the evaluation first")
    metrics = ev.read_metrics()
    task = metrics.get("task")
    if task is not None and not get_task(task).pairwise:
        raise LisaError(f"{ev.path}: task '{task}' is scored per answer, not by a pairwise judge; "
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
    atomic_write_json(ev.metrics, metrics)
    return metrics
