"""Run one training stage through the Trainer: a defense's trainer and arguments on a stage's settings."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from accelerate import PartialState
from transformers import DataCollatorForSeq2Seq
from transformers.trainer_callback import PrinterCallback

from lisa_align.config import StageSettings
from lisa_align.data.templates import IGNORE_INDEX, PromptFormat, tokenize_rows
from lisa_align.data.tokenized_cache import tokenize_rows_cached
from lisa_align.defenses import SFT, Defense, load_class
from lisa_align.io import append_jsonl
from lisa_align.models.lora import attach_lora
from lisa_align.rundir import EVENT_RESUME, EVENT_TOKENIZE, LOG_EVENT, LOG_STAGE
from lisa_align.training.base import BaseArguments
from lisa_align.training.callbacks import JsonlLogCallback, NonFiniteGuard, last_good_checkpoint

log = logging.getLogger(__name__)


def training_arguments(stage: StageSettings, output_dir: str | Path, *, seed: int, use_cpu: bool = False,
                       defense: Defense | None = None, save: bool = True) -> BaseArguments:
    """The defense's TrainingArguments class with the stage's optimizer settings and its own."""
    defense = defense or SFT()
    cls = load_class(defense.arguments)
    return cls(
        output_dir=str(output_dir), learning_rate=stage.lr, num_train_epochs=stage.epochs, max_steps=stage.max_steps,
        per_device_train_batch_size=stage.batch_size, gradient_accumulation_steps=stage.grad_accum,
        weight_decay=stage.weight_decay, lr_scheduler_type=stage.scheduler, warmup_ratio=stage.warmup_ratio,
        max_grad_norm=stage.max_grad_norm, optim=stage.optim, loss_reduction=stage.loss_reduction, seed=seed,
        train_sampling_strategy="group_by_length" if stage.group_by_length else "random",
        data_seed=seed, bf16=stage.bf16, logging_steps=stage.logging_steps, report_to=stage.report_to or "none",
        save_strategy="steps" if save else "no", save_steps=0.25 if save else 500, save_total_limit=1,
        save_only_model=False, use_cpu=use_cpu, disable_tqdm=not _terminal(), remove_unused_columns=False,
        dataloader_num_workers=0, ddp_find_unused_parameters=False, **defense.training_arguments())


def _terminal() -> bool:
    """Whether progress bars belong on stderr: a terminal (logs and CI get the one-line stage records)."""
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true")


def _tokenized(rows, tokenizer, max_length: int, log_path, log_tag: str, part: str,
               prompt_format: PromptFormat | None = None):
    """Tokenised rows through the disk cache; the time it took goes to the run log."""
    if not rows:
        return tokenize_rows(rows, tokenizer, max_length, prompt_format)
    ds, info = tokenize_rows_cached(rows, tokenizer, max_length, fmt=prompt_format)
    if log_path and PartialState().is_main_process:
        append_jsonl(log_path, {LOG_EVENT: EVENT_TOKENIZE, LOG_STAGE: log_tag, "part": part, **info})
    return ds


def train_stage(model, tokenizer, rows: list[dict], stage: StageSettings, output_dir: str | Path, *,
                seed: int, max_length: int, defense: Defense | None = None,
                prompt_format: PromptFormat | None = None,
                data: Mapping[str, list[dict]] | None = None, use_cpu: bool = False,
                log_path: str | Path | None = None, log_tag: str = "train", resume: bool = True,
                save_checkpoints: bool = True, attach_adapter: bool = True):
    """Train ``model`` on ``rows`` with ``defense`` (default: plain SFT), a resolved
    :class:`~lisa_align.defenses.Defense`; the data it takes beside the rows (Lisa's alignment set,
    EWC's Fisher set) comes from ``data`` by role. Returns (the trained model, a PEFT model when
    ``stage.lora`` is set; the trainer). Checkpoints go to ``output_dir`` and a run resumes from the
    newest complete one. ``attach_adapter=False`` trains the adapter ``model`` already holds (the
    alignment LoRA, ``finetune.adapter: continue``) instead of attaching ``stage.lora``."""
    defense = defense or SFT()
    data = data or {}
    if stage.lora is not None and attach_adapter:
        model = attach_lora(model, stage.lora)
    args = training_arguments(stage, output_dir, seed=seed, use_cpu=use_cpu, defense=defense, save=save_checkpoints)
    train_ds = _tokenized(rows, tokenizer, max_length, log_path, log_tag, "train", prompt_format)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    callbacks = [JsonlLogCallback(log_path, stage=log_tag)] if log_path else []
    callbacks.append(NonFiniteGuard(log_tag))  # after the log: the nan record reaches log.jsonl, then training stops
    extra = {kw: _tokenized(data[role], tokenizer, max_length, log_path, log_tag, kw.removesuffix("_dataset"),
                            prompt_format)
             if data.get(role) else None for kw, role in defense.datasets.items()}
    trainer = load_class(defense.trainer)(model=model, args=args, train_dataset=train_ds, data_collator=collator,
                                          processing_class=tokenizer, callbacks=callbacks, **extra)
    trainer.remove_callback(PrinterCallback)  # logs go to log.jsonl (and report_to), not stdout
    last = last_good_checkpoint(output_dir) if resume else None
    if last:
        log.info("resuming from %s", last)
        if log_path and trainer.is_world_process_zero():
            append_jsonl(log_path, {LOG_EVENT: EVENT_RESUME, LOG_STAGE: log_tag, "checkpoint": str(last)})
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    return trainer.model, trainer
