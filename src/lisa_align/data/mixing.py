"""Harmful mixing: the user's fine-tuning set of n rows, round(p·n) of them harmful."""

from __future__ import annotations

import math
import random

from lisa_align.errors import LisaError


def harmful_count(n: int, p: float) -> int:
    """round(p·n), with halves rounded up (not Python's banker's rounding)."""
    return int(math.floor(p * n + 0.5 + 1e-9))


def mix_harmful(benign: list[dict], harmful: list[dict], *, n: int, p: float, seed: int,
                benign_name: str = "user data", harmful_name: str = "harmful data") -> list[dict]:
    """n rows: round(p·n) drawn from ``harmful`` and the rest from ``benign``, without replacement,
    shuffled; deterministic for a seed. Each row gets ``harmful: bool``."""
    if not isinstance(p, (int, float)) or math.isnan(p) or not 0.0 <= p <= 1.0:
        raise LisaError(f"p={p} is outside [0, 1]: set data.p to the harmful fraction, e.g. 0.1")
    if not isinstance(n, int) or n <= 0:
        raise LisaError(f"n={n} must be a positive number of fine-tuning samples (data.n)")
    k = harmful_count(n, p)
    if k > len(harmful):
        raise LisaError(f"{harmful_name} has {len(harmful)} rows but n={n}, p={p} needs {k} harmful rows; "
                        "lower n or p, or give a larger harmful source")
    if n - k > len(benign):
        raise LisaError(f"{benign_name} has {len(benign)} rows but n={n}, p={p} needs {n - k} benign rows; "
                        "lower n or give a larger source")
    rng = random.Random(seed)
    rows = [dict(r, harmful=True) for r in rng.sample(harmful, k)]
    rows += [dict(r, harmful=False) for r in rng.sample(benign, n - k)]
    rng.shuffle(rows)
    return rows


def remove_overlap(eval_rows: list[dict], train_rows: list[dict]) -> tuple[list[dict], int]:
    """Drop evaluation rows whose (instruction, input) also occurs in training; returns (rows, dropped)."""
    seen = {(r["instruction"], r.get("input", "")) for r in train_rows}
    kept = [r for r in eval_rows if (r["instruction"], r.get("input", "")) not in seen]
    return kept, len(eval_rows) - len(kept)
