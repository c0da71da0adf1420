"""Run one training stage (SFT, BSO or Lisa) from a stage's settings, through the Trainer."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import DataCollatorForSeq2Seq
from transformers.trainer_callback import PrinterCallback

from lisa_align.config import LisaSettings, StageSettings
from lisa_align.data.templates import IGNORE_INDEX, tokenize_rows
from lisa_align.data.tokenized_cache import tokenize_rows_cached
from lisa_align.io import append_jsonl
from lisa_align.models.lora import attach_lora
from lisa_align.training.callbacks import JsonlLogCallback, NonFiniteGuard, last_good_checkpoint
from lisa_align.training.ewc import EWCArguments, EWCTrainer
from lisa_align.training.lisa import LisaArguments, LisaTrainer
from lisa_align.training.sft import SFTTrainer, TrainArguments
from lisa_align.training.vaccine import VaccineArguments, VaccineTrainer

log = logging.getLogger(__name__)


def training_arguments(stage: StageSettings, output_dir: str | Path, *, seed: int, use_cpu: bool = False,
                       lisa: LisaSettings | None = None, ewc_lambda: float | None = None,
                       vaccine: tuple[float, bool] | None = None, save: bool = True) -> TrainArguments:
    common = dict(
        output_dir=str(output_dir), learning_rate=stage.lr, num_train_epochs=stage.epochs, max_steps=stage.max_steps,
        per_device_train_batch_size=stage.batch_size, gradient_accumulation_steps=stage.grad_accum,
        weight_decay=stage.weight_decay, lr_scheduler_type=stage.scheduler, warmup_steps=stage.warmup_ratio,  # a float < 1 is a ratio of the total steps
        max_grad_norm=stage.max_grad_norm, optim=stage.optim, loss_reduction=stage.loss_reduction, seed=seed,
        data_seed=seed, bf16=stage.bf16, logging_steps=stage.logging_steps, report_to=stage.report_to or "none",
        save_strategy="steps" if save else "no", save_steps=0.25 if save else 500, save_total_limit=1,
        save_only_model=False, use_cpu=use_cpu, disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, ddp_find_unused_parameters=False,
    )
    if ewc_lambda is not None:
        return EWCArguments(**common, ewc_lambda=ewc_lambda)
    if vaccine is not None:
        return VaccineArguments(**common, vaccine_rho=vaccine[0], vaccine_random=vaccine[1])
    if lisa is None:
        return TrainArguments(**common)
    return LisaArguments(**common, k1=lisa.k1, k2=lisa.k2, rho=lisa.rho,
                         proximal_warmup_ratio=lisa.proximal_warmup_ratio)


def _tokenized(rows, tokenizer, max_length: int, log_path, log_tag: str, part: str):
    """Tokenised rows through the disk cache; the time it took goes to the run log."""
    if not rows:
        return tokenize_rows(rows, tokenizer, max_length)
    ds, info = tokenize_rows_cached(rows, tokenizer, max_length)
    if log_path:
        from accelerate import PartialState

        if PartialState().is_main_process:
            append_jsonl(log_path, {"event": "tokenize", "stage": log_tag, "part": part, **info})
    return ds


def train_stage(model, tokenizer, rows: list[dict], stage: StageSettings, output_dir: str | Path, *,
                seed: int, max_length: int, lisa: LisaSettings | None = None, ewc_lambda: float | None = None,
                vaccine: tuple[float, bool] | None = None,
                alignment_rows: list[dict] | None = None, use_cpu: bool = False, log_path: str | Path | None = None, log_tag: str = "train",
                resume: bool = True, save_checkpoints: bool = True):
    """Train ``model`` on ``rows`` (and, for Lisa/BSO, ``alignment_rows``; for EWC they give the
    Fisher); returns the trained model
    (a PEFT model when ``stage.lora`` is set). Checkpoints go to ``output_dir`` and a run resumes
    from the newest one."""
    if stage.lora is not None:
        model = attach_lora(model, stage.lora)
    args = training_arguments(stage, output_dir, seed=seed, use_cpu=use_cpu, lisa=lisa, ewc_lambda=ewc_lambda,
                              vaccine=vaccine, save=save_checkpoints)
    train_ds = _tokenized(rows, tokenizer, max_length, log_path, log_tag, "train")
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    callbacks = [JsonlLogCallback(log_path, stage=log_tag)] if log_path else []
    callbacks.append(NonFiniteGuard(log_tag))  # after the log: the nan record reaches log.jsonl, then training stops
    kwargs = dict(model=model, args=args, train_dataset=train_ds, data_collator=collator,
                  processing_class=tokenizer, callbacks=callbacks)
    if ewc_lambda is not None:
        trainer = EWCTrainer(**kwargs, fisher_dataset=_tokenized(alignment_rows or [], tokenizer, max_length,
                                                                 log_path, log_tag, "fisher"))
    elif vaccine is not None:
        trainer = VaccineTrainer(**kwargs)
    elif lisa is None:
        trainer = SFTTrainer(**kwargs)
    else:
        align_ds = _tokenized(alignment_rows, tokenizer, max_length, log_path, log_tag,
                              "alignment") if alignment_rows else None
        trainer = LisaTrainer(**kwargs, alignment_dataset=align_ds)
    trainer.remove_callback(PrinterCallback)  # logs go to log.jsonl (and report_to), not stdout
    last = last_good_checkpoint(output_dir) if resume else None
    if last:
        log.info("resuming from %s", last)
        if log_path and trainer.is_world_process_zero():
            append_jsonl(log_path, {"event": "resume", "stage": log_tag, "checkpoint": str(last)})
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    return trainer.model, trainer
