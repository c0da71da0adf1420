"""The tiny offline base, trained: :func:`ensure_tiny_base` builds it on first use (about a minute
on 2 cores: response-only SFT with per-example loss on the synthetic corpus of
:mod:`lisa_align.models.tiny`), saves it with ``save_pretrained`` and caches it by a hash of its
settings, so later runs reuse it. The build holds the base's inter-process lock
(:class:`~lisa_align.locks.ArtifactLock`, ``<cache>/.<key>.lock``): concurrent runs build it once.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from lisa_align.config import StageSettings, TinySettings
from lisa_align.io import default_cache_dir
from lisa_align.locks import ArtifactLock
from lisa_align.models.tiny import build_model, build_tokenizer, pretraining_rows, tiny_key
from lisa_align.training.run import train_stage

log = logging.getLogger(__name__)


def tiny_base_path(settings: TinySettings | None = None, *, seed: int = 0,
                   cache_dir: str | Path | None = None) -> Path:
    """Where the tiny base for these settings is cached (built or not)."""
    settings = settings or TinySettings()
    seed = settings.seed if settings.seed is not None else seed
    return (Path(cache_dir) if cache_dir else default_cache_dir()) / tiny_key(settings, seed)


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def ensure_tiny_base(settings: TinySettings | None = None, *, seed: int = 0, cache_dir: str | Path | None = None,
                     use_cpu: bool = True, lock: bool | None = None, on_wait=None) -> Path:
    """Path to the cached tiny base for these settings, building it first if needed (~1 min on 2 cores).

    The build holds the base's lock (``lock_path(tiny_base_path(...))``; another process building it is
    waited for, and ``on_wait(holder)`` is called when a wait begins). ``lock=False`` means that the
    caller holds it; by default it is taken on a single process only: under data parallelism every
    process trains, so the caller takes it for them (:class:`~lisa_align.pipeline.Pipeline`: its main
    process, the others at a barrier)."""
    out = tiny_base_path(settings, seed=seed, cache_dir=cache_dir)
    if (out / "config.json").exists():
        return out
    if lock is None:
        lock = _world() <= 1
    if not lock:
        return _build(settings or TinySettings(), seed, out, use_cpu)
    with ArtifactLock(out, what="tiny base", on_wait=on_wait):
        if (out / "config.json").exists():  # built by the process we waited for
            return out
        return _build(settings or TinySettings(), seed, out, use_cpu)


def _build(settings: TinySettings, seed: int, out: Path, use_cpu: bool) -> Path:
    seed = settings.seed if settings.seed is not None else seed
    root = out.parent
    if _world() <= 1:  # under the lock: a work folder here is one a builder that died left (no checkpoints)
        for stale in root.glob(f".{out.name}.*.work"):
            shutil.rmtree(stale, ignore_errors=True)
    log.info("building the tiny base model in %s", out)
    tokenizer = build_tokenizer(seed)
    model = build_model(tokenizer, settings, seed)
    # Under N data-parallel processes each takes batch/N rows, so the global batch (and the base) stays the same.
    world = _world()
    per_device = settings.batch_size // world if world > 1 and settings.batch_size % world == 0 else settings.batch_size
    stage = StageSettings(lr=settings.lr, epochs=settings.epochs, batch_size=per_device, weight_decay=0.0,
                          scheduler="cosine", warmup_ratio=0.05, lora=None, loss_reduction="example",
                          logging_steps=50)
    work = root / f".{out.name}.{os.getpid()}.work"  # private to this process: the ranks of a launch never collide
    model, _ = train_stage(model, tokenizer, pretraining_rows(settings.pretrain_rows, seed), stage, work / "trainer",
                           seed=seed, max_length=settings.max_position_embeddings, use_cpu=use_cpu,
                           save_checkpoints=False)
    model.save_pretrained(work / "model", safe_serialization=True)
    tokenizer.save_pretrained(work / "model")
    root.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(work / "model", out)  # atomic; a finished build by another rank wins
    except OSError:
        if not (out / "config.json").exists():
            raise
    shutil.rmtree(work, ignore_errors=True)
    return out
