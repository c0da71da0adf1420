"""A disk cache of tokenised training sets, so that the methods of a run and the runs of a sweep do
not tokenise the same rows again.

The key is a hash of the rows, the tokenizer's definition, ``max_length`` and the prompt templates
(for ``data.template: chat`` also the tokenizer's chat template text, the system prompt, ``loss_on``
and the rows' messages);
an entry is a ``Dataset.save_to_disk`` folder under ``<cache>/tokenized/<key>``, written under a
private name and renamed, so a killed run never leaves half an entry and
concurrent writers never collide. ``LISA_ALIGN_TOKENIZED_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from lisa_align.data import templates
from lisa_align.io import default_cache_dir

CACHE_VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids: the fast tokenizer's full definition and its special tokens (not the
    folder it was loaded from, so the same tokenizer saved with each model shares entries)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        from datasets.fingerprint import Hasher

        return Hasher.hash(tokenizer)
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, backend.to_str(), tokenizer.eos_token_id,
                                      str(tokenizer.special_tokens_map)]).encode()).hexdigest()


def cache_key(rows: list[dict[str, Any]], tokenizer, max_length: int,
              fmt: templates.PromptFormat | None = None) -> str:
    """The entry's name. An Alpaca key is what it was before chat templates came (the Alpaca text of a
    single-turn ``messages`` row is its instruction and output, which the key holds)."""
    fmt = fmt or templates.ALPACA
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, max_length, templates.PROMPT_WITH_INPUT, templates.PROMPT_NO_INPUT,
                         templates.IGNORE_INDEX]).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps([[r.get("instruction"), r.get("input") or "", r.get("output")] for r in rows],
                        ensure_ascii=False).encode())
    if fmt.chat:
        h.update(json.dumps(["chat", getattr(tokenizer, "chat_template", None), fmt.system_prompt, fmt.loss_on,
                             [r.get("messages") for r in rows]], ensure_ascii=False, default=str).encode())
    return h.hexdigest()[:20]


def enabled() -> bool:
    return os.environ.get("LISA_ALIGN_TOKENIZED_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def tokenize_rows_cached(rows: list[dict[str, Any]], tokenizer, max_length: int,
                         cache_dir: str | Path | None = None,
                         fmt: templates.PromptFormat | None = None) -> tuple[Any, dict[str, Any]]:
    """(tokenised ``datasets.Dataset``, {"rows", "seconds", "cached"}) for ``rows`` in ``fmt`` (default Alpaca)."""
    import datasets

    t0 = time.time()
    if not enabled():
        ds = templates.tokenize_rows(rows, tokenizer, max_length, fmt)
        return ds, {"rows": len(rows), "seconds": round(time.time() - t0, 3), "cached": False}
    root = Path(cache_dir) if cache_dir else default_cache_dir() / "tokenized"
    out = root / cache_key(rows, tokenizer, max_length, fmt)
    if (out / "dataset_info.json").is_file():
        try:
            ds = datasets.load_from_disk(str(out))
            return ds, {"rows": len(rows), "seconds": round(time.time() - t0, 3), "cached": True}
        except (OSError, ValueError):  # a damaged entry: rebuild it
            shutil.rmtree(out, ignore_errors=True)
    ds = templates.tokenize_rows(rows, tokenizer, max_length, fmt)
    tmp = root / f".{out.name}.{os.getpid()}.tmp"
    try:
        ds.save_to_disk(str(tmp))
        os.replace(tmp, out)
    except OSError:  # another process finished the same entry first, or the disk is read-only: keep going
        shutil.rmtree(tmp, ignore_errors=True)
    return ds, {"rows": len(rows), "seconds": round(time.time() - t0, 3), "cached": False}
