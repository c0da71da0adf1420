"""RepNoise (alignment stage): Representation Noising, Rosati et al. 2024 (``training/repnoise.py``).

Each step trains on refusals and pushes the representations of the matching harmful answers
towards Gaussian noise while making them unpredictable, in the version the Booster and Antidote
papers ran as a baseline (git-disl/Booster, ``loss_func/repnoise_loss.py``):

    loss = CE(refusals) + β · MMD(MLP outputs on the harmful tokens, N(0, I))
           − α · log(logit-lens CE of the harmful answer + 1)

RepNoise needs pairs: each alignment row (its refusal or safe answer) with a harmful answer.
:func:`pair_rows` makes them, in this order of preference:

1. a row that carries ``harmful_output`` pairs with itself (``output`` is the refusal);
2. otherwise with the harmful rows (``data.harmful``) of the identical prompt (instruction + input),
   the k-th alignment row of a prompt with that prompt's k-th harmful row (cycling);
3. otherwise by order with the harmful rows whose prompt no alignment row has (all harmful rows when
   there are none), cycling: the reference (Booster's ``RepNoiseTrainer``) never pairs by prompt, it
   draws an independent random batch of BeaverTails unsafe rows each step; with the trainer's
   shuffled batches, order pairing gives the same mix deterministically.

The rows it trains on are the n refusal rows followed by their n harmful rows (the trainer takes the
second half as the pairs of the first; the steps count the n refusal rows only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from lisa_align.defenses.base import Defense
from lisa_align.errors import LisaError

HARMFUL_OUTPUT = "harmful_output"


def prompt_key(row: dict) -> tuple[str, str]:
    return str(row.get("instruction", "")), str(row.get("input") or "")


def with_answer(row: dict, answer: str) -> dict:
    """``row`` with its answer replaced (``output``, and the assistant turn of a ``messages`` row)."""
    out = {k: v for k, v in row.items() if k != HARMFUL_OUTPUT}
    out["output"] = answer
    if row.get("messages"):
        out["messages"] = [dict(m, content=answer) if m.get("role") == "assistant" else dict(m)
                           for m in row["messages"]]
    return out


def harmful_answer_row(row: dict) -> dict:
    """A harmful row as trained on: its ``harmful_output`` when it carries one, else its ``output``."""
    return with_answer(row, row[HARMFUL_OUTPUT]) if row.get(HARMFUL_OUTPUT) else row


def pair_rows(rows: list[dict], harmful: list[dict]) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(refusal rows, their harmful rows, how many were paired ``own``/``prompt``/``order``): one pair
    per row of ``rows``, in its order (see the module docstring). Deterministic; a one-line LisaError
    when there is nothing to pair."""
    if not rows:
        raise LisaError("repnoise: no alignment rows to pair with harmful answers; give data.alignment rows "
                        "(refusals or safe answers)")
    by_prompt: dict[tuple[str, str], list[dict]] = {}
    for h in harmful:
        by_prompt.setdefault(prompt_key(h), []).append(harmful_answer_row(h))
    refusals: list[dict] = []
    pairs: list[dict | None] = []
    seen: dict[tuple[str, str], int] = {}
    unmatched: list[int] = []
    counts = {"own": 0, "prompt": 0, "order": 0}
    for i, r in enumerate(rows):
        key = prompt_key(r)
        if r.get(HARMFUL_OUTPUT):
            refusals.append({k: v for k, v in r.items() if k != HARMFUL_OUTPUT})
            pairs.append(with_answer(r, r[HARMFUL_OUTPUT]))
            counts["own"] += 1
        elif key in by_prompt:
            k = seen.get(key, 0)
            seen[key] = k + 1
            refusals.append(r)
            pairs.append(by_prompt[key][k % len(by_prompt[key])])
            counts["prompt"] += 1
        else:
            refusals.append(r)
            pairs.append(None)
            unmatched.append(i)
    if unmatched:
        prompts = {prompt_key(r) for r in rows}
        pool = [harmful_answer_row(h) for h in harmful if prompt_key(h) not in prompts] or \
            [harmful_answer_row(h) for h in harmful]
        if not pool:
            raise LisaError(f"repnoise: {len(unmatched)} alignment rows have no harmful answer to pair with: "
                            "give data.harmful rows, or alignment rows with 'harmful_output'")
        for j, i in enumerate(unmatched):
            pairs[i] = pool[j % len(pool)]
        counts["order"] = len(unmatched)
    return refusals, pairs, counts  # type: ignore[return-value]


class RepNoise(Defense):
    name: Literal["repnoise"] = "repnoise"
    alpha: float = Field(1.0, ge=0, allow_inf_nan=False,
                         description="weight of the ascent term −α·log(harmful CE + 1) (Booster's scripts: 0.1)")
    beta: float = Field(0.001, ge=0, allow_inf_nan=False,
                        description="weight of the MMD between the harmful-token activations and Gaussian noise")
    mask: Literal["reference", "answer"] = Field(
        "reference", description="reference: the tokens where the harmful and refusal ids differ position-wise, "
        "CE on the input ids as the reference computes it; answer: the labelled answer tokens of each")

    stages = ("align",)
    needs = ("harmful",)
    trainer = "lisa_align.training.repnoise:RepNoiseTrainer"
    arguments = "lisa_align.training.repnoise:RepNoiseArguments"

    def training_arguments(self) -> dict[str, Any]:
        return {"repnoise_alpha": self.alpha, "repnoise_beta": self.beta, "repnoise_mask": self.mask}

    def training_rows(self, rows: list[dict], data: Mapping[str, list[dict]]) -> list[dict]:
        refusals, harmful, _ = pair_rows(rows, list(data.get("harmful") or []))
        return refusals + harmful
