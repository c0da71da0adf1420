"""A disk cache of tokenised training sets, so that the methods of a run and the runs of a sweep do
not tokenise the same rows again.

The key is a hash of the rows, the tokenizer's definition, ``max_length`` and the prompt templates
(for ``data.template: chat`` also the tokenizer's chat template text, the system prompt, ``loss_on``
and the rows' messages);
an entry is a ``Dataset.save_to_disk`` folder under ``<cache>/tokenized/<key>``, written under a
private name and renamed, so a killed run never leaves half an entry. An entry is built under its
inter-process lock (``<cache>/tokenized/.<key>.lock``, :class:`~lisa_align.locks.ArtifactLock`): a
concurrent run that needs the same entry waits and then reads it (its info carries ``waited``, the
seconds). ``LISA_ALIGN_TOKENIZED_CACHE=0`` turns the cache off.
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
from lisa_align.locks import ArtifactLock

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
    """(tokenised ``datasets.Dataset``, {"rows", "seconds", "cached"}) for ``rows`` in ``fmt`` (default Alpaca);
    ``"waited"`` (seconds) too when another process was building the same entry."""
    t0 = time.time()
    if not enabled():
        ds = templates.tokenize_rows(rows, tokenizer, max_length, fmt)
        return ds, {"rows": len(rows), "seconds": round(time.time() - t0, 3), "cached": False}
    root = Path(cache_dir) if cache_dir else default_cache_dir() / "tokenized"
    out = root / cache_key(rows, tokenizer, max_length, fmt)
    info: dict[str, Any] = {"rows": len(rows), "cached": True}
    ds = _load(out)
    if ds is None:
        try:
            lock = ArtifactLock(out, what="tokenised cache").acquire()
        except OSError:  # a read-only cache folder: tokenise without caching
            lock = None
        try:
            ds = _load(out)  # finished by the process we waited for
            if ds is None:
                info["cached"] = False
                ds = templates.tokenize_rows(rows, tokenizer, max_length, fmt)
                if lock is not None:
                    _save(ds, out)
        finally:
            if lock is not None:
                lock.release()
        if lock is not None and lock.waited:
            info["waited"] = lock.waited
    return ds, {**info, "seconds": round(time.time() - t0, 3)}


def _load(out: Path):
    """The finished entry ``out``, or None (absent, or damaged: then it is removed, to be rebuilt)."""
    import datasets

    if not (out / "dataset_info.json").is_file():
        return None
    try:
        return datasets.load_from_disk(str(out))
    except (OSError, ValueError):
        shutil.rmtree(out, ignore_errors=True)
        return None


def _save(ds, out: Path) -> None:
    """Write the entry under a private name and rename it (under the entry's lock: a temporary folder
    of the same entry is one a killed process left, and is removed)."""
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        ds.save_to_disk(str(tmp))
        os.replace(tmp, out)
    except OSError:  # a full or read-only disk: keep going without the entry
        shutil.rmtree(tmp, ignore_errors=True)
