"""Harmful mixing: the user's fine-tuning set of n rows, round(p·n) of them harmful.

Which rows: each source's ``sample`` (:class:`~lisa_align.data.sources.SourceSpec`). ``first`` takes
the first rows, as the reference does (the first int(p·n) unsafe rows of BeaverTails ``30k_train``,
the first int((1-p)·n) rows of the task's training set); ``random`` a sample seeded by the run seed.
The reference counts int(p·n) harmful and int((1-p)·n) benign rows; round(p·n) and n - round(p·n)
are the same numbers whenever p·n is an integer, which it is for every configuration of the paper
(p in 0, 0.05, 0.1, 0.2, 0.3 with n = 5000; p = 0.1 with n = 700 and 1000 to 5000), and they always
add up to n.
"""

from __future__ import annotations

import math
import random

from lisa_align.errors import LisaError


def harmful_count(n: int, p: float) -> int:
    """round(p·n), with halves rounded up (not Python's banker's rounding)."""
    return int(math.floor(p * n + 0.5 + 1e-9))


def mix_harmful(benign: list[dict], harmful: list[dict], *, n: int, p: float, seed: int,
                benign_sample: str = "random", harmful_sample: str = "random",
                benign_name: str = "user data", harmful_name: str = "harmful data") -> list[dict]:
    """n rows: round(p·n) from ``harmful`` and the rest from ``benign``, each source's first rows
    (``*_sample="first"``) or a sample without replacement (``"random"``, seeded); each row gets
    ``harmful: bool``. With both sources ``first`` the rows are in the reference's order (the harmful
    rows, then the benign ones; the trainers shuffle), otherwise shuffled. Deterministic for a seed."""
    if not isinstance(p, (int, float)) or math.isnan(p) or not 0.0 <= p <= 1.0:
        raise LisaError(f"p={p} is outside [0, 1]: set data.p to the harmful fraction, e.g. 0.1")
    if not isinstance(n, int) or n <= 0:
        raise LisaError(f"n={n} must be a positive number of fine-tuning samples (data.n)")
    for name, sample in (("benign_sample", benign_sample), ("harmful_sample", harmful_sample)):
        if sample not in ("first", "random"):
            raise LisaError(f"{name}='{sample}' must be 'first' or 'random'")
    k = harmful_count(n, p)
    if k > len(harmful):
        raise LisaError(f"{harmful_name} has {len(harmful)} rows but n={n}, p={p} needs {k} harmful rows; "
                        "lower n or p, or give a larger harmful source")
    if n - k > len(benign):
        raise LisaError(f"{benign_name} has {len(benign)} rows but n={n}, p={p} needs {n - k} benign rows; "
                        "lower n or give a larger source")
    rng = random.Random(seed)
    chosen_harmful = harmful[:k] if harmful_sample == "first" else rng.sample(harmful, k)
    chosen_benign = benign[: n - k] if benign_sample == "first" else rng.sample(benign, n - k)
    rows = [dict(r, harmful=True) for r in chosen_harmful] + [dict(r, harmful=False) for r in chosen_benign]
    if "random" in (benign_sample, harmful_sample):
        rng.shuffle(rows)
    return rows


def remove_overlap(eval_rows: list[dict], train_rows: list[dict]) -> tuple[list[dict], int]:
    """Drop evaluation rows whose (instruction, input) also occurs in training; returns (rows, dropped)."""
    seen = {(r["instruction"], r.get("input", "")) for r in train_rows}
    kept = [r for r in eval_rows if (r["instruction"], r.get("input", "")) not in seen]
    return kept, len(eval_rows) - len(kept)


def dedup_prompts(rows: list[dict]) -> tuple[list[dict], int]:
    """The first row of each distinct (instruction, input); returns (rows, dropped)."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for r in rows:
        key = (r["instruction"], r.get("input", ""))
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept, len(rows) - len(kept)
