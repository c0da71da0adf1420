"""Prompt templates and supervised tokenisation.

Two templates (``data.template``):

* ``alpaca`` (default): the Alpaca prompt; the loss falls on the response tokens only and EOS is appended.
* ``chat``: the row becomes chat messages (an optional system message, the user turn, the assistant
  turn; or the row's own ``messages``) rendered with the tokenizer's own chat template; the loss
  falls on the assistant turns (all of them, or the last one: ``data.loss_on``), each with the
  template's end-of-turn token(s) that follow it, so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
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
TEMPLATES = ("alpaca", "chat")
LOSS_ON = ("all_assistant", "last_assistant")


@dataclass(frozen=True)
class PromptFormat:
    """How rows become token ids and prompts: ``template`` (alpaca | chat), the chat ``system_prompt``
    (None: no system message unless the row has one) and ``loss_on`` (all_assistant | last_assistant)."""

    template: str = "alpaca"
    system_prompt: str | None = None
    loss_on: str = "all_assistant"

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise LisaError(f"unknown data.template '{self.template}': use {' or '.join(TEMPLATES)}")
        if self.loss_on not in LOSS_ON:
            raise LisaError(f"unknown data.loss_on '{self.loss_on}': use {' or '.join(LOSS_ON)}")

    @property
    def chat(self) -> bool:
        return self.template == "chat"

    @classmethod
    def of(cls, data: Any) -> PromptFormat:
        """The format of a ``DataSettings`` (or anything with ``template``/``system_prompt``/``loss_on``)."""
        if data is None:
            return ALPACA
        return cls(template=getattr(data, "template", "alpaca"), system_prompt=getattr(data, "system_prompt", None),
                   loss_on=getattr(data, "loss_on", "all_assistant"))


ALPACA = PromptFormat()


def format_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt for one row; the input section is used only when ``input`` is non-empty."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# ---- messages ------------------------------------------------------------------------------------


def user_text(instruction: str, input: str | None = None) -> str:
    """The user turn of an instruction row: the instruction, then a blank line and the input if any."""
    return f"{instruction}\n\n{input}" if input else instruction


def row_messages(row: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat messages of a row: its own ``messages`` (the ``messages`` format), or system (when
    ``system_prompt`` is set), user = instruction (+ input), assistant = output. ``system_prompt`` is
    put first where the row has no system message of its own."""
    if row.get("messages"):
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    else:
        msgs = [{"role": "user", "content": user_text(str(row["instruction"]), row.get("input") or None)},
                {"role": "assistant", "content": str(row["output"])}]
    if system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def prompt_messages(row: dict[str, Any], system_prompt: str | None = None, *,
                    with_input: bool = True) -> list[dict[str, str]]:
    """The messages the model answers at evaluation: the row's messages up to (without) its last
    assistant turn; for an instruction row, system (if any) and user (with the input when ``with_input``)."""
    if row.get("messages"):
        msgs = row_messages(row, system_prompt)
        last = max((k for k, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        return msgs[:last]
    inp = row.get("input") or None if with_input else None
    msgs = [{"role": "user", "content": user_text(str(row["instruction"]), inp)}]
    if system_prompt:
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def alpaca_fields(row: dict[str, Any]) -> tuple[str, str, str]:
    """(instruction, input, output) of a row for the Alpaca template; a ``messages`` row must hold one
    user and one assistant turn (plus an optional system message, which Alpaca has no place for)."""
    msgs = row.get("messages")
    if msgs:
        roles = [m["role"] for m in msgs if m["role"] != "system"]
        if roles != ["user", "assistant"]:
            raise LisaError(f"{row.get('origin') or 'a messages row'}: a multi-turn conversation "
                            f"({', '.join(roles)}); the alpaca template takes one user and one assistant turn: "
                            "set data.template: chat")
        user = next(m["content"] for m in msgs if m["role"] == "user")
        assistant = next(m["content"] for m in msgs if m["role"] == "assistant")
        return user, "", assistant
    return str(row["instruction"]), row.get("input") or "", str(row["output"])


# ---- chat templates ------------------------------------------------------------------------------


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def check_chat_template(tokenizer) -> None:
    """A one-line LisaError unless ``tokenizer`` has a chat template."""
    if tokenizer is None:
        raise LisaError("data.template: chat renders prompts with the model's tokenizer, but none was given: "
                        "pass the tokenizer, or use data.template: alpaca")
    if not getattr(tokenizer, "chat_template", None):
        raise LisaError(f"data.template: chat needs a chat template, but the tokenizer of "
                        f"'{_tokenizer_name(tokenizer)}' has none: use data.template: alpaca, "
                        "or a model (tokenizer) that ships a chat template")


def render_chat(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """The chat-template text of ``messages`` (template errors, e.g. roles out of order, as LisaError)."""
    check_chat_template(tokenizer)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2 TemplateError and the template's own raise_exception
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LisaError(f"the chat template of '{_tokenizer_name(tokenizer)}' refused the conversation "
                        f"(roles {', '.join(m['role'] for m in messages)}): {first[:200]}") from None
    if not isinstance(text, str):
        raise LisaError(f"the chat template of '{_tokenizer_name(tokenizer)}' did not render text")
    return text


def chat_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The generation prompt: ``messages`` (no assistant answer) with the template's generation prompt."""
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


END_OF_TURN_PROBE = "LisaEndOfTurnProbe"  # assistant content that no template rewrites (templates may trim)


def _added_ids(tokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens and of the tokens added to its vocabulary."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    ids.update(int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {}))
    return ids


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token the chat template puts right after an assistant message's content (Llama-3's
    ``<|eot_id|>``, Gemma's ``<end_of_turn>``, ChatML's ``<|im_end|>``), as a one-id list; [] when
    the template puts no special or added token there (e.g. plain text such as a newline).

    Found by rendering a user turn and an assistant turn whose content is a probe string: the text
    after the probe (leading whitespace aside) is tokenised without special tokens and its first
    token is taken if it is one of the tokenizer's special/added tokens. A chat model ends its answer
    with it, so generation stops there (:func:`lisa_align.evaluation.generation.generation_options`).
    """
    text = render_chat(tokenizer, [{"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": END_OF_TURN_PROBE}])
    at = text.rfind(END_OF_TURN_PROBE)
    if at < 0:
        return []
    after = text[at + len(END_OF_TURN_PROBE):].lstrip()
    ids = _ids(tokenizer, after) if after else []
    if not ids or int(ids[0]) == getattr(tokenizer, "unk_token_id", None):  # unknown text is no end token
        return []
    return [int(ids[0])] if int(ids[0]) in _added_ids(tokenizer) else []


def tokenize_chat(messages: list[dict[str, str]], tokenizer, max_length: int,
                  loss_on: str = "all_assistant") -> dict[str, list[int]]:
    """Token ids of a conversation through the tokenizer's chat template; labels are the assistant turns.

    For each assistant turn j the span is [the conversation up to j with the generation prompt, the
    conversation up to and including j): the answer and the end-of-turn token(s) the template puts
    after it. Each boundary is checked to be a token boundary of the whole conversation's ids (each
    rendered prefix must be a text prefix and tokenise to a prefix of the ids); where the tokenizer
    merges across a boundary, the conversation is tokenised piecewise at the boundaries instead, so
    the span is still exact. Truncated from the end to ``max_length``.
    """
    if loss_on not in LOSS_ON:
        raise LisaError(f"unknown data.loss_on '{loss_on}': use {' or '.join(LOSS_ON)}")
    turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise LisaError("a conversation without an assistant turn has nothing to learn: add an assistant message")
    if loss_on == "last_assistant":
        turns = turns[-1:]
    full = render_chat(tokenizer, messages[: max(turns) + 1])
    cuts: list[tuple[int, int]] = []  # character spans of the labelled turns
    for j in turns:
        start = render_chat(tokenizer, messages[:j], add_generation_prompt=True)
        end = render_chat(tokenizer, messages[: j + 1])
        if not (full.startswith(end) and end.startswith(start)):
            raise LisaError(f"the chat template of '{_tokenizer_name(tokenizer)}' renders turn {j + 1} differently "
                            "in a longer conversation, so the assistant turn cannot be located; use data.template: "
                            "alpaca or another model's template")
        cuts.append((len(start), len(end)))
    full_ids = _ids(tokenizer, full)
    bounds = sorted({c for span in cuts for c in span})
    token_at: dict[int, int] = {}
    for c in bounds:
        pre = _ids(tokenizer, full[:c])
        if full_ids[: len(pre)] != pre:
            break
        token_at[c] = len(pre)
    if len(token_at) != len(bounds):  # a merge across a boundary: tokenise piece by piece
        full_ids, token_at, prev = [], {}, 0
        for c in [*bounds, len(full)]:
            full_ids += _ids(tokenizer, full[prev:c])
            token_at[c] = len(full_ids)
            prev = c
    labels = [IGNORE_INDEX] * len(full_ids)
    for a, b in cuts:
        labels[token_at[a]: token_at[b]] = full_ids[token_at[a]: token_at[b]]
    first = token_at[cuts[0][0]]
    if first >= max_length:
        raise LisaError(f"max_length={max_length} is shorter than the prompt before the first labelled assistant "
                        f"turn ({first} tokens): raise data.max_length in the config")
    input_ids = full_ids[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels[:max_length]}


# ---- tokenisation --------------------------------------------------------------------------------


def tokenize_example(row: dict[str, Any], tokenizer, max_length: int,
                     fmt: PromptFormat | None = None) -> dict[str, list[int]]:
    """Token ids and labels of one row in ``fmt`` (default: Alpaca).

    Alpaca: prompt + response + EOS; labels are IGNORE_INDEX on the prompt tokens. The prompt is
    tokenised alone and the response separately, so the boundary is exact whatever the tokenizer
    merges across it. Sequences longer than ``max_length`` are truncated from the end of the response
    (the prompt is kept whole, which ``max_length`` must therefore allow). Chat: :func:`tokenize_chat`.
    """
    fmt = fmt or ALPACA
    if fmt.chat:
        try:
            return tokenize_chat(row_messages(row, fmt.system_prompt), tokenizer, max_length, fmt.loss_on)
        except LisaError as e:
            if row.get("origin"):
                raise LisaError(f"{row['origin']}: {e}") from None
            raise
    instruction, inp, output = alpaca_fields(row)
    prompt = format_prompt(instruction, inp or None)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(" " + output, add_special_tokens=False)["input_ids"]
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


def tokenize_rows(rows: list[dict[str, Any]], tokenizer, max_length: int, fmt: PromptFormat | None = None):
    """A ``datasets.Dataset`` of tokenised rows (input_ids, attention_mask, labels) in ``fmt``."""
    import datasets

    fmt = fmt or ALPACA
    if fmt.chat and rows:
        check_chat_template(tokenizer)
    return datasets.Dataset.from_list([tokenize_example(r, tokenizer, max_length, fmt) for r in rows])
