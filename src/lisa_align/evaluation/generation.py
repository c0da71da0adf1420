"""Greedy answer generation: batched with left padding, plus a one-by-one reference path.

Both paths decode greedily (``do_sample=False``) and return only the newly generated text, decoded
with ``skip_special_tokens=True`` and stripped. With a model that honours the attention mask (and
transformers derives position ids from it inside ``generate``), the batched answers are the same
as the one-by-one answers; ``tests/test_evaluation.py`` checks this.

How a prompt format generates is decided in one place, :func:`generation_options`: nothing changes
for Alpaca prompts; chat prompts (a rendered chat template) get no special tokens added and stop at
the template's end-of-turn token as well as at EOS (``stop_token_ids``), where the answer is cut.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lisa_align.data.templates import PromptFormat, end_of_turn_ids
from lisa_align.errors import LisaError

__all__ = ["generate", "generate_one_by_one", "generation_options"]


def generation_options(fmt: PromptFormat | None, tokenizer) -> dict[str, Any]:
    """The keyword arguments of :func:`generate`, :func:`generate_one_by_one` (and the vLLM backend)
    for prompts in ``fmt``. Alpaca (or None): none, so generation is as it always was. Chat: the
    rendered template holds its own special tokens (``add_special_tokens=False``), and an answer ends
    at the tokenizer's EOS or at the template's end-of-turn token (:func:`end_of_turn_ids`), which
    differ for e.g. Llama-3 (``<|end_of_text|>`` / ``<|eot_id|>``) and Gemma (``<eos>`` /
    ``<end_of_turn>``): ``stop_token_ids``. The model's own generation-config EOS is added by
    :func:`generate`."""
    if fmt is None or not fmt.chat:
        return {}
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    return {"add_special_tokens": False, "stop_token_ids": list(dict.fromkeys(eos + end_of_turn_ids(tokenizer)))}


def _id_list(value) -> list[int]:
    """An eos_token_id setting (None, an int or a list of ints) as a list."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


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


def _generate_kwargs(model, tokenizer, pad_token_id: int, max_new_tokens: int,
                     stop_token_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Greedy-decoding keyword arguments, overriding any sampling defaults in the model's config.

    Without ``stop_token_ids`` generation ends at the generation config's EOS (the tokenizer's when
    the config has none). With them (chat prompts) it ends at any of: the generation config's EOS
    (an id or a list), the tokenizer's EOS and ``stop_token_ids``; ``eos_token_id`` is then that list."""
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
    if stop_token_ids is not None:
        stops = [*_id_list(getattr(gen_cfg, "eos_token_id", None)), *_id_list(tokenizer.eos_token_id),
                 *_id_list(stop_token_ids)]
        if stops:
            kwargs["eos_token_id"] = list(dict.fromkeys(stops))
    elif getattr(gen_cfg, "eos_token_id", None) is None and tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    return kwargs


def _decode(tokenizer, new_tokens, stops: list[int] | None) -> str:
    """The answer in ``new_tokens`` (one row): cut before the first stop token when ``stops`` is given
    (so neither the end-of-turn token nor the padding after it reaches the text), decoded with special
    tokens skipped and stripped."""
    ids = new_tokens.tolist()
    if stops:
        stop_set = set(stops)
        ids = next((ids[:k] for k, t in enumerate(ids) if t in stop_set), ids)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


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
    stop_token_ids: Sequence[int] | None = None,
) -> list[str]:
    """Greedy answers for ``prompts``, batched with left padding; answers come back in input order.

    ``add_special_tokens=False`` for prompts that already hold them (a rendered chat template).
    ``stop_token_ids`` (chat: the end-of-turn token) end an answer besides EOS, and the answer is cut
    before the first of them (:func:`_generate_kwargs`); :func:`generation_options` gives both.

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
        kwargs = _generate_kwargs(model, tokenizer, pad_id, max_new_tokens, stop_token_ids)
        stops = kwargs.get("eos_token_id") if stop_token_ids is not None else None
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=None) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                add_special_tokens=add_special_tokens)
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                out = model.generate(**enc, **kwargs)
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                if stops is None:
                    texts = [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
                else:
                    texts = [_decode(tokenizer, row, stops) for row in new_tokens]
                for i, text in zip(idx, texts):
                    answers[i] = text
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
    add_special_tokens: bool = True,
    stop_token_ids: Sequence[int] | None = None,
) -> list[str]:
    """Greedy answers one prompt at a time, without padding (the reference for benchmarks and tests).

    ``batch_size`` is accepted for signature compatibility with :func:`generate` and ignored;
    ``add_special_tokens`` and ``stop_token_ids`` are as in :func:`generate`.
    """
    del batch_size
    if not prompts:
        return []
    device = _model_device(model)
    answers: list[str] = []
    with _padding_setup(tokenizer, "left") as pad_id, _eval_mode(model):
        kwargs = _generate_kwargs(model, tokenizer, pad_id, max_new_tokens, stop_token_ids)
        stops = kwargs.get("eos_token_id") if stop_token_ids is not None else None
        for prompt in tqdm(prompts, desc=desc, unit="prompt", disable=None):
            enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out = model.generate(**enc, **kwargs)
            new_tokens = out[0, enc["input_ids"].shape[1] :]
            if stops is None:
                answers.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
            else:
                answers.append(_decode(tokenizer, new_tokens, stops))
    return answers
