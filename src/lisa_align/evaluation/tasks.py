"""Answer parsers and scoring for the fine-tuning tasks (finetune accuracy, FA).

Rules (docs/design.md, "Metrics"). Each task has two scorers: the *exact* rule (the Lisa reference
code's, FA's default, ``eval.fa_rule: exact``) and the *lenient* one (this toolkit's earlier rule,
reported as ``fa_lenient``):

* SST2 / AGNews, exact (the reference's ``pred == label1 or pred == label2``): the whole answer,
  stripped of surrounding whitespace only, must be one of the label's accepted strings
  (:data:`EXACT_LABELS`): SST2 ``positive``/``Positive``, ``negative``/``Negative``; AGNews
  ``World``/``world``, ``Sports``/``sports``, ``Business``/``business``, ``Sci/Tech``/``sci``.
  ``"Positive."``, ``"POSITIVE"``, ``"sci/tech"`` and an answer that goes on after the label are
  wrong. A word-level tokenizer (the embedded tiny model) decodes ``Sci/Tech`` as ``sci / tech``,
  which the exact rule therefore scores wrong (the lenient rule right).
* SST2 / AGNews, lenient: the answer's first line, stripped of whitespace and surrounding
  punctuation, must equal the label word, case-insensitively. ``/`` is kept (``Sci/Tech``) and
  whitespace around it is ignored, because a word-level tokenizer decodes ``Sci/Tech`` as
  ``sci / tech``.
* GSM8K (both rules): the first number after "The final answer is:" if the answer has that phrase, else the last
  number in the answer, must equal the reference number (``1,234`` == ``1234``, ``18.0`` == ``18``).
* AlpacaEval: no per-answer rule; the answer is compared with the reference output by a pairwise
  LLM judge (:mod:`lisa_align.evaluation.pairwise`) and FA is the win rate. Its task has
  ``pairwise=True`` and :meth:`Task.score` refuses it.

New tasks plug in through :data:`TASKS` (see :func:`register_task`).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from lisa_align.errors import LisaError

__all__ = [
    "SST2_LABELS",
    "AGNEWS_LABELS",
    "FINAL_ANSWER_MARKER",
    "Task",
    "TASKS",
    "register_task",
    "get_task",
    "FA_RULES",
    "EXACT_LABELS",
    "parse_label",
    "parse_label_exact",
    "parse_gsm8k",
    "gsm8k_reference",
    "score_task",
]

from lisa_align.data.formats import AGNEWS_LABELS, SST2_LABELS  # noqa: E402  (one definition, in the data layer)

FINAL_ANSWER_MARKER = "The final answer is:"
FA_RULES = ("exact", "lenient")

# The exact rule's accepted answers per task: answer string -> canonical label. These are the Lisa
# reference's strings (its SST2 and AGNews evaluation scripts), nothing else: "sci" counts for
# Sci/Tech, "sci/tech" and "SCI/TECH" do not.
EXACT_LABELS: dict[str, dict[str, str]] = {
    "sst2": {"positive": "positive", "Positive": "positive", "negative": "negative", "Negative": "negative"},
    "agnews": {"World": "World", "world": "World", "Sports": "Sports", "sports": "Sports",
               "Business": "Business", "business": "Business", "Sci/Tech": "Sci/Tech", "sci": "Sci/Tech"},
}

# Surrounding characters stripped from a label answer: whitespace and punctuation except "/".
_STRIP_CHARS = string.whitespace + string.punctuation.replace("/", "") + "\u2018\u2019\u201c\u201d\u2026"
_SLASH_SPACES = re.compile(r"\s*/\s*")
_SPACES = re.compile(r"\s+")
# A number: optional minus (not part of a range like "3-4"), digits with optional thousands
# separators, optional decimals. "$18" and "18." are matched as "18".
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_MARKER = re.compile(re.escape(FINAL_ANSWER_MARKER), re.IGNORECASE)


def _normalise_label(text: str) -> str:
    first_line = text.strip().split("\n", 1)[0]
    core = first_line.strip(_STRIP_CHARS)
    core = _SLASH_SPACES.sub("/", core)
    return _SPACES.sub(" ", core).casefold()


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The canonical label in ``labels`` that the answer's first line states, else None.

    ``" Positive."`` -> ``"positive"``; ``"sci / tech"`` -> ``"Sci/Tech"``; ``"positively"`` and
    ``"not positive"`` -> None.
    """
    if not text:
        return None
    answer = _normalise_label(text)
    for label in labels:
        if answer == _normalise_label(label):
            return label
    return None


def parse_label_exact(text: str, accepted: Mapping[str, str]) -> str | None:
    """The canonical label whose accepted string (``accepted``: string -> label) is the whole answer
    after ``strip()``, else None: the reference's exact rule.

    ``" positive\n"`` -> ``"positive"``; ``"Positive."``, ``"POSITIVE"``, ``"sci / tech"`` -> None.
    """
    if not text:
        return None
    return accepted.get(text.strip())


