"""Evaluation: batched greedy generation, harmfulness judges, task scoring, pairwise (win-rate)
judges, metrics files."""

from lisa_align.evaluation.evaluate import FA_PENDING, evaluate_model, rejudge, rejudge_pairwise, row_categories
from lisa_align.evaluation.generation import generate, generate_one_by_one
from lisa_align.evaluation.judges import (
    BEAVERDAM_TEMPLATE,
    BEAVERTAILS_CATEGORIES,
    JUDGES,
    LLAMA_GUARD_CATEGORIES,
    REFUSAL_PREFIXES,
    BeaverDamJudge,
    Judge,
    LlamaGuardJudge,
    RefusalJudge,
    Verdict,
    cohen_kappa,
    get_judge,
    is_refusal,
    parse_llama_guard,
)
from lisa_align.evaluation.pairwise import (
    PAIRWISE_JUDGES,
    PAIRWISE_TEMPLATE,
    LocalPairwiseJudge,
    PairwiseJudge,
    get_pairwise_judge,
    register_pairwise_judge,
    win_rate,
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
    "FA_PENDING", "PAIRWISE_JUDGES", "PAIRWISE_TEMPLATE", "LocalPairwiseJudge", "PairwiseJudge",
    "get_pairwise_judge", "register_pairwise_judge", "rejudge_pairwise", "win_rate",
    "LLAMA_GUARD_CATEGORIES", "LlamaGuardJudge", "cohen_kappa", "parse_llama_guard",
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
