"""align → finetune (each method) → post (each post defense on each fine-tuned model) → evaluate, in
one run folder (its layout: :mod:`lisa_align.rundir`).

A stage's output folder appears only when the stage is finished (it is written under a temporary
name and renamed), so a re-run reuses every finished stage and redoes only the rest; an unfinished
training stage resumes from its newest Trainer checkpoint. The operations that train are named for
it (``ensure_base``, ``ensure_aligned``, ``ensure_finetuned``, ``ensure_post``): each returns the finished model's
path, training it first when it is not there yet. The defenses (``align.method``,
``finetune.methods``) run through their declarations in :mod:`lisa_align.defenses`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import weakref
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import set_seed

from lisa_align.config import RunConfig, config_diff, config_to_dict, validate_config
from lisa_align.data.answers import PENDING as ANSWER_PENDING
from lisa_align.data.mixing import dedup_prompts, mix_harmful, remove_overlap
from lisa_align.data.sources import load_rows
from lisa_align.data.templates import PromptFormat
from lisa_align.defenses import Defense, load_class
from lisa_align.errors import LisaError
from lisa_align.evaluation import evaluate_model, get_judge, get_pairwise_judge, rejudge_pairwise, summary_row
from lisa_align.evaluation.evaluate import prompt_builders
from lisa_align.evaluation.generation import generate, generation_options
from lisa_align.evaluation.judges import JUDGES
from lisa_align.evaluation.pairwise import PAIRWISE_JUDGES, judge_key
from lisa_align.evaluation.tasks import get_task
from lisa_align.evaluation.vllm_backend import VLLMGenerator
from lisa_align.gate import format_gate
from lisa_align.gate import release as release_models
from lisa_align.io import (
    append_jsonl,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_yaml,
    default_cache_dir,
    is_disk_full,
    read_json,
    read_jsonl,
)
from lisa_align.locks import ArtifactLock, RunDirLock, describe_owner
from lisa_align.models.gguf import ensure_gguf_model, is_gguf
from lisa_align.models.loading import allow_pickle_kwargs, load_model_and_tokenizer, load_tokenizer
from lisa_align.models.lora import load_adapter, merge
from lisa_align.post import PostContext
from lisa_align.rundir import (
    ALIGNMENT_ADAPTER_DIR,
    EVENT_DATA,
    EVENT_MODEL,
    EVENT_POST,
    EVENT_STAGE_DONE,
    EVENT_WAIT,
    LOG_EVENT,
    LOG_SECONDS,
    LOG_STAGE,
    POST_RECORD,
    finetune_stage,
    post_stage,
)
from lisa_align.training.callbacks import first_nonfinite_weight
from lisa_align.training.run import train_stage
from lisa_align.training.tiny_base import ensure_tiny_base, tiny_base_path

log = logging.getLogger(__name__)
DIST_TIMEOUT_HOURS = 12
MODEL_KEYS = ("base", "aligned")  # eval.models may also name "methods" or a method's key


@dataclass
class RunData:
    user: list[dict]
    alignment: list[dict]
    eval_harmful: list[dict]
    eval_task: list[dict]
    eval_benign: list[dict] = field(default_factory=list)
    dropped_overlap: dict[str, int] = field(default_factory=dict)  # eval set -> rows dropped (eval.drop_overlap)
    harmful: list[dict] = field(default_factory=list)  # the harmful source (user rows mix round(p·n) of them)
    hs_protocol: str = "custom"  # eval.hs_protocol: which rows of eval.harmful are the HS prompts
    dropped_duplicates: int = 0  # HS prompts left out as repeats (eval.dedup_prompts)

    def roles(self) -> dict[str, list[dict]]:
        """The data a defense may need, by role (``Defense.needs``)."""
        return {"user": self.user, "alignment": self.alignment, "harmful": self.harmful}


def load_run_data(cfg: RunConfig) -> RunData:
    """Every data set of a run: the user set (data.n rows, round(p·n) harmful, chosen by each source's
    ``sample``), the alignment rows and the evaluation sets. The HS prompts are eval.harmful as
    ``eval.hs_protocol`` resolved it, deduplicated with ``eval.dedup_prompts``; with ``eval.drop_overlap``
    evaluation rows whose prompt occurs in the training rows are dropped (counted in ``dropped_overlap``)."""
    d, e = cfg.data, cfg.eval
    benign = load_rows(d.user)
    harmful = load_rows(d.harmful)
    user = mix_harmful(benign, harmful, n=d.n, p=d.p, seed=cfg.seed, benign_sample=d.user.sample,
                       harmful_sample=d.harmful.sample, benign_name=d.user.describe(),
                       harmful_name=d.harmful.describe())
    alignment = [r for spec in d.alignment for r in load_rows(spec)]
    train = user + alignment
    out = RunData(user=user, alignment=alignment, eval_harmful=[], eval_task=[], harmful=harmful,
                  hs_protocol=e.hs_protocol)
    for name, spec in (("harmful", e.harmful), ("task", e.task), ("benign", e.benign)):
        if spec is None:
            continue
        rows = load_rows(spec)
        if name == "harmful" and e.dedup_prompts:
            rows, out.dropped_duplicates = dedup_prompts(rows)
        if e.drop_overlap:
            rows, out.dropped_overlap[name] = remove_overlap(rows, train)
            if not rows:
                raise LisaError(f"every eval.{name} row occurs in the training data ({spec.describe()}); "
                                "use other evaluation rows or set eval.drop_overlap: false")
        setattr(out, f"eval_{name}", rows)
    return out


def _use_cpu(cfg: RunConfig) -> bool:
    return cfg.use_cpu or not torch.cuda.is_available()


def _device(cfg: RunConfig) -> str:
    return "cpu" if _use_cpu(cfg) else "cuda"


class Pipeline:
    """The run's stages. Under ``accelerate launch`` (or torchrun) every process trains, through the
    Trainer's data parallelism; the main process alone writes files and evaluates, and the others
    wait for it at the end of each stage.

    The constructor only records its arguments; :meth:`start` joins the process group, checks the run
    folder's config and writes it, :meth:`load_data` reads every data source, and :meth:`run` does both
    (when not done yet) and then every stage.

    Concurrency (:mod:`lisa_align.locks`): the main process holds the run folder's lock (``RUN_DIR/.lock``)
    from :meth:`start` until :meth:`run` ends (or :meth:`close`; a failed start or data load lets it go),
    so a second run on the folder fails at once; the stage workers of ``--jobs`` and the other
    processes of an ``accelerate launch`` work under their main process's lock. Artifacts that runs
    share (the tiny base, an aligned model in ``align.output_dir``, the answers and tokenised caches)
    are built under their own lock: a run that finds one being built waits (a ``wait`` event in its
    log), then reuses it."""

    def __init__(self, cfg: RunConfig, *, force: bool = False, echo=print):
        self.cfg = cfg
        self.rundir = cfg.rundir
        self.run_dir = self.rundir.path
        self.force = force
        self._echo = echo
        self.dist: PartialState | None = None
        self._data: RunData | None = None
        self.worker = False
        self._run_lock: RunDirLock | None = None
        self._ready: set[str] = set()  # under data parallelism: the shared artifacts built (_build_shared)

    # ---- bookkeeping ------------------------------------------------------------------------
    def start(self) -> None:
        """Join the process group (when launched on several processes; its timeout covers the main
        process's evaluation, which the others wait for), refuse a run folder that holds another
        config unless ``force``, write config.yaml and log the model's trust settings. Once."""
        if self.dist is not None:
            return
        self.dist = PartialState(cpu=_use_cpu(self.cfg), timeout=timedelta(hours=DIST_TIMEOUT_HOURS))
        self._lock_run_dir()  # before anything is read or written there: a folder in use fails at once
        try:
            self._check_and_write_config()
        except BaseException:
            self.close()
            raise

    def _check_and_write_config(self) -> None:
        diff = config_diff(self.cfg)
        if diff and not self.force:
            raise LisaError(f"{self.run_dir} holds a run with a different config ({'; '.join(diff[:5])}); "
                            "use another name/output_dir, or --force to reuse its finished stages anyway")
        if self.worker:  # a stage worker of _run_in_processes: the run's own process wrote these
            return
        if self.is_main:
            atomic_write_yaml(self.rundir.config, config_to_dict(self.cfg))
        threads = self.cfg.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None
        if threads:  # two processes with two threads each on two cores run several times slower than one each
            torch.set_num_threads(threads)
        m = self.cfg.model
        self._log({LOG_EVENT: EVENT_MODEL, "trust_remote_code": m.trust_remote_code, "allow_pickle": m.allow_pickle,
                   "model": m.name, "threads": torch.get_num_threads()})

    @property
    def prompt_format(self) -> PromptFormat:
        """How rows become prompts and token ids (``data.template``, ``system_prompt``, ``loss_on``)."""
        return PromptFormat.of(self.cfg.data)

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main_process

    def echo(self, *args, **kwargs) -> None:
        if self.is_main:
            self._echo(*args, **kwargs)

    def _log(self, record: dict) -> None:
        if self.is_main:
            append_jsonl(self.rundir.log, record)

    def _timed(self, stage: str, t0: float) -> None:
        dt = time.time() - t0
        self._log({LOG_EVENT: EVENT_STAGE_DONE, LOG_STAGE: stage, LOG_SECONDS: round(dt, 2), "pid": os.getpid()})
        self.echo(f"[lisa] {stage}: {dt:.1f}s")

    def _wait(self) -> None:
        if self.dist is not None:
            self.dist.wait_for_everyone()

    @property
    def _distributed(self) -> bool:
        return self.dist is not None and self.dist.num_processes > 1

    # ---- locks (lisa_align.locks) -------------------------------------------------------------
    def _lock_run_dir(self) -> None:
        """Take the run folder's lock (main process; not a ``--jobs`` worker, whose parent holds it)."""
        if self._run_lock is None and self.is_main and not self.worker:
            lock = RunDirLock(self.run_dir).acquire()  # LisaError naming the holder when in use
            self._run_lock = lock
            weakref.finalize(self, lock.release)  # a pipeline dropped without close() lets it go too

    def close(self) -> None:
        """Let the run folder's lock go (:meth:`run` does at its end); another run may then use the folder."""
        if self._run_lock is not None:
            self._run_lock.release()
            self._run_lock = None

    def _on_wait(self, stage: str, target: Path):
        def report(holder: dict | None) -> None:
            self.echo(f"[lisa] {stage}: waiting for {target}, which {describe_owner(holder)} is building")
        return report

    def _log_wait(self, stage: str, lock: ArtifactLock) -> None:
        """Log a wait for another process's lock ({"event": "wait", "stage", "seconds", "lock", "holder"})."""
        if lock.waited:
            self._log({LOG_EVENT: EVENT_WAIT, LOG_STAGE: stage, LOG_SECONDS: lock.waited, "lock": str(lock.path),
                       "holder": lock.holder})
            self.echo(f"[lisa] {stage}: waited {lock.waited:.1f}s for {describe_owner(lock.holder)}")

    def _build_shared(self, stage: str, target: Path | None, done, build) -> None:
        """Run ``build()`` unless ``done()``, holding the inter-process lock of ``target``, an artifact other
        runs may build too (None: one in the run folder, which the run folder's lock covers). A run that had
        to wait logs it ({"event": "wait", "stage", "seconds", ...}) and builds only if the process it
        waited for did not finish (it died: the half-done work is resumed).

        Under data parallelism every process builds (trains) together: the main process takes the lock
        and the others wait for it at a barrier, then all see the same state. The first call for a stage
        must then be made by every process (``run`` does); later calls return at once."""
        if not self._distributed:
            if done():
                return
        elif stage in self._ready:
            return
        lock = ArtifactLock(target, what=stage, on_wait=self._on_wait(stage, target)) \
            if self.is_main and target is not None else None
        if lock is not None:
            lock.acquire()
        try:
            if lock is not None:
                self._log_wait(stage, lock)
            self._wait()  # the launch's other processes: until the main one holds the lock
            if not done():
                build()
            self._wait()
        finally:
            if lock is not None:
                lock.release()
        self._ready.add(stage)

    def load_data(self) -> RunData:
        """Read and validate every data source (once); the row counts go to the run log."""
        self.start()
        if self._data is None:
            try:
                d = self._data = load_run_data(self.cfg)
            except BaseException:
                self.close()  # a bad config or data: the run stops before any stage
                raise
            if self.worker:
                return d
            self._log({LOG_EVENT: EVENT_DATA, "user": len(d.user), "harmful_in_user": sum(r["harmful"] for r in d.user),
                       "alignment": len(d.alignment), "eval_harmful": len(d.eval_harmful),
                       "eval_task": len(d.eval_task), "eval_benign": len(d.eval_benign),
                       "hs_protocol": d.hs_protocol, "eval_harmful_duplicates_dropped": d.dropped_duplicates,
                       "eval_rows_dropped_as_overlap": d.dropped_overlap})
            if self.cfg.eval.drop_overlap:
                self.echo("[lisa] eval.drop_overlap: dropped " + ", ".join(f"{v} {k}" for k, v in
                                                                          d.dropped_overlap.items())
                          + " evaluation rows whose prompt occurs in the training data")
        return self._data

    # ---- models -----------------------------------------------------------------------------
    def ensure_base(self) -> str:
        """The base model: a HF id or folder as given, the tiny base (built and cached first), or a GGUF
        model (a .gguf file or a wheel source holding one) dequantized once into a cached folder."""
        m = self.cfg.model
        if is_gguf(m.name):
            t0 = time.time()
            path = ensure_gguf_model(m.name, sha256=m.sha256, cache_dir=m.cache_dir)
            if time.time() - t0 > 1:
                self._timed("base (GGUF, converted and cached)", t0)
            return str(path)
        if m.name.startswith("wheel:") or m.sha256:
            raise LisaError(f"model.name '{m.name}': a wheel: model and model.sha256 are for GGUF files only "
                            "(wheel:DIST==VERSION#path/to/model.gguf); name a .gguf member, or remove model.sha256")
        if m.name != "tiny":
            return m.name
        path = tiny_base_path(m.tiny, seed=self.cfg.seed, cache_dir=m.cache_dir)

        def build() -> None:
            t0 = time.time()
            ensure_tiny_base(m.tiny, seed=self.cfg.seed, cache_dir=m.cache_dir, use_cpu=_use_cpu(self.cfg),
                             lock=False)  # held here (the main process's, for every process of a launch)
            self._timed("base (tiny, built and cached)", t0)

        self._build_shared("base", path, lambda: (path / "config.json").exists(), build)
        return str(path)

    def _load(self, path: str):
        m = self.cfg.model
        return load_model_and_tokenizer(path, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                                        allow_pickle=m.allow_pickle)

    def ensure_answers(self) -> None:
        """The answers of rows whose source says ``answers: base_model``: the unaligned base model's own
        greedy answers (the run's prompt template), generated once for every distinct prompt and cached in
        ``<cache>/answers/<key>.jsonl`` (the user's cache, never a repository), then filled into the rows."""
        data = self.load_data()
        pending = [r for rows in (data.user, data.alignment, data.harmful) for r in rows if r.get(ANSWER_PENDING)]
        if not pending:
            return
        fmt = self.prompt_format
        base = self.ensure_base()
        n_tokens = self.cfg.data.generated_max_new_tokens
        key_of = lambda r: json.dumps([r["instruction"], r.get("input") or ""])  # noqa: E731  (a distinct prompt)
        by_key = {key_of(r): r for r in pending}
        keys = sorted(by_key)
        ident = json.dumps([base, fmt.template, fmt.system_prompt, n_tokens, keys])
        path = default_cache_dir() / "answers" / f"{hashlib.sha256(ident.encode()).hexdigest()[:20]}.jsonl"
        if self.is_main and not path.is_file():
            with ArtifactLock(path, what="answers", on_wait=self._on_wait("answers", path)) as lock:
                self._log_wait("answers", lock)
                if not path.is_file():  # not written by the process we waited for
                    self._generate_answers(path, base, keys, by_key, n_tokens)
        self._wait()
        answers = {rec["key"]: rec["answer"] for rec in read_jsonl(path)}
        for r in pending:
            r["output"] = answers[key_of(r)]
            del r[ANSWER_PENDING]

    def _generate_answers(self, path: Path, base: str, keys: list[str], by_key: dict, n_tokens: int) -> None:
        """The base model's greedy answers to the prompts ``by_key[k]``, written to ``path`` (main process)."""
        fmt = self.prompt_format
        t0 = time.time()
        model, tok = self._load(base)
        model.to(_device(self.cfg))
        _, prompt_of = prompt_builders(fmt, tok)
        self.echo(f"[lisa] answers: generating the base model's answers to {len(keys)} prompts")
        answers = generate(model, tok, [prompt_of(by_key[k]) for k in keys], max_new_tokens=n_tokens,
                           batch_size=self.cfg.eval.batch_size, desc="answers",
                           **generation_options(fmt, tok))  # chat: its own special tokens, end-of-turn stops
        atomic_write_jsonl(path, [{"key": k, "answer": a} for k, a in zip(keys, answers)])
        self._timed("answers (base model, generated and cached)", t0)

    def aligned_dir(self) -> Path:
        a = self.cfg.align
        return Path(a.output_dir) if a.output_dir else self.rundir.aligned

    def ensure_aligned(self) -> str:
        """The aligned model (the base when ``align.enabled`` is false), aligned with ``align.method``
        first when it is not there yet."""
        if not self.cfg.align.enabled:
            return self.ensure_base()
        out = self.aligned_dir()
        done = lambda: (out / "config.json").exists()  # noqa: E731
        if done() and not self._distributed:
            return str(out)
        self.ensure_answers()
        self.ensure_base()  # timed on its own when the tiny base is built
        # an aligned model that other runs share (align.output_dir) is trained by one of them at a time
        shared = out if self.cfg.align.output_dir else None
        self._build_shared("align", shared, done, lambda: self._align(out))
        return str(out)

    def _align(self, out: Path) -> None:
        """Train the aligned model into ``out`` (its Trainer work folder ``.<name>.trainer`` beside it,
        resumed from its last checkpoint when a killed run left one)."""
        data = self.load_data()
        base = self.ensure_base()
        set_seed(self.cfg.seed)  # the same RNG state (LoRA init, ...) whether the base was built now or cached
        a = self.cfg.align
        defense = a.method.resolve(a)
        rows = defense.training_rows(data.alignment, data.roles())
        t0 = time.time()
        self.echo(f"[lisa] align ({defense.name}): {len(rows)} rows x {a.epochs} epochs")
        model, tok = self._load(base)
        work = out.parent / f".{out.name}.trainer"
        model, _ = train_stage(model, tok, rows, a, work, defense=defense, data=data.roles(), seed=self.cfg.seed,
                               max_length=self.cfg.data.max_length, use_cpu=_use_cpu(self.cfg),
                               prompt_format=self.prompt_format,
                               log_path=self.rundir.log, log_tag="align")
        if self.is_main:
            extra = {}
            if a.lora is not None:  # the LoRA itself too, for fine-tuning that continues it
                model.save_pretrained(work / ALIGNMENT_ADAPTER_DIR, safe_serialization=True)
                extra[ALIGNMENT_ADAPTER_DIR] = work / ALIGNMENT_ADAPTER_DIR
            save_atomically(out, merge(model), tok, extra=extra)
            shutil.rmtree(work, ignore_errors=True)
        self._wait()
        self._timed("align", t0)

    def ensure_alignment_adapter(self) -> Path:
        """The alignment LoRA before its merge (``finetune.adapter: continue``), aligning first if needed."""
        adapter = Path(self.ensure_aligned()) / ALIGNMENT_ADAPTER_DIR
        if not (adapter / "adapter_config.json").is_file():
            raise LisaError(f"{adapter.parent} holds no {ALIGNMENT_ADAPTER_DIR}/ (aligned by an earlier release, or "
                            "without align.lora), which finetune.adapter: continue trains: delete that folder to "
                            "align again, or use finetune.adapter: new")
        return adapter

    def continues_alignment(self, method: Defense) -> bool:
        """Whether ``method`` fine-tunes the alignment LoRA itself (on the base) rather than a new LoRA."""
        return self.cfg.finetune.adapter_of(method) == "continue"

    def ensure_start_model(self, method: Defense) -> str:
        """The model a method fine-tunes (``Defense.starts_from``): the base or the aligned model; the base
        (under the alignment LoRA it continues) for ``finetune.adapter: continue``."""
        if self.continues_alignment(method):
            self.ensure_alignment_adapter()
            return self.ensure_base()
        return self.ensure_base() if method.starts_from == "base" else self.ensure_aligned()

    def ensure_finetuned(self, method: Defense) -> Path:
        """``finetune/<key>/adapter``, fine-tuned with ``method`` first when it is not there yet."""
        method = method.resolve(self.cfg.finetune)
        out = self.rundir.adapter(method.key)
        if out.exists():
            return out
        self.ensure_answers()
        data = self.load_data()
        start = self.ensure_start_model(method)
        set_seed(self.cfg.seed)  # the same RNG state whether the stages before ran now or were reused
        rows = method.training_rows(data.user, data.roles())
        t0 = time.time()
        model, tok = self._load(start)
        continues = self.continues_alignment(method)
        if continues:
            model = load_adapter(model, str(self.ensure_alignment_adapter()), is_trainable=True,
                                 allow_pickle=self.cfg.model.allow_pickle)
        self.echo(f"[lisa] finetune {method.key}: {len(rows)} rows (n={len(data.user)}, p={self.cfg.data.p})"
                  + method.describe() + (", continuing the alignment LoRA" if continues else ""))
        model, trainer = train_stage(model, tok, rows, self.cfg.finetune, self.rundir.trainer(method.key),
                                     attach_adapter=not continues,
                                     defense=method, data=data.roles(), seed=self.cfg.seed,
                                     max_length=self.cfg.data.max_length, use_cpu=_use_cpu(self.cfg),
                                     prompt_format=self.prompt_format,
                                     log_path=self.rundir.log, log_tag=finetune_stage(method.key))
        if self.is_main:
            for name, attr in method.artifacts.items():
                atomic_write_json(self.rundir.artifact(method.key, name), getattr(trainer, attr))
            save_atomically(out, model, tok)
        self._wait()
        self._timed(f"finetune {method.key}", t0)
        return out

    # ---- post-fine-tuning ----------------------------------------------------------------------
    def ensure_all_post(self) -> None:
        """Every post defense (``post``) applied to every fine-tuned model."""
        for key in self.cfg.post_models():
            self.ensure_post(key)

    def ensure_post(self, key: str) -> Path:
        """``post/<key>`` (``<method>+<post>``): the post defense applied to the method's fine-tuned
        model (fine-tuned first when needed), written under a temporary name and renamed, so it is
        complete or absent; a finished one is reused. The main process transforms, the others wait."""
        posts = self.cfg.post_models()
        if key not in posts:
            raise LisaError(f"no post-processed model '{key}' ({', '.join(posts) or 'post is empty'})")
        method_key, defense = posts[key]
        out = self.rundir.post(key)
        if out.exists():
            return out
        method = self.cfg.finetune.method(method_key)
        adapter = self.ensure_finetuned(method)
        self.ensure_answers()  # the calibration rows may be answered by the base model
        if self.is_main:
            t0 = time.time()
            self.echo(f"[lisa] post {key}: {defense.name}{defense.describe()}")
            model, tok = self._load(self.ensure_start_model(method))
            if (adapter / "adapter_config.json").exists():  # the user adapter, unmerged
                model = load_adapter(model, str(adapter))
            else:
                model, tok = self._load(str(adapter))
            model.to(_device(self.cfg))
            context = PostContext(data=self.load_data().roles(), prompt_format=self.prompt_format,
                                  max_length=self.cfg.data.max_length, device=_device(self.cfg),
                                  base=self.ensure_base, aligned=self.ensure_aligned, load_weights=self._weights)
            set_seed(self.cfg.seed)
            record = load_class(defense.post_transform)(defense, model, tok, context)
            _save_post(out, self.rundir.post_adapter(key).name, model, tok, record)
            self._log({LOG_EVENT: EVENT_POST, LOG_STAGE: post_stage(key), "defense": defense.name,
                       **{k: v for k, v in record.items() if isinstance(v, (int, float, str, bool)) or v is None}})
            self._timed(f"post {key}", t0)
        self._wait()
        return out

    def _weights(self, path: str) -> dict:
        """A model's weights by parameter name (SafeLoRA's aligned and base models)."""
        model, _ = self._load(path)
        return dict(model.state_dict())

    def load_for_eval(self, key: str):
        if key == "base":
            return self._load(self.ensure_base())
        if key == "aligned":
            return self._load(self.ensure_aligned())
        adapter, method_key = self.trained_output(key)
        if (adapter / "adapter_config.json").exists():
            model, tok = self._load(self.ensure_start_model(self.cfg.finetune.method(method_key)))
            return load_adapter(model, str(adapter)).merge_and_unload(), tok
        return self._load(str(adapter))

    def trained_output(self, key: str) -> tuple[Path, str]:
        """(the folder holding the adapter or full model, the fine-tuning method's key) of a fine-tuned
        model (``finetune/<key>/adapter``) or a post-processed one (``post/<key>/adapter``)."""
        posts = self.cfg.post_models()
        if key in posts:
            return self.rundir.post_adapter(key), posts[key][0]
        return self.rundir.adapter(key), key

    def vllm_model_path(self, key: str) -> tuple[str, str | None]:
        """(the model folder vLLM serves, the LoRA adapter it applies or None) for one model: the
        base/aligned model itself, or a method's start model with its LoRA adapter (a full fine-tune
        is served as a model). The served folder's tokenizer is the one vLLM uses."""
        if key == "base":
            model_path, adapter = self.ensure_base(), None
        elif key == "aligned":
            model_path, adapter = self.ensure_aligned(), None
        else:
            out, method_key = self.trained_output(key)
            lora = (out / "adapter_config.json").exists()
            model_path, adapter = ((self.ensure_start_model(self.cfg.finetune.method(method_key)), str(out)) if lora
                                   else (str(out), None))
        return model_path, adapter

    def vllm_generator(self, key: str, **options) -> VLLMGenerator:
        """The vLLM backend for one model (:meth:`vllm_model_path`); ``options`` are the prompt format's
        generation options (:func:`~lisa_align.evaluation.generation.generation_options`)."""
        model_path, adapter = self.vllm_model_path(key)
        m = self.cfg.model
        return VLLMGenerator(model_path, adapter, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                             allow_pickle=m.allow_pickle, **options, **self.cfg.eval.vllm)

    # ---- evaluation -------------------------------------------------------------------------
    def _pairwise_judge(self):
        """The win-rate judge of a pairwise task (alpaca_eval), or None without a judge model."""
        e = self.cfg.eval
        if not (e.pairwise_judge_model and get_task(self.cfg.data.task).pairwise):
            return None
        allow = allow_pickle_kwargs(PAIRWISE_JUDGES.get(judge_key(e.pairwise_judge)), self.cfg.model.allow_pickle)
        return get_pairwise_judge(e.pairwise_judge, model_name_or_path=e.pairwise_judge_model,
                                  device=_device(self.cfg), **allow)

    def evaluate(self, key: str) -> dict:
        """Evaluate one model (cached in eval/<key>/metrics.json). For a pairwise task (alpaca_eval)
        the win-rate judge is eval.pairwise_judge with eval.pairwise_judge_model; without a model the
        generations are saved and FA stays pending. A cached evaluation whose FA is pending is judged
        (without generating again) once a pairwise judge model is set."""
        out = self.rundir.eval(key)
        e = self.cfg.eval
        if out.metrics.exists():
            metrics = read_json(out.metrics)
            if metrics.get("fa_pending") and (judge := self._pairwise_judge()) is not None:
                t0 = time.time()
                metrics = rejudge_pairwise(out.path, judge)
                self._timed(f"pairwise judge {key}", t0)
            return metrics
        data = self.load_data()
        t0 = time.time()
        if e.backend == "vllm":
            model = tok = None
            if self.prompt_format.chat:  # the served model's tokenizer renders its chat template (no weights)
                tok = load_tokenizer(self.vllm_model_path(key)[0], trust_remote_code=self.cfg.model.trust_remote_code)
            generator = self.vllm_generator(key, **generation_options(self.prompt_format, tok))
        else:
            model, tok = self.load_for_eval(key)
            model.to(_device(self.cfg))
            generator = None
        judge_kwargs = {"model_name_or_path": e.judge_model} if e.judge_model else {}
        judge_kwargs |= allow_pickle_kwargs(JUDGES.get(judge_key(e.judge)), self.cfg.model.allow_pickle)
        judge_options = {"dtype": e.judge_dtype, "append_eos": e.judge_append_eos, "use_fast": e.judge_use_fast}
        metrics = evaluate_model(
            model, tok, out_dir=out.path, judge=get_judge(e.judge, options=judge_options, **judge_kwargs),
            harmful_rows=data.eval_harmful,
            task_rows=data.eval_task, task=self.cfg.data.task, benign_rows=data.eval_benign or None,
            batch_size=e.batch_size, max_new_tokens_harmful=e.max_new_tokens_harmful,
            max_new_tokens_task=e.max_new_tokens_task, max_new_tokens_benign=e.max_new_tokens_benign,
            pairwise_judge=self._pairwise_judge(), generator=generator, fa_rule=e.fa_rule,
            cut_at_response_marker=e.cut_at_response_marker, prompt_format=self.prompt_format,
            protocol={"hs_protocol": data.hs_protocol, "dedup_prompts": e.dedup_prompts,
                      "drop_overlap": e.drop_overlap, "eval_rows_dropped_as_overlap": data.dropped_overlap})
        self._timed(f"evaluate {key}", t0)
        return metrics

    def model_keys(self) -> list[str]:
        keys: list[str] = []
        methods = [m.key for m in self.cfg.finetune.methods]
        posts = self.cfg.post_models()
        for k in self.cfg.eval.models:
            if k == "methods":  # each fine-tuned model, then its post-processed ones
                keys += [x for m in methods for x in (m, *self.cfg.post_keys(m))]
            elif k in MODEL_KEYS or k in methods or k in posts:
                keys.append(k)
            else:
                raise LisaError(f"eval.models: unknown model '{k}': use base, aligned, methods or a method name")
        return list(dict.fromkeys(keys))

    def ensure_all_finetuned(self) -> None:
        """Every method of ``finetune.methods`` fine-tuned, one after the other."""
        for method in self.cfg.finetune.resolved():
            set_seed(self.cfg.seed)
            self.ensure_finetuned(method)

    def run(self, jobs: int = 1) -> dict:
        """Every stage (finished ones are reused), holding the run folder's lock; it is let go at the end.
        With ``jobs`` > 1 (one machine, not under ``accelerate launch``) the stages run as
        :meth:`_run_in_processes` schedules them."""
        try:
            return self._run(jobs)
        finally:
            self.close()

    def _run(self, jobs: int) -> dict:
        self.start()
        self._lock_run_dir()  # again after a close()
        self.load_data()
        set_seed(self.cfg.seed)
        t0 = time.time()
        if jobs > 1 and not self._distributed:
            self._run_in_processes(jobs)
        else:
            self.ensure_aligned()
            self.ensure_all_finetuned()
            self.ensure_all_post()
        summary = {}
        if self.is_main:  # generation and judging run in the main process; the others wait
            for key in self.model_keys():  # evaluated now, or read back from eval/<key>/metrics.json
                summary[key] = summary_row(self.evaluate(key))
            atomic_write_json(self.rundir.summary, summary)
            if self.cfg.gate is not None:
                self.release(summary)
        self._wait()
        if not self.is_main:
            summary = read_json(self.rundir.summary)
        self._timed("pipeline", t0)
        return summary

    def _run_in_processes(self, jobs: int) -> None:
        """``--jobs N``: the run's stages as a graph over N spawned worker processes that split this
        process's torch threads (several one-thread processes outrun one process with every thread on a
        few CPU cores). The main process converts the base, generates the answers and aligns, with its
        share of the threads; meanwhile a worker evaluates the base. Once the aligned model exists the
        workers evaluate it and fine-tune every method (then apply its post defenses), and each model is
        evaluated as soon as it exists (with ``eval.backend: vllm`` the main process evaluates afterwards:
        a vLLM engine takes the GPU's memory). Every stage is a pure function of its settings, so the models
        and metrics equal a sequential run's with the same threads per process; only the wall time changes.
        The first worker error is raised (one line) and the stages not yet started are cancelled."""
        total = torch.get_num_threads()
        threads = max(total // jobs, 1)
        keys = self.model_keys()
        methods = self.cfg.finetune.resolved()
        raw = config_to_dict(self.cfg)
        self.ensure_base()  # converted or built once, here, before any worker loads it
        self.echo(f"[lisa] --jobs {jobs}: stages in {jobs} processes, {threads} thread(s) each")
        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        pending: dict = {}

        def submit(kind: str, key: str) -> None:
            if kind == "evaluate" and (key not in keys or self.rundir.eval(key).metrics.exists()
                                       or self.cfg.eval.backend == "vllm"):  # one vLLM engine holds the GPU
                return
            pending[pool.submit(_stage_in_worker, raw, kind, key, threads)] = (kind, key)

        try:
            submit("evaluate", "base")
            torch.set_num_threads(threads)  # the main process aligns beside that worker
            try:
                self.ensure_aligned()
                self.ensure_answers()  # generated once here, not by each worker
                for method in methods:
                    self.ensure_start_model(method)
            finally:
                torch.set_num_threads(total)
            for method in methods:
                post_keys = self.cfg.post_keys(method.key)
                if self.rundir.adapter(method.key).exists() and all(self.rundir.post(k).exists() for k in post_keys):
                    for key in (method.key, *post_keys):
                        submit("evaluate", key)
                else:
                    submit("finetune", method.key)
            submit("evaluate", "aligned")
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    kind, key = pending.pop(future)
                    future.result()  # a worker's error (one line) is raised here
                    if kind == "finetune":  # its model, then its post-processed ones, can be evaluated now
                        for k in (key, *self.cfg.post_keys(key)):
                            submit("evaluate", k)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

    def release(self, summary: dict) -> dict:
        """The release gate (``gate:``): every fine-tuned and post-processed model against the aligned one;
        those that pass are copied to ``release/<key>/``, the others listed in ``release/WITHHELD.json``
        (:func:`lisa_align.gate.release`). Main process only; the verdicts are also ``self.gate_result``."""
        # each method, then its post-processed models
        keys = [k for m in self.cfg.finetune.methods for k in (m.key, *self.cfg.post_keys(m.key))]
        t0 = time.time()
        result = release_models(self.rundir, summary, self.cfg.gate, {k: self.trained_output(k)[0] for k in keys})
        self.gate_result = result
        self.echo(format_gate(result, str(self.run_dir)))
        self.echo(f"[lisa] released {len(result['released'])} of {len(keys)} models into {self.rundir.release_root}"
                  + (f"; withheld: {', '.join(result['withheld'])} (see {self.rundir.withheld})"
                     if result["withheld"] else ""))
        self._timed("gate and release", t0)
        return result


def _stage_in_worker(raw: dict, kind: str, key: str, threads: int) -> None:
    """One stage in a worker process of :meth:`Pipeline._run_in_processes`: ``finetune`` a method (then
    apply its post defenses), or ``evaluate`` a model."""
    torch.set_num_threads(threads)
    cfg = validate_config(raw)
    pipeline = Pipeline(cfg, force=True)
    pipeline.worker = True
    pipeline.start()
    set_seed(cfg.seed)
    if kind == "finetune":
        pipeline.ensure_finetuned(cfg.finetune.method(key))
        for post_key in cfg.post_keys(key):
            pipeline.ensure_post(post_key)
    else:
        pipeline.evaluate(key)


def default_jobs(cores_per_job: int = 2) -> int:
    """Worker processes for a run's stages (``--jobs``): one per ``cores_per_job`` cores (two by default;
    ``lisa demo --real`` uses one, see ``REAL_DEMO_CORES_PER_JOB`` in :mod:`lisa_align.cli`)."""
    return max((os.cpu_count() or 1) // cores_per_job, 1)


def run_sweep(runs: list[dict], echo=print, jobs: int = 1) -> list[dict]:
    """The runs of a sweep (resolved configs, ``sweep.plan``) one after the other, in this process;
    a finished run is skipped (after checking that its folder holds the same config)."""
    results = []
    for i, raw in enumerate(runs, 1):
        cfg = validate_config(raw)
        done = cfg.rundir.summary
        diff = config_diff(cfg)
        if diff:  # checked before skipping: a finished run of another config is not this run's result
            raise LisaError(f"{cfg.run_dir} holds a run with a different config ({'; '.join(diff[:5])}); "
                            "give the sweep another name (--set name=...) or output_dir")
        if done.exists():
            echo(f"[sweep] {i}/{len(runs)} {cfg.name}: finished, skipped")
        else:
            echo(f"[sweep] {i}/{len(runs)} {cfg.name}")
            Pipeline(cfg, echo=echo).run(jobs)
        results.append({"name": cfg.name, "run_dir": str(cfg.run_dir), "summary": read_json(done)})
    return results


def save_atomically(out: Path, model, tokenizer, extra: dict[str, Path] | None = None) -> None:
    """Write a stage's model and tokenizer (and the ``extra`` folders, copied in by name) under a
    temporary name, then rename: ``out`` is complete or absent (or still the previous one). Non-finite
    weights are not saved; a full disk removes the temporary folder and raises a one-line LisaError."""
    bad = first_nonfinite_weight(model)
    if bad is not None:
        raise LisaError(f"{out}: the trained weights hold {bad[1]} (in {bad[0]}), so they were not saved; "
                        "lower the stage's learning rate (or max_grad_norm) and re-run")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, folder in (extra or {}).items():
            shutil.copytree(folder, tmp / name)
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


def _save_post(out: Path, model_dir: str, model, tokenizer, record: dict) -> None:
    """Write a post-processed model (``out/<model_dir>``) and its record (``post.json``) under a temporary
    name, then rename: ``out`` is complete or absent."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_atomically(tmp / model_dir, model, tokenizer)
        atomic_write_json(tmp / POST_RECORD, record)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written copy behind
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def format_table(summary: dict) -> str:
    w = max([12, *(len(k) + 2 for k in summary)])  # post-processed models have longer keys (lisa+antidote)
    lines = [f"{'model':<{w}}{'HS %':>8}{'FA %':>8}{'over-refusal %':>16}"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for k, m in summary.items():
        lines.append(f"{k:<{w}}{fmt(m['hs']):>8}{fmt(m['fa']):>8}{fmt(m['over_refusal']):>16}")
    return "\n".join(lines)
