"""Row formats: turn a source's raw rows into the internal ``instruction`` / ``input`` / ``output`` rows.

Each format names the fields it needs; a row without one raises a one-line LisaError that names the
source, the row and the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lisa_align.errors import LisaError

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:"
    "\n\nWorld\nSports\nBusiness\nSci/Tech\n"
)
SST2_LABELS = ("negative", "positive")
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
GSM8K_ANSWER_PREFIX = "The final answer is: "
BEAVERTAILS_CATEGORIES = (
    "animal_abuse",
    "child_abuse",
    "controversial_topics,politics",
    "discrimination,stereotype,injustice",
    "drug_abuse,weapons,banned_substance",
    "financial_crime,property_crime,theft",
    "hate_speech,offensive_language",
    "misinformation_regarding_ethics,laws_and_safety",
    "non_violent_unethical_behavior",
    "privacy_violation",
    "self_harm",
    "sexually_explicit,adult_content",
    "terrorism,organized_crime",
    "violence,aiding_and_abetting,incitement",
)


def _need(row: dict, field: str, where: str, i: int | str, kind: type | tuple = str) -> Any:
    if field not in row or row[field] is None:
        raise LisaError(f"{where}: row {i} has no '{field}' field (present: {', '.join(map(str, row)) or 'none'}); "
                        f"add '{field}' to every row or pick the right format")
    value = row[field]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise LisaError(f"{where}: row {i} field '{field}' must be {getattr(kind, '__name__', kind)}, "
                        f"got {type(value).__name__}; fix that row")
    return value


def _nonempty(row: dict, field: str, where: str, i: int | str) -> str:
    value = _need(row, field, where, i)
    if not value.strip():
        raise LisaError(f"{where}: row {i} field '{field}' is empty; fill it in or remove the row")
    return value


def _label(row: dict, where: str, i: int | str, names: tuple[str, ...]) -> str:
    label = _need(row, "label", where, i, int)
    if not 0 <= label < len(names):
        raise LisaError(f"{where}: row {i} field 'label' is {label}, expected 0..{len(names) - 1} ({', '.join(names)})")
    return names[label]


def fmt_beavertails(row: dict, where: str, i: int | str) -> dict:
    cats = row.get("category") or {}
    return {
        "instruction": _nonempty(row, "prompt", where, i),
        "input": "",
        "output": _need(row, "response", where, i),
        "category": [c for c, v in cats.items() if v] if isinstance(cats, dict) else cats,
        "is_safe": bool(_need(row, "is_safe", where, i, bool)),
    }


def fmt_sst2(row: dict, where: str, i: int | str) -> dict:
    return {"instruction": SST2_INSTRUCTION, "input": _nonempty(row, "sentence", where, i).strip(),
            "output": _label(row, where, i, SST2_LABELS)}


def fmt_agnews(row: dict, where: str, i: int | str) -> dict:
    return {"instruction": AGNEWS_INSTRUCTION, "input": _nonempty(row, "text", where, i).strip(),
            "output": _label(row, where, i, AGNEWS_LABELS)}


def fmt_gsm8k(row: dict, where: str, i: int | str) -> dict:
    answer = _nonempty(row, "answer", where, i)
    if "####" not in answer:
        raise LisaError(f"{where}: row {i} field 'answer' has no '#### <number>' final answer; fix that row")
    return {"instruction": _nonempty(row, "question", where, i), "input": "",
            "output": answer.replace("####", GSM8K_ANSWER_PREFIX.rstrip())}


def fmt_alpaca(row: dict, where: str, i: int | str) -> dict:
    """instruction/input/output rows, or prompt/response rows. A paired row (RepNoise: a harmful prompt
    with both its refusal and a harmful answer) also carries ``harmful_output`` (``harmful_response``)."""
    if "instruction" not in row and "prompt" in row:  # prompt / response rows
        out = {"instruction": _nonempty(row, "prompt", where, i), "input": "",
               "output": _nonempty(row, "response", where, i)}
        paired = "harmful_response"
    else:
        inp = row.get("input") or ""
        if not isinstance(inp, str):
            raise LisaError(f"{where}: row {i} field 'input' must be a string, got {type(inp).__name__}; "
                            "fix that row")
        out = {"instruction": _nonempty(row, "instruction", where, i), "input": inp,
               "output": _nonempty(row, "output", where, i)}
        paired = "harmful_output"
    if paired in row:
        out["harmful_output"] = _nonempty(row, paired, where, i)
    return out


def fmt_prompts(row: dict, where: str, i: int | str) -> dict:
    """Prompt-only rows, ``{"prompt": ...}`` (Do-Not-Answer, the shipped benign prompts): evaluation
    prompts, or alignment prompts whose answers are written elsewhere. ``output`` is empty; a ``kind``
    or ``category`` field is kept as the row's category."""
    out = {"instruction": _nonempty(row, "prompt", where, i), "input": "", "output": ""}
    category = row.get("category", row.get("kind"))
    if category is not None:
        out["category"] = category
    return out


