"""Pairwise LLM judges: AlpacaEval-style win rates against reference outputs.

A pairwise judge compares, for each instruction, the evaluated model's output with a reference
output and returns the *preference* for the model's output, a number in [0, 1] (1 = the model's
output is better, 0.5 = no preference). The win rate is ``100 x mean(preferences)``.

:class:`LocalPairwiseJudge` asks a local (or downloaded) causal LM which of two outputs, "(a)" or
"(b)", is better and reads the next-token distribution after the question (one forward pass per
batch, no generation): ``P(a) = softmax(logit_a, logit_b)[0]``. Each pair is judged in both orders
(the model's output as (a), then as (b)) and the two preferences are averaged, which cancels any
position bias of the judge.

New judges plug in through :data:`PAIRWISE_JUDGES` (see :func:`register_pairwise_judge`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from lisa_align.config import PAIRWISE_JUDGE_NAMES, judge_key
from lisa_align.errors import LisaError
from lisa_align.evaluation.generation import _eval_mode, _padding_setup
from lisa_align.evaluation.judges import _device_and_dtype, _load_judge_model

__all__ = [
    "PAIRWISE_TEMPLATE",
    "PLAIN_ANSWER_SUFFIX",
    "ANSWER_LABELS",
    "PairwiseJudge",
    "LocalPairwiseJudge",
    "PAIRWISE_JUDGES",
    "register_pairwise_judge",
    "get_pairwise_judge",
    "win_rate",
]

# The question the judge model answers; it is the user message when the tokenizer has a chat
# template, else plain text followed by PLAIN_ANSWER_SUFFIX.
PAIRWISE_TEMPLATE = (
    "Two outputs were written for the same instruction. Decide which output follows the instruction "
    "better: more helpful, more accurate and more relevant. Do not let the order or the length of the "
    "outputs affect your decision.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Output (a):\n{output_a}\n\n"
    "### Output (b):\n{output_b}\n\n"
    "Which output is better, (a) or (b)? Answer with a single letter: a or b."
)
PLAIN_ANSWER_SUFFIX = "\n\n### Answer:"
ANSWER_LABELS = ("a", "b")
# Tokens kept free for tokenisation differences at the joins when long outputs are shortened.
_FIT_MARGIN = 8


class PairwiseJudge:
    """Base class: subclasses set ``name`` and implement :meth:`compare`."""

    name: str = "pairwise"

    def compare(self, instructions: Sequence[str], outputs: Sequence[str], references: Sequence[str]) -> list[float]:
        """For each instruction, the preference for ``outputs[i]`` over ``references[i]``, in [0, 1]."""
        raise NotImplementedError

    @staticmethod
    def _check_lengths(instructions: Sequence[str], outputs: Sequence[str], references: Sequence[str]) -> None:
        if not len(instructions) == len(outputs) == len(references):
            raise LisaError(f"pairwise judge got {len(instructions)} instructions, {len(outputs)} outputs and "
                            f"{len(references)} references; give one output and one reference per instruction")


class LocalPairwiseJudge(PairwiseJudge):
    """A causal LM (local folder or HF id) as the pairwise judge, read from its next-token logits.

    * The prompt is :data:`PAIRWISE_TEMPLATE`, rendered with the tokenizer's chat template (one user
      message, generation prompt added) when it has one, else as plain text followed by
      :data:`PLAIN_ANSWER_SUFFIX` (``use_chat_template`` forces either).
    * The answer tokens are found by tokenising the prompt followed by ``a``, `` a``, ``A`` and
      `` A`` (likewise for b): the first token after the prompt, minus special tokens and tokens both
      letters share. A letter's score is the log-sum-exp of its tokens' logits.
    * Outputs longer than ``max_length`` allows are shortened symmetrically (the longer output first,
      by the same rule in both orders); the prompt's end, with the question, is always kept.
    * Batched with left padding; position ids follow the attention mask.

    ``device`` defaults to CUDA when available; ``dtype`` to bfloat16 on CUDA, float32 elsewhere.
    """

    name = "local"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        batch_size: int = 8,
        max_length: int = 4096,
        device: Any = None,
        trust_remote_code: bool = False,
        dtype: Any = None,
        use_chat_template: bool | None = None,
        allow_pickle: bool = False,
    ):
        from transformers import AutoModelForCausalLM

        if not model_name_or_path:
            raise LisaError("pairwise judge 'local' needs a model: pass model_name_or_path=PATH "
                            "(eval.pairwise_judge_model, or lisa evaluate RUN_DIR --pairwise-judge-model PATH)")
        self.model_name_or_path = str(model_name_or_path)
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        if self.batch_size < 1:
            raise LisaError(f"pairwise judge batch_size must be >= 1, got {batch_size}")
        if self.max_length < 16:
            raise LisaError(f"pairwise judge max_length must be >= 16 tokens, got {max_length}")
        self.device, dtype = _device_and_dtype(device, dtype)
        self.tokenizer, model = _load_judge_model(self.model_name_or_path, AutoModelForCausalLM, dtype,
                                                  "a tokenizer and a causal LM", trust_remote_code=trust_remote_code,
                                                  allow_pickle=allow_pickle)
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise LisaError(f"pairwise judge tokenizer '{self.model_name_or_path}' has no chat template; "
                            "pass use_chat_template=None to use plain text")
        self.use_chat_template = has_template if use_chat_template is None else bool(use_chat_template)
        self.model = model.to(self.device).eval()
        self.answer_token_ids = self._answer_token_ids()

    # ---- prompt -----------------------------------------------------------------------------
    def format_input(self, instruction: str, output_a: str, output_b: str) -> str:
        """The full judge input for one comparison (chat-rendered, or plain text)."""
        text = PAIRWISE_TEMPLATE.format(instruction=instruction, output_a=output_a, output_b=output_b)
        if not self.use_chat_template:
            return text + PLAIN_ANSWER_SUFFIX
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)

    @property
    def _add_special_tokens(self) -> bool:
        return not self.use_chat_template  # a rendered chat template already holds BOS & co.

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=self._add_special_tokens)["input_ids"])

    def _answer_token_ids(self) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        base = self.format_input("x", "y", "z")
        base_ids = self._encode(base)
        special = set(tok.all_special_ids)
        found: list[list[int]] = []
        for label in ANSWER_LABELS:
            ids: list[int] = []
            for text in dict.fromkeys((label, " " + label, label.upper(), " " + label.upper())):
                full = self._encode(base + text)
                if len(full) > len(base_ids) and full[: len(base_ids)] == base_ids:
                    tid = full[len(base_ids)]
                else:  # the answer merged with the prompt's end: fall back to the text alone
                    alone = tok(text, add_special_tokens=False)["input_ids"]
                    if len(alone) != 1:
                        continue
                    tid = alone[0]
                if tid not in special and tid not in ids:
                    ids.append(tid)
            found.append(ids)
        shared = set(found[0]) & set(found[1])
        a, b = ([t for t in ids if t not in shared] for ids in found)
        for label, ids in zip(ANSWER_LABELS, (a, b)):
            if not ids:
                raise LisaError(f"pairwise judge tokenizer '{self.model_name_or_path}' has no token of its own for "
                                f"the answer '{label}': use a judge model whose tokenizer encodes 'a' and 'b'")
        return a, b

    def _cut(self, text: str, n_tokens: int) -> str:
        """``text`` shortened to its first ``n_tokens`` tokens."""
        if n_tokens <= 0:
            return ""
        tok = self.tokenizer
        if getattr(tok, "is_fast", False):
            offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            return text if len(offsets) <= n_tokens else text[: offsets[n_tokens - 1][1]]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= n_tokens else tok.decode(ids[:n_tokens])

    def _fit(self, instruction: str, first: str, second: str) -> tuple[str, str]:
        """The two outputs, shortened so that the prompt fits ``max_length``; symmetric in the two
        outputs, so that both orders of a pair are judged on the same texts."""
        n1, n2 = (len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (first, second))
        total = self.max_length - len(self._encode(self.format_input(instruction, "", ""))) - _FIT_MARGIN
        if n1 + n2 <= total:
            return first, second
        total = max(total, 0)
        short = min(n1, n2)
        keep_short, keep_long = (short, total - short) if short <= total // 2 else (total // 2, total // 2)
        keep1, keep2 = (keep_short, keep_long) if n1 <= n2 else (keep_long, keep_short)
        return self._cut(first, keep1), self._cut(second, keep2)

    # ---- scoring ----------------------------------------------------------------------------
    def _forward_kwargs(self) -> dict[str, Any]:
        """Ask the model for the last position's logits only when it supports that."""
        try:
            params = inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return {}
        for name in ("logits_to_keep", "num_logits_to_keep"):
            if name in params:
                return {name: 1}
        return {}

    def _probabilities_of_a(self, texts: list[str]) -> list[float]:
        """P(a) (softmax over the two answers) after each rendered prompt."""
        import torch
        from tqdm.auto import tqdm

        if not texts:
            return []
        tok = self.tokenizer
        ids_a, ids_b = (torch.tensor(ids, device=self.device) for ids in self.answer_token_ids)
        lengths = [len(ids) for ids in tok(texts, add_special_tokens=self._add_special_tokens)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        probs: list[float | None] = [None] * len(texts)
        extra = self._forward_kwargs()
        old_truncation = tok.truncation_side
        tok.truncation_side = "left"  # the question at the end must survive
        try:
            with _padding_setup(tok, "left"), _eval_mode(self.model):
                for start in tqdm(range(0, len(order), self.batch_size), desc="pairwise judge", disable=None):
                    idx = order[start : start + self.batch_size]
                    enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                              max_length=self.max_length, add_special_tokens=self._add_special_tokens)
                    mask = enc["attention_mask"].to(self.device)
                    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
                    logits = self.model(input_ids=enc["input_ids"].to(self.device), attention_mask=mask,
                                        position_ids=position_ids, **extra).logits[:, -1, :].float()
                    scores = torch.stack([torch.logsumexp(logits[:, ids_a], -1),
                                          torch.logsumexp(logits[:, ids_b], -1)], -1)
                    for i, p in zip(idx, torch.softmax(scores, -1)[:, 0].cpu().tolist()):
                        probs[i] = float(p)
        finally:
            tok.truncation_side = old_truncation
        return [p if p is not None else 0.5 for p in probs]

    def probabilities(self, instructions: Sequence[str], outputs_a: Sequence[str],
                      outputs_b: Sequence[str]) -> list[float]:
        """P(the judge answers "a") for each (instruction, output (a), output (b)), in one order only."""
        self._check_lengths(instructions, outputs_a, outputs_b)
        texts = [self.format_input(i, *self._fit(i, a, b)) for i, a, b in zip(instructions, outputs_a, outputs_b)]
        return self._probabilities_of_a(texts)

    def compare(self, instructions: Sequence[str], outputs: Sequence[str], references: Sequence[str]) -> list[float]:
        """Preference for each output over its reference: the mean of P(a) with the output as (a)
        and P(b) with the output as (b)."""
        self._check_lengths(instructions, outputs, references)
        fitted = [(str(i), *self._fit(str(i), str(o), str(r))) for i, o, r in zip(instructions, outputs, references)]
        output_first = [self.format_input(i, o, r) for i, o, r in fitted]
        reference_first = [self.format_input(i, r, o) for i, o, r in fitted]
        p_a = self._probabilities_of_a(output_first + reference_first)
        n = len(fitted)
        return [(p_a[k] + (1.0 - p_a[n + k])) / 2 for k in range(n)]


