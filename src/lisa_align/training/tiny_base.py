"""The tiny offline base, trained: :func:`ensure_tiny_base` builds it on first use (about a minute
on 2 cores: response-only SFT with per-example loss on the synthetic corpus of
:mod:`lisa_align.models.tiny`), saves it with ``save_pretrained`` and caches it by a hash of its
settings, so later runs reuse it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from lisa_align.config import StageSettings, TinySettings
from lisa_align.io import default_cache_dir
from lisa_align.models.tiny import build_model, build_tokenizer, pretraining_rows, tiny_key
from lisa_align.training.run import train_stage

log = logging.getLogger(__name__)


def ensure_tiny_base(settings: TinySettings | None = None, *, seed: int = 0, cache_dir: str | Path | None = None,
                    use_cpu: bool = True) -> Path:
    """Path to the cached tiny base for these settings, building it first if needed (~1 min on 2 cores)."""
    settings = settings or TinySettings()
    seed = settings.seed if settings.seed is not None else seed
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / tiny_key(settings, seed)
    if (out / "config.json").exists():
        return out
    log.info("building the tiny base model in %s", out)
    tokenizer = build_tokenizer(seed)
    model = build_model(tokenizer, settings, seed)
    # Under N data-parallel processes each takes batch/N rows, so the global batch (and the base) stays the same.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = settings.batch_size // world if world > 1 and settings.batch_size % world == 0 else settings.batch_size
    stage = StageSettings(lr=settings.lr, epochs=settings.epochs, batch_size=per_device, weight_decay=0.0,
                          scheduler="cosine", warmup_ratio=0.05, lora=None, loss_reduction="example",
                          logging_steps=50)
    work = root / f".{out.name}.{os.getpid()}.work"  # private to this process: concurrent builds never collide
    model, _ = train_stage(model, tokenizer, pretraining_rows(settings.pretrain_rows, seed), stage, work / "trainer",
                           seed=seed, max_length=settings.max_position_embeddings, use_cpu=use_cpu,
                           save_checkpoints=False)
    model.save_pretrained(work / "model", safe_serialization=True)
    tokenizer.save_pretrained(work / "model")
    root.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(work / "model", out)  # atomic; a finished build by another process wins
    except OSError:
        if not (out / "config.json").exists():
            raise
    shutil.rmtree(work, ignore_errors=True)
    return out