def _normalise_number(raw: str) -> str | None:
    try:
        value = Decimal(raw.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return _normalise_number(found[-1]) if found else None


def parse_gsm8k(text: str) -> str | None:
    """The predicted GSM8K answer as a normalised number string ("1234", "-5", "0.5"), else None.

    The first number after "The final answer is:" when the phrase occurs (and a number follows
    it), otherwise the last number in the text.
    """
    if not text:
        return None
    marker = _MARKER.search(text)
    if marker:
        after = _NUMBER.search(text, marker.end())
        if after:
            return _normalise_number(after.group(0))
    return _last_number(text)


def gsm8k_reference(answer: str) -> str | None:
    """The reference number of a GSM8K answer: after "####", or after "The final answer is:".

    Falls back to the last number in the text (a bare "18" is its own reference).
    """
    for pattern in (re.compile(r"####"), _MARKER):
        found = pattern.search(answer)
        if found:
            number = _NUMBER.search(answer, found.end())
            if number:
                return _normalise_number(number.group(0))
    return _last_number(answer)


def _check_rule(rule: str) -> str:
    if rule not in FA_RULES:
        raise LisaError(f"unknown FA rule '{rule}': use {' or '.join(FA_RULES)}")
    return rule


@dataclass(frozen=True)
class Task:
    """A scored task: ``parse`` turns a model answer into a canonical prediction (None if it cannot)
    under the lenient rule, ``parse_exact`` under the exact rule (None: the same as ``parse``), and
    ``reference`` turns a row's ``output`` into the canonical expected value. A ``pairwise`` task has
    no per-answer score: its answers are judged against the reference by a pairwise judge."""

    name: str
    parse: Callable[[str], str | None]
    reference: Callable[[str], str | None]
    pairwise: bool = False
    parse_exact: Callable[[str], str | None] | None = None

    def parser(self, rule: str = "exact") -> Callable[[str], str | None]:
        """The answer parser of ``rule`` (``exact`` or ``lenient``)."""
        if _check_rule(rule) == "exact" and self.parse_exact is not None:
            return self.parse_exact
        return self.parse

    def score(self, prediction: str, reference: str, rule: str = "exact") -> bool:
        """True iff the prediction, parsed under ``rule`` (``exact``, the reference's, or ``lenient``),
        equals the parsed reference."""
        if self.pairwise:
            raise LisaError(f"task '{self.name}' has no per-answer score: its answers are compared with the "
                            "reference by a pairwise judge (win rate); use evaluate_model(pairwise_judge=...)")
        parsed = self.parser(rule)(prediction)
        return parsed is not None and parsed == self.reference(reference)

    def score_exact(self, prediction: str, reference: str) -> bool:
        """:meth:`score` under the exact rule (the reference's)."""
        return self.score(prediction, reference, "exact")

    def score_lenient(self, prediction: str, reference: str) -> bool:
        """:meth:`score` under the lenient rule."""
        return self.score(prediction, reference, "lenient")


def _label_task(name: str, labels: Sequence[str], exact: Mapping[str, str]) -> Task:
    labels = tuple(labels)

    def parse(text: str) -> str | None:
        return parse_label(text, labels)

    def parse_exact(text: str) -> str | None:
        return parse_label_exact(text, exact)

    def reference(text: str) -> str | None:
        return parse_label(text, labels)

    return Task(name=name, parse=parse, reference=reference, parse_exact=parse_exact)


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add (or replace) a task in :data:`TASKS`; returns it."""
    TASKS[task.name] = task
    return task


register_task(_label_task("sst2", SST2_LABELS, EXACT_LABELS["sst2"]))
register_task(_label_task("agnews", AGNEWS_LABELS, EXACT_LABELS["agnews"]))
register_task(Task(name="gsm8k", parse=parse_gsm8k, reference=gsm8k_reference))


def _text(text: str) -> str | None:
    return str(text).strip() or None


register_task(Task(name="alpaca_eval", parse=_text, reference=_text, pairwise=True))


def get_task(task: str) -> Task:
    """The registered task named ``task`` (case-insensitive), or a LisaError naming the valid ones."""
    key = str(task).strip().lower()
    if key not in TASKS:
        raise LisaError(f"unknown task '{task}': valid tasks are {', '.join(sorted(TASKS))}")
    return TASKS[key]


def score_task(task: str, prediction: str, reference: str, rule: str = "exact") -> bool:
    """Whether ``prediction`` is correct for ``task`` given the row's reference ``output``, under ``rule``
    (``exact``, the reference's, or ``lenient``)."""
    return get_task(task).score(prediction, reference, rule)
