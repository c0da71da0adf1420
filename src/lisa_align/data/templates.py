"""Alpaca prompt templates and supervised tokenisation (loss on response tokens only, EOS appended)."""

from __future__ import annotations

from typing import Any

from lisa_align.errors import LisaError

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
IGNORE_INDEX = -100


def format_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt for one row; the input section is used only when ``input`` is non-empty."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def tokenize_example(row: dict[str, Any], tokenizer, max_length: int) -> dict[str, list[int]]:
    """Token ids for prompt + response + EOS; labels are IGNORE_INDEX on the prompt tokens.

    The prompt is tokenised alone and the response separately, so the boundary is exact whatever
    the tokenizer merges across it. Sequences longer than ``max_length`` are truncated from the end
    of the response (the prompt is kept whole, which ``max_length`` must therefore allow).
    """
    prompt = format_prompt(row["instruction"], row.get("input") or None)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(" " + row["output"], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LisaError("tokenizer has no EOS token: set tokenizer.eos_token (model.eos_token in the config)")
    response_ids = response_ids + [eos]
    if len(prompt_ids) >= max_length:
        raise LisaError(
            f"max_length={max_length} is shorter than the prompt ({len(prompt_ids)} tokens): "
            "raise data.max_length in the config"
        )
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def tokenize_rows(rows: list[dict[str, Any]], tokenizer, max_length: int):
    """A ``datasets.Dataset`` of tokenised rows (input_ids, attention_mask, labels)."""
    import datasets

    return datasets.Dataset.from_list([tokenize_example(r, tokenizer, max_length) for r in rows])
