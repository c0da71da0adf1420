"""The tiny offline base: a small Llama and a word-level tokenizer, built and trained on CPU.

It is trained (response-only SFT, per-example loss) on a synthetic corpus of SST2-, AGNews- and
GSM8K-like task rows, benign "how to" requests answered helpfully, and BeaverTails-like harmful
requests answered with placeholder compliance. It is therefore *unaligned*: it answers harmful
prompts. It is saved with ``save_pretrained`` and cached by a hash of its settings, so later runs
reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch

from lisa_align.config import StageSettings, TinySettings
from lisa_align.data.formats import format_rows
from lisa_align.data.synthetic import _GENERATORS, generate
from lisa_align.data.templates import format_prompt

log = logging.getLogger(__name__)
TINY_VERSION = 1
SPECIALS = {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
# Shares of the pretraining corpus: (synthetic source, split, filter on is_safe, share).
CORPUS = (("sst2", "train", None, 0.40), ("beavertails", "30k_train", False, 0.20), ("alpaca", "train", None, 0.20),
          ("agnews", "train", None, 0.15), ("gsm8k", "train", None, 0.05))


def default_cache_dir() -> Path:
    return Path(os.environ.get("LISA_ALIGN_CACHE", Path.home() / ".cache" / "lisa-align"))


def _texts_for_vocab(seed: int):
    """Every text the synthetic sources can emit, formatted as prompts and answers."""
    for name, (_, splits) in _GENERATORS.items():
        for split in splits:
            for row in format_rows(generate(name, split, seed=seed, size=300), "auto", name):
                yield format_prompt(row["instruction"], row["input"] or None)
                yield row["output"]


def build_tokenizer(seed: int = 0):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=SPECIALS["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIALS.values()), min_frequency=1)
    tok.train_from_iterator(_texts_for_vocab(seed), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **SPECIALS)


def build_model(tokenizer, settings: TinySettings, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads, max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def pretraining_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows: list[dict] = []
    for name, split, safe, share in CORPUS:
        k = int(round(n * share))
        pool = format_rows(generate(name, split, seed=seed), "auto", f"synthetic:{name}")
        if safe is not None:
            pool = [r for r in pool if r["is_safe"] == safe]
        rows += [pool[i % len(pool)] for i in range(k)]
    rng.shuffle(rows)
    return rows


def tiny_key(settings: TinySettings, seed: int) -> str:
    blob = json.dumps({"v": TINY_VERSION, "seed": seed, **settings.model_dump(exclude={"seed"})}, sort_keys=True)
    return "tiny-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tiny_base(settings: TinySettings | None = None, *, seed: int = 0, cache_dir: str | Path | None = None,
                    use_cpu: bool = True) -> Path:
    """Path to the cached tiny base for these settings, building it first if needed (~1 min on 2 cores)."""
    from lisa_align.training.run import train_stage

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
