"""The run folder: every path in it and every key that ``log.jsonl`` carries, in one place.

::

    RUN_DIR/config.yaml                  the resolved config
    RUN_DIR/aligned/                     the aligned model (LoRA merged; safetensors) + tokenizer
    RUN_DIR/aligned/alignment_adapter/   the alignment LoRA unmerged (finetune.adapter: continue)
    RUN_DIR/finetune/<key>/adapter/      the fine-tuned adapter (or full model)
    RUN_DIR/finetune/<key>/trainer/      Trainer checkpoints (resume)
    RUN_DIR/finetune/<key>/<artifact>    a defense's extra files (Lisa: lisa_switches.json)
    RUN_DIR/post/<key>+<post>/adapter/   a post defense's result for method <key> (same form as the
                                         fine-tuned adapter/: a LoRA adapter or a full model)
    RUN_DIR/post/<key>+<post>/post.json  what the post defense did (Antidote: weights pruned; SafeLoRA:
                                         the cosine of each layer and those projected)
    RUN_DIR/eval/<model>/predictions/    {harmful,task,benign}.jsonl (+ .<set>.partial.jsonl while running)
    RUN_DIR/eval/<model>/metrics.json
    RUN_DIR/summary.json                 {"<model>": {"hs", "fa", "over_refusal"}}
    RUN_DIR/log.jsonl                    one JSON object per line (see the ``LOG_*`` / ``EVENT_*`` names)
    RUN_DIR/.lock, .lock.owner           held while a run writes here; .owner: its pid and host
                                         (lisa_align.locks; removed when the run ends)
    RUN_DIR/gate.json                    the release gate's verdicts (``lisa gate``, or a run with ``gate:``)
    RUN_DIR/release/<key>/               a copy of the adapter/ of each model that passed the gate (a run with
                                         ``gate:``); release/gate.json: the verdicts the release followed,
                                         written last (release/ is complete when it is there);
                                         release/WITHHELD.json: the models that failed, with the reasons
                                         (only when one did)

The pipeline, sweep, report, ``lisa evaluate`` and the evaluator go through :class:`RunDir` and
:class:`EvalDir`; nothing else spells these names. The layout has only grown since the first release
(``post/`` arrived with the post-fine-tuning stage), so every run folder written so far reads the same
way. A post-processed model is evaluated under its key, ``eval/<key>+<post>/``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
PREDICTIONS_DIR = "predictions"
ALIGNED_DIR = "aligned"
SHARED_ALIGNED_DIR = "_aligned"  # a sweep's aligned models, shared by its runs
ALIGNMENT_ADAPTER_DIR = "alignment_adapter"  # inside the aligned model's folder: its LoRA, before the merge

# ---- log.jsonl: the keys of its records ----------------------------------------------------------
LOG_EVENT = "event"  # bookkeeping records carry an event name; training records carry "stage" + "step"
LOG_STAGE = "stage"  # "align", "finetune/<key>", "post/<key>+<post>"
LOG_STEP = "step"
LOG_SECONDS = "seconds"
EVENT_MODEL = "model"  # trust_remote_code, allow_pickle, model
EVENT_DATA = "data"  # row counts of every data set
EVENT_STAGE_DONE = "stage_done"  # stage, seconds
EVENT_TOKENIZE = "tokenize"  # stage, part, rows, seconds, cached
EVENT_RESUME = "resume"  # stage, checkpoint
EVENT_POST = "post"  # stage, defense, and the post defense's record (post.json) less its per-layer details
EVENT_WAIT = "wait"  # stage ("base", "align", "answers"), seconds, lock, holder: this run waited for another
#   process that was building a shared artifact, then reused it (lisa_align.locks)
POST_DIR = "post"
GATE_FILE = "gate.json"
RELEASE_DIR = "release"
WITHHELD_FILE = "WITHHELD.json"
POST_RECORD = "post.json"
LISA_STEP = "lisa/step"
LISA_DRIFT = "lisa/drift"


def finetune_stage(key: str) -> str:
    """The ``stage`` value of a fine-tuning method's log records."""
    return f"finetune/{key}"


