"""align → finetune (each method) → evaluate, in one run directory.

Run directory::

    config.yaml            the resolved config
    aligned/               the aligned model, LoRA merged (safetensors) + tokenizer
    finetune/<method>/     adapter/ (safetensors; or a full model), trainer/ (checkpoints)
    eval/<model>/          predictions/*.jsonl, metrics.json
    summary.json           {"<model>": {"hs", "fa", "over_refusal"}}
    log.jsonl              training logs (loss, lr, Lisa switches) and stage timings

A stage's output folder appears only when the stage is finished (it is written under a temporary
name and renamed), so a re-run reuses every finished stage and redoes only the rest; an unfinished
training stage resumes from its newest Trainer checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import yaml

from lisa_align.config import MethodSpec, RunConfig, config_to_dict
from lisa_align.data.mixing import mix_harmful, remove_overlap
from lisa_align.data.sources import load_rows
from lisa_align.errors import LisaError
from lisa_align.io import append_jsonl, atomic_write_json, atomic_write_yaml, read_json

log = logging.getLogger(__name__)
DIST_TIMEOUT_HOURS = 12


@dataclass
class RunData:
    user: list[dict]
    alignment: list[dict]
    eval_harmful: list[dict]
    eval_task: list[dict]
    eval_benign: list[dict] = field(default_factory=list)
    dropped_overlap: dict[str, int] = field(default_factory=dict)


def load_run_data(cfg: RunConfig) -> RunData:
    d = cfg.data
    benign = load_rows(d.user)
    harmful = load_rows(d.harmful)
    user = mix_harmful(benign, harmful, n=d.n, p=d.p, seed=cfg.seed,
                       benign_name=d.user.describe(), harmful_name=d.harmful.describe())
    alignment = [r for spec in d.alignment for r in load_rows(spec)]
    train = user + alignment
    out = RunData(user=user, alignment=alignment, eval_harmful=[], eval_task=[])
    for name, spec in (("harmful", cfg.eval.harmful), ("task", cfg.eval.task), ("benign", cfg.eval.benign)):
        if spec is None:
            continue
        rows, dropped = remove_overlap(load_rows(spec), train)
        setattr(out, f"eval_{name}", rows)
        out.dropped_overlap[name] = dropped
    return out


def _device(cfg: RunConfig) -> str:
    return "cuda" if torch.cuda.is_available() and not cfg.use_cpu else "cpu"


def _use_cpu(cfg: RunConfig) -> bool:
    return cfg.use_cpu or not torch.cuda.is_available()


class Pipeline:
    """The run's stages. Under ``accelerate launch`` (or torchrun) every process trains, through the
    Trainer's data parallelism; the main process alone writes files and evaluates, and the others
    wait for it at the end of each stage."""

    def __init__(self, cfg: RunConfig, *, force: bool = False, echo=print):
        from accelerate import PartialState

        self.cfg = cfg
        self.run_dir = cfg.run_dir
        # The process group when launched on several processes. Its timeout covers the main process's
        # evaluation, which the others wait for (generation with a 7B model can take over an hour).
        self.dist = PartialState(cpu=_use_cpu(cfg), timeout=timedelta(hours=DIST_TIMEOUT_HOURS))
        self.is_main = self.dist.is_main_process
        self.echo = echo if self.is_main else (lambda *a, **k: None)
        self.log_path = self.run_dir / "log.jsonl"
        self._data: RunData | None = None
        self._check_config(force)
        m = cfg.model
        self._log({"event": "model", "trust_remote_code": m.trust_remote_code, "allow_pickle": m.allow_pickle,
                   "model": m.name})

    # ---- bookkeeping ------------------------------------------------------------------------
    def _check_config(self, force: bool) -> None:
        diff = config_diff(self.cfg)
        if diff and not force:
            raise LisaError(f"{self.run_dir} holds a run with a different config ({'; '.join(diff[:5])}); "
                            "use another name/output_dir, or --force to reuse its finished stages anyway")
        if self.is_main:
            atomic_write_yaml(self.run_dir / "config.yaml", config_to_dict(self.cfg))

    def _log(self, record: dict) -> None:
        if self.is_main:
            append_jsonl(self.log_path, record)

    def _timed(self, stage: str, t0: float) -> None:
        dt = time.time() - t0
        self._log({"event": "stage_done", "stage": stage, "seconds": round(dt, 2)})
        self.echo(f"[lisa] {stage}: {dt:.1f}s")

    @property
    def data(self) -> RunData:
        if self._data is None:
            self._data = load_run_data(self.cfg)
            self._log({"event": "data", "user": len(self._data.user),
                                         "harmful_in_user": sum(r["harmful"] for r in self._data.user),
                                         "alignment": len(self._data.alignment),
                                         "eval_harmful": len(self._data.eval_harmful),
                                         "eval_task": len(self._data.eval_task),
                                         "eval_benign": len(self._data.eval_benign),
                                         "eval_rows_dropped_as_overlap": self._data.dropped_overlap})
        return self._data

    # ---- models -----------------------------------------------------------------------------
    def base_path(self) -> str:
        m = self.cfg.model
        if m.name != "tiny":
            return m.name
        from lisa_align.models.tiny import build_tiny_base

        t0 = time.time()
        path = build_tiny_base(m.tiny, seed=self.cfg.seed, cache_dir=m.cache_dir, use_cpu=_use_cpu(self.cfg))
        if time.time() - t0 > 1:
            self._timed("base (tiny, built and cached)", t0)
        return str(path)

    def _load(self, path: str):
        from lisa_align.models.loading import load_model_and_tokenizer

        return load_model_and_tokenizer(path, dtype=self.cfg.model.dtype,
                                        trust_remote_code=self.cfg.model.trust_remote_code,
                                        allow_pickle=self.cfg.model.allow_pickle)

    def aligned_path(self) -> str:
        if not self.cfg.align.enabled:
            return self.base_path()
        out = Path(self.cfg.align.output_dir) if self.cfg.align.output_dir else self.run_dir / "aligned"
        if (out / "config.json").exists():
            return str(out)
        from lisa_align.models.lora import merge
        from lisa_align.training.run import train_stage

        base = self.base_path()  # timed on its own when the tiny base is built
        t0 = time.time()
        self.echo(f"[lisa] align ({self.cfg.align.method}): {len(self.data.alignment)} rows x {self.cfg.align.epochs} epochs")
        model, tok = self._load(base)
        work = out.parent / f".{out.name}.trainer"
        a = self.cfg.align
        vaccine = None if a.method == "sft" else (a.vaccine_rho, a.method == "random_vaccine")
        model, _ = train_stage(model, tok, self.data.alignment, self.cfg.align, work, vaccine=vaccine,
                               seed=self.cfg.seed, max_length=self.cfg.data.max_length, use_cpu=_use_cpu(self.cfg),
                               log_path=self.log_path, log_tag="align")
        if self.is_main:
            _save_atomically(out, merge(model), tok)
            shutil.rmtree(work, ignore_errors=True)
        self.dist.wait_for_everyone()
        self._timed("align", t0)
        return str(out)

    def finetune(self, method: MethodSpec) -> Path:
        root = self.run_dir / "finetune" / method.key
        out = root / "adapter"
        if out.exists():
            return out
        from lisa_align.training.run import train_stage

        start = self.start_path(method)
        t0 = time.time()
        model, tok = self._load(start)
        lisa = method.lisa(self.cfg.finetune.lisa)
        rows = self.data.user
        m = method.vlguard_rows
        if m is not None:
            if m > len(self.data.alignment):
                raise LisaError(f"method '{method.key}': alignment_rows={m} but the alignment data has "
                                f"{len(self.data.alignment)} rows; lower alignment_rows or add alignment data")
            rows = rows + [dict(r, harmful=False) for r in self.data.alignment[:m]]
        self.echo(f"[lisa] finetune {method.key}: {len(rows)} rows (n={len(self.data.user)}, p={self.cfg.data.p})"
                  + (f", K1/K2={lisa.k1}/{lisa.k2}, rho={lisa.rho}" if lisa else "")
                  + (" from the unaligned base" if method.starts_from_base else ""))
        model, trainer = train_stage(model, tok, rows, self.cfg.finetune, root / "trainer",
                                     seed=self.cfg.seed, max_length=self.cfg.data.max_length, lisa=lisa,
                                     ewc_lambda=method.ewc_strength,
                                     alignment_rows=self.data.alignment
                                     if lisa or method.ewc_strength is not None else None,
                                     use_cpu=_use_cpu(self.cfg), log_path=self.log_path,
                                     log_tag=f"finetune/{method.key}")
        if self.is_main:
            if lisa is not None:
                atomic_write_json(root / "lisa_switches.json", trainer.switch_log)
            _save_atomically(out, model, tok)
        self.dist.wait_for_everyone()
        self._timed(f"finetune {method.key}", t0)
        return out

    def start_path(self, method: MethodSpec) -> str:
        """The model a method fine-tunes: the unaligned base for NA-SFT, else the aligned model."""
        return self.base_path() if method.starts_from_base else self.aligned_path()

    def method(self, key: str) -> MethodSpec:
        for m in self.cfg.finetune.methods:
            if m.key == key:
                return m
        raise LisaError(f"no method '{key}' in finetune.methods")

    def load_for_eval(self, key: str):
        from lisa_align.models.lora import load_adapter

        if key == "base":
            return self._load(self.base_path())
        if key == "aligned":
            return self._load(self.aligned_path())
        adapter = self.run_dir / "finetune" / key / "adapter"
        if (adapter / "adapter_config.json").exists():
            model, tok = self._load(self.start_path(self.method(key)))
            return load_adapter(model, str(adapter)).merge_and_unload(), tok
        return self._load(str(adapter))

    def vllm_generator(self, key: str):
        """The vLLM backend for one model: the base/aligned model itself, or a method's start model
        with its LoRA adapter (a full fine-tune is served as a model)."""
        from lisa_align.evaluation.vllm_backend import VLLMGenerator

        if key == "base":
            model_path, adapter = self.base_path(), None
        elif key == "aligned":
            model_path, adapter = self.aligned_path(), None
        else:
            out = self.run_dir / "finetune" / key / "adapter"
            lora = (out / "adapter_config.json").exists()
            model_path, adapter = (self.start_path(self.method(key)), str(out)) if lora else (str(out), None)
        return VLLMGenerator(model_path, adapter, dtype=self.cfg.model.dtype, trust_remote_code=self.cfg.model.trust_remote_code,
                             allow_pickle=self.cfg.model.allow_pickle, **self.cfg.eval.vllm)

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self, key: str) -> dict:
        """Evaluate one model (cached in eval/<key>/metrics.json). For a pairwise task (alpaca_eval)
        the win-rate judge is eval.pairwise_judge with eval.pairwise_judge_model; without a model the
        generations are saved and FA stays pending. A cached evaluation whose FA is pending is judged
        (without generating again) once a pairwise judge model is set."""
        from lisa_align.evaluation.judges import JUDGES
        from lisa_align.evaluation.pairwise import judge_key
        from lisa_align.evaluation.tasks import get_task
        from lisa_align.models.loading import allow_pickle_kwargs

        out = self.run_dir / "eval" / key
        e = self.cfg.eval

        def pairwise_judge():
            if not (e.pairwise_judge_model and get_task(self.cfg.data.task).pairwise):
                return None
            from lisa_align.evaluation import get_pairwise_judge
            from lisa_align.evaluation.pairwise import PAIRWISE_JUDGES

            allow = allow_pickle_kwargs(PAIRWISE_JUDGES.get(judge_key(e.pairwise_judge)), self.cfg.model.allow_pickle)
            return get_pairwise_judge(e.pairwise_judge, model_name_or_path=e.pairwise_judge_model,
                                      device=_device(self.cfg), **allow)

        if (out / "metrics.json").exists():
            metrics = read_json(out / "metrics.json")
            if metrics.get("fa_pending") and (judge := pairwise_judge()) is not None:
                from lisa_align.evaluation import rejudge_pairwise

                t0 = time.time()
                metrics = rejudge_pairwise(out, judge)
                self._timed(f"pairwise judge {key}", t0)
            return metrics
        from lisa_align.evaluation import evaluate_model, get_judge

        t0 = time.time()
        if e.backend == "vllm":
            model = tok = None
            generator = self.vllm_generator(key)
        else:
            model, tok = self.load_for_eval(key)
            model.to(_device(self.cfg))
            generator = None
        judge_kwargs = {"model_name_or_path": e.judge_model} if e.judge_model else {}
        judge_kwargs |= allow_pickle_kwargs(JUDGES.get(judge_key(e.judge)), self.cfg.model.allow_pickle)
        metrics = evaluate_model(
            model, tok, out_dir=out, judge=get_judge(e.judge, **judge_kwargs), harmful_rows=self.data.eval_harmful,
            task_rows=self.data.eval_task, task=self.cfg.data.task, benign_rows=self.data.eval_benign or None,
            batch_size=e.batch_size, max_new_tokens_harmful=e.max_new_tokens_harmful,
            max_new_tokens_task=e.max_new_tokens_task, max_new_tokens_benign=e.max_new_tokens_benign,
            pairwise_judge=pairwise_judge(), generator=generator)
        self._timed(f"evaluate {key}", t0)
        return metrics

    def model_keys(self) -> list[str]:
        keys: list[str] = []
        for k in self.cfg.eval.models:
            if k == "methods":
                keys += [m.key for m in self.cfg.finetune.methods]
            elif k in ("base", "aligned") or k in {m.key for m in self.cfg.finetune.methods}:
                keys.append(k)
            else:
                raise LisaError(f"eval.models: unknown model '{k}': use base, aligned, methods or a method name")
        return list(dict.fromkeys(keys))

    def run(self) -> dict:
        from transformers import set_seed

        set_seed(self.cfg.seed)
        t0 = time.time()
        self.aligned_path()
        for method in self.cfg.finetune.methods:
            set_seed(self.cfg.seed)
            self.finetune(method)
        summary = {}
        if self.is_main:  # generation and judging run in the main process; the others wait
            for key in self.model_keys():
                m = self.evaluate(key)
                summary[key] = summary_row(m)
            atomic_write_json(self.run_dir / "summary.json", summary)
        self.dist.wait_for_everyone()
        if not self.is_main:
            summary = read_json(self.run_dir / "summary.json")
        self._timed("pipeline", t0)
        return summary


def _save_atomically(out: Path, model, tokenizer) -> None:
    """Write a stage's model and tokenizer under a temporary name, then rename: ``out`` is complete or
    absent (or still the previous one). Non-finite weights are not saved; a full disk removes the
    temporary folder and raises a one-line LisaError."""
    from lisa_align.io import is_disk_full
    from lisa_align.training.callbacks import first_nonfinite_weight

    bad = first_nonfinite_weight(model)
    if bad is not None:
        raise LisaError(f"{out}: the trained weights hold {bad[1]} (in {bad[0]}), so they were not saved; "
                        "lower the stage's learning rate (or max_grad_norm) and re-run")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    except BaseException as e:
        full = isinstance(e, Exception) and is_disk_full(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written copy behind
        if not full:
            raise
        kept = f"the previous {out.name}/ is intact" if out.exists() else f"nothing was written to {out}"
        raise LisaError(f"no space left on device while saving {out}; the half-written copy was removed. Free "
                        f"space (or set output_dir on a larger disk) and re-run: {kept}, and the stage's training "
                        "checkpoints are kept, so the re-run does not train again") from e
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def summary_row(metrics: dict) -> dict:
    """A model's entry in summary.json: its HS, FA and over-refusal."""
    return {"hs": metrics.get("hs"), "fa": metrics.get("fa"), "over_refusal": metrics.get("over_refusal")}


def config_diff(cfg: RunConfig) -> list[str]:
    """How ``cfg`` differs from the config saved in its run folder ("key: old -> new"; empty if none)."""
    path = cfg.run_dir / "config.yaml"
    if not path.exists():
        return []
    return _diff(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, config_to_dict(cfg))


def _diff(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def format_table(summary: dict) -> str:
    lines = [f"{'model':<12}{'HS %':>8}{'FA %':>8}{'over-refusal %':>16}"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for k, m in summary.items():
        lines.append(f"{k:<12}{fmt(m['hs']):>8}{fmt(m['fa']):>8}{fmt(m['over_refusal']):>16}")
    return "\n".join(lines)
