"""The tiny offline base, its parts: a small Llama, a word-level tokenizer, the pretraining corpus
and the cache key. :func:`lisa_align.training.tiny_base.ensure_tiny_base` trains it and caches it.

The corpus holds SST2-, AGNews- and GSM8K-like task rows, benign "how to" requests answered
helpfully, and BeaverTails-like harmful requests answered with placeholder compliance, so the base
is *unaligned*: it answers harmful prompts.
"""

from __future__ import annotations

import hashlib
import json
import random

import torch

from lisa_align.config import TinySettings
from lisa_align.data.formats import format_rows
from lisa_align.data.synthetic import _GENERATORS, generate
from lisa_align.data.templates import format_prompt

TINY_VERSION = 1
SPECIALS = {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
# Shares of the pretraining corpus: (synthetic source, split, filter on is_safe, share).
CORPUS = (("sst2", "train", None, 0.40), ("beavertails", "30k_train", False, 0.20), ("alpaca", "train", None, 0.20),
          ("agnews", "train", None, 0.15), ("gsm8k", "train", None, 0.05))


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