def post_stage(key: str) -> str:
    """The ``stage`` value of a post-processed model's log records (``key``: ``<method>+<post>``)."""
    return f"{POST_DIR}/{key}"


@dataclass(frozen=True)
class EvalDir:
    """``RUN_DIR/eval/<model>``: one evaluated model's predictions and metrics."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def predictions_dir(self) -> Path:
        return self.path / PREDICTIONS_DIR

    def predictions(self, eval_set: str) -> Path:
        return self.predictions_dir / f"{eval_set}.jsonl"

    def partial(self, eval_set: str) -> Path:
        """Answers generated so far for one set, appended per batch: what a killed evaluation resumes from."""
        return self.predictions_dir / f".{eval_set}.partial.jsonl"

    def read_metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics.read_text(encoding="utf-8")) if self.metrics.is_file() else {}


@dataclass(frozen=True)
class RunDir:
    """One run folder (``output_dir/name``)."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    # ---- files at the top ----
    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def log(self) -> Path:
        return self.path / LOG_FILE

    @property
    def aligned(self) -> Path:
        """Where the aligned model goes unless ``align.output_dir`` names another folder."""
        return self.path / ALIGNED_DIR

    def is_finished(self) -> bool:
        return self.summary.is_file()

    # ---- fine-tuning ----
    def finetune(self, key: str) -> Path:
        return self.path / "finetune" / key

    def adapter(self, key: str) -> Path:
        return self.finetune(key) / "adapter"

    def trainer(self, key: str) -> Path:
        return self.finetune(key) / "trainer"

    def artifact(self, key: str, name: str) -> Path:
        return self.finetune(key) / name

    # ---- post-fine-tuning ----
    def post(self, key: str) -> Path:
        """``post/<key>``, ``key`` a post-processed model's (``<method>+<post>``): complete or absent."""
        return self.path / POST_DIR / key

    def post_adapter(self, key: str) -> Path:
        return self.post(key) / "adapter"

    def post_record(self, key: str) -> Path:
        return self.post(key) / POST_RECORD

    # ---- the release gate ----
    @property
    def gate(self) -> Path:
        """``gate.json``: the release gate's verdicts."""
        return self.path / GATE_FILE

    @property
    def release_root(self) -> Path:
        return self.path / RELEASE_DIR

    def release(self, key: str) -> Path:
        """``release/<key>``: the released copy of a model's ``adapter/`` (fine-tuned or post-processed)."""
        return self.release_root / key

    @property
    def release_gate(self) -> Path:
        """``release/gate.json``: the verdicts the release followed (written last)."""
        return self.release_root / GATE_FILE

    @property
    def withheld(self) -> Path:
        """``release/WITHHELD.json``: the models the gate withheld and why (only when one failed)."""
        return self.release_root / WITHHELD_FILE

    # ---- evaluation ----
    @property
    def eval_root(self) -> Path:
        return self.path / "eval"

    def eval(self, model: str) -> EvalDir:
        return EvalDir(self.eval_root / model)

    def evaluated(self) -> list[EvalDir]:
        """Every ``eval/<model>`` folder, sorted by name."""
        root = self.eval_root
        return [EvalDir(p) for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []

    # ---- the log ----
    def log_records(self) -> Iterator[dict[str, Any]]:
        """The records of ``log.jsonl``; a torn last line (a killed run) is skipped."""
        if not self.log.is_file():
            return
        for line in self.log.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                yield rec


def find_runs(root: str | Path) -> tuple[list[RunDir], list[RunDir]]:
    """(finished run folders, unfinished ones) below ``root``: a run folder holds ``config.yaml``;
    shared aligned models and hidden folders are skipped."""
    root = Path(root)
    done, pending = [], []
    for cfg in sorted(root.rglob(CONFIG_FILE)):
        run = RunDir(cfg.parent)
        if any(part.startswith((SHARED_ALIGNED_DIR, ".")) for part in run.path.relative_to(root).parts):
            continue
        (done if run.is_finished() else pending).append(run)
    return done, pending
