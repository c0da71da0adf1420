"""Evaluation: batched greedy generation, harmfulness judges, task scoring, metrics files."""

from lisa_align.evaluation.evaluate import evaluate_model, rejudge, row_categories
from lisa_align.evaluation.generation import generate, generate_one_by_one
from lisa_align.evaluation.judges import (
    BEAVERDAM_TEMPLATE,
    BEAVERTAILS_CATEGORIES,
    JUDGES,
    REFUSAL_PREFIXES,
    BeaverDamJudge,
    Judge,
    RefusalJudge,
    Verdict,
    get_judge,
    is_refusal,
)
from lisa_align.evaluation.tasks import (
    AGNEWS_LABELS,
    SST2_LABELS,
    TASKS,
    Task,
    get_task,
    gsm8k_reference,
    parse_gsm8k,
    parse_label,
    register_task,
    score_task,
)

__all__ = [
    "AGNEWS_LABELS",
    "BEAVERDAM_TEMPLATE",
    "BEAVERTAILS_CATEGORIES",
    "JUDGES",
    "REFUSAL_PREFIXES",
    "SST2_LABELS",
    "TASKS",
    "BeaverDamJudge",
    "Judge",
    "RefusalJudge",
    "Task",
    "Verdict",
    "evaluate_model",
    "generate",
    "generate_one_by_one",
    "get_judge",
    "get_task",
    "gsm8k_reference",
    "is_refusal",
    "parse_gsm8k",
    "parse_label",
    "register_task",
    "rejudge",
    "row_categories",
    "score_task",
]