MESSAGE_ROLES = ("system", "user", "assistant")


def fmt_messages(row: dict, where: str, i: int | str) -> dict:
    """OpenAI fine-tuning rows, ``{"messages": [{"role": ..., "content": ...}, ...]}``, multi-turn included.

    The row keeps its ``messages`` (what the chat template renders) and gets ``instruction`` (the user
    turn before the last assistant turn), ``input`` "" and ``output`` (the last assistant turn) for the
    rest of the pipeline (judges, overlap checks, the Alpaca template of single-turn rows), and
    ``origin`` ("<file>: row i (line l)") for later errors about the row."""
    if "messages" not in row or row["messages"] is None:
        raise LisaError(f"{where}: row {i} has no 'messages' field (present: {', '.join(map(str, row)) or 'none'}); "
                        "add a messages list to every row or pick the right format")
    msgs = row["messages"]
    if not isinstance(msgs, list):
        raise LisaError(f"{where}: row {i} field 'messages' must be a list of {{role, content}} objects, "
                        f"got {type(msgs).__name__}; fix that row")
    out = []
    for k, m in enumerate(msgs):
        field = f"messages[{k}]"
        if not isinstance(m, dict):
            raise LisaError(f"{where}: row {i} field '{field}' must be an object with role and content, "
                            f"got {type(m).__name__}; fix that row")
        if m.get("role") is None:
            raise LisaError(f"{where}: row {i} field '{field}.role' is missing; "
                            f"give each message a role ({', '.join(MESSAGE_ROLES)})")
        role = m["role"]
        if role not in MESSAGE_ROLES:
            raise LisaError(f"{where}: row {i} field '{field}.role' is {role!r}, an unknown role; "
                            f"use {', '.join(MESSAGE_ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise LisaError(f"{where}: row {i} field '{field}.content' must be a string, "
                            f"got {type(content).__name__ if content is not None else 'nothing'}; fix that row")
        if not content.strip():
            raise LisaError(f"{where}: row {i} field '{field}.content' is empty; fill it in or remove the message")
        out.append({"role": role, "content": content})
    last = max((k for k, m in enumerate(out) if m["role"] == "assistant"), default=None)
    if last is None:
        raise LisaError(f"{where}: row {i} field 'messages' has no assistant turn, so nothing to learn; "
                        "add an assistant message or remove the row")
    user = next((m["content"] for m in reversed(out[:last]) if m["role"] == "user"), None)
    if user is None:
        raise LisaError(f"{where}: row {i} field 'messages' has no user turn before the assistant's; "
                        "add the user message")
    result = {"messages": out, "instruction": user, "input": "", "output": out[last]["content"],
              "origin": f"{where}: row {i}"}
    for extra in ("category", "is_safe"):
        if extra in row:
            result[extra] = row[extra]
    return result


FORMATS: dict[str, Callable[[dict, str, int | str], dict]] = {
    "beavertails": fmt_beavertails,
    "sst2": fmt_sst2,
    "agnews": fmt_agnews,
    "gsm8k": fmt_gsm8k,
    "alpaca": fmt_alpaca,
    "messages": fmt_messages,
    "prompts": fmt_prompts,
}


def detect_format(row: dict, where: str) -> str:
    """Guess a format from the first row's fields."""
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if {"prompt", "response", "is_safe"} <= keys:
        return "beavertails"
    if {"sentence", "label"} <= keys:
        return "sst2"
    if {"text", "label"} <= keys:
        return "agnews"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if "instruction" in keys or {"prompt", "response"} <= keys:
        return "alpaca"
    if "prompt" in keys and not keys & {"response", "output", "answer"}:
        return "prompts"
    raise LisaError(f"{where}: cannot tell the row format from fields {sorted(keys)}; rows need "
                    "'instruction'/'output' (or 'prompt'/'response', or 'messages'), or set format: to one of "
                    + ", ".join(FORMATS))


def format_rows(raw: list[dict], fmt: str, where: str, lines: list[int] | None = None) -> list[dict]:
    """Internal rows from ``raw`` rows of format ``fmt``; ``lines`` (each row's line in its file) makes
    an error name the line too: "row 2 (line 4)"."""
    if fmt == "auto":
        if not raw:
            raise LisaError(f"{where}: the dataset is empty; give a file or split with rows")
        fmt = detect_format(raw[0], where)
    if fmt not in FORMATS:
        raise LisaError(f"{where}: unknown format '{fmt}': use auto or one of {', '.join(FORMATS)}")
    f = FORMATS[fmt]
    if lines is not None and len(lines) == len(raw):
        return [f(r, where, f"{i} (line {line})") for i, (r, line) in enumerate(zip(raw, lines), start=1)]
    return [f(r, where, i) for i, r in enumerate(raw, start=1)]