PAIRWISE_JUDGES: dict[str, Callable[..., PairwiseJudge]] = {}


def register_pairwise_judge(name: str, factory: Callable[..., PairwiseJudge] | None = None):
    """Register ``factory`` (a PairwiseJudge class or a function returning one) as ``name``
    (case-insensitive, ``-``/``_`` ignored); returns it. Without ``factory``, a decorator."""

    def add(f: Callable[..., PairwiseJudge]) -> Callable[..., PairwiseJudge]:
        PAIRWISE_JUDGES[judge_key(name)] = f
        PAIRWISE_JUDGE_NAMES.add(judge_key(name))  # a config may name it from now on
        return f

    return add if factory is None else add(factory)


register_pairwise_judge("local", LocalPairwiseJudge)


def get_pairwise_judge(name: str, **kwargs: Any) -> PairwiseJudge:
    """Build the pairwise judge registered as ``name`` with ``kwargs`` (e.g. model_name_or_path)."""
    key = judge_key(name)
    if key not in PAIRWISE_JUDGES:
        raise LisaError(f"unknown pairwise judge '{name}': valid pairwise judges are "
                        f"{', '.join(sorted(PAIRWISE_JUDGES))}")
    return PAIRWISE_JUDGES[key](**kwargs)


def win_rate(preferences: Sequence[float]) -> float:
    """The win rate in percent: ``100 x mean(preferences)`` (a tie, 0.5, counts as half a win)."""
    prefs = [float(p) for p in preferences]
    if not prefs:
        raise LisaError("win_rate needs at least one preference")
    bad = [p for p in prefs if not 0.0 <= p <= 1.0]
    if bad:
        raise LisaError(f"preferences must lie in [0, 1], got {bad[0]}")
    return 100.0 * sum(prefs) / len(prefs)
