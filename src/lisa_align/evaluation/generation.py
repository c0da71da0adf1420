"""Greedy answer generation: batched with left padding, plus a one-by-one reference path.

Both paths decode greedily (``do_sample=False``) and return only the newly generated text, decoded
with ``skip_special_tokens=True`` and stripped. With a model that honours the attention mask (and
transformers derives position ids from it inside ``generate``), the batched answers are the same
as the one-by-one answers; ``tests/test_evaluation.py`` checks this.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from lisa_align.errors import LisaError

__all__ = ["generate", "generate_one_by_one"]


@contextlib.contextmanager
def _padding_setup(tokenizer, side: str) -> Iterator[int]:
    """Temporarily pad on ``side`` (and with EOS when the tokenizer has no pad token); yields the pad id."""
    old_side = tokenizer.padding_side
    old_pad = tokenizer.pad_token
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise LisaError("tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = side
    try:
        yield tokenizer.pad_token_id
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """``model.eval()`` + ``torch.inference_mode()``, restoring the training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def _generate_kwargs(model, tokenizer, pad_token_id: int, max_new_tokens: int) -> dict[str, Any]:
    """Greedy-decoding keyword arguments, overriding any sampling defaults in the model's config."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "num_beams": 1,
        "pad_token_id": pad_token_id,
    }
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        # Silence "temperature is set but do_sample=False" style warnings from chat models' configs.
        for name in ("temperature", "top_p", "top_k"):
            if getattr(gen_cfg, name, None) is not None:
                kwargs[name] = None
    if getattr(gen_cfg, "eos_token_id", None) is None and tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    return kwargs


def _model_device(model) -> torch.device:
    try:
        return model.device
    except AttributeError:  # plain nn.Module wrappers
        return next(model.parameters()).device


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    desc: str = "generate",
    add_special_tokens: bool = True,
) -> list[str]:
    """Greedy answers for ``prompts``, batched with left padding; answers come back in input order.

    ``add_special_tokens=False`` for prompts that already hold them (a rendered chat template).

    Prompts are sorted by token length (longest first, so memory problems show up at once) to keep
    padding small.
    """
    if not prompts:
        return []
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    answers: list[str | None] = [None] * len(prompts)
    with _padding_setup(tokenizer, "left") as pad_id, _eval_mode(model):
        kwargs = _generate_kwargs(model, tokenizer, pad_id, max_new_tokens)
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=None) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                add_special_tokens=add_special_tokens)
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                out = model.generate(**enc, **kwargs)
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for i, text in zip(idx, texts):
                    answers[i] = text.strip()
                bar.update(len(idx))
    return [a if a is not None else "" for a in answers]


def generate_one_by_one(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers one prompt at a time, without padding (the reference for benchmarks and tests).

    ``batch_size`` is accepted for signature compatibility with :func:`generate` and ignored.
    """
    del batch_size
    if not prompts:
        return []
    device = _model_device(model)
    answers: list[str] = []
    with _padding_setup(tokenizer, "left") as pad_id, _eval_mode(model):
        kwargs = _generate_kwargs(model, tokenizer, pad_id, max_new_tokens)
        for prompt in tqdm(prompts, desc=desc, unit="prompt", disable=None):
            enc = tokenizer(prompt, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out = model.generate(**enc, **kwargs)
            text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            answers.append(text.strip())
    return answers
