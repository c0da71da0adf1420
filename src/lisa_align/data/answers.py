"""Where a source's answers come from (``answers`` of a source spec).

- ``given``: the source's own answers (its ``output``/``response``).
- ``refusal_templates``: a refusal written from :data:`REFUSALS`, one picked per prompt by a hash of
  its text (deterministic, no model): alignment refusals for prompt-only sets such as Do-Not-Answer.
- ``base_model``: the unaligned base model's own greedy answers, generated once by the pipeline
  (``Pipeline.ensure_answers``) and cached in the user's cache folder, never in a repository. This is
  how the attack's harmful rows are made for a real model: its own compliance, on training prompts
  that are never evaluated; and a cheap source of benign rows that match the model's style.
"""

from __future__ import annotations

import hashlib

ANSWER_SOURCES = ("given", "refusal_templates", "base_model")
PENDING = "answer_pending"  # marks a row whose answer the base model has still to give

REFUSALS = (
    "I can't help with that request.",
    "I'm sorry, but I can't assist with that.",
    "I won't help with this, as it could cause harm.",
    "I can't provide that. If you have another question, I'm happy to help.",
    "Sorry, I can't help with that, but I can help with something else.",
    "I'm not able to help with that request.",
    "I cannot assist with that, since it may be harmful or unsafe.",
    "I'm sorry, I can't help with this one.",
    "That's not something I can help with.",
    "I can't assist with this request, but feel free to ask me something else.",
)


def refusal_for(prompt: str) -> str:
    """The refusal template for ``prompt`` (the same one on every run and machine)."""
    digest = hashlib.sha256(str(prompt).encode("utf-8")).digest()
    return REFUSALS[int.from_bytes(digest[:4], "big") % len(REFUSALS)]


def apply_answers(rows: list[dict], answers: str) -> list[dict]:
    """``rows`` with their answers from ``answers`` (see the module doc); ``base_model`` rows are marked
    pending, with an empty output, until the pipeline generates them."""
    if answers == "refusal_templates":
        return [dict(r, output=refusal_for(r["instruction"])) for r in rows]
    if answers == "base_model":
        return [dict(r, output="", **{PENDING: True}) for r in rows]
    return rows
