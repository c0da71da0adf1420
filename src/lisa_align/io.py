"""Atomic file output: write to a temporary file in the same folder, then rename over the target.

Also the secret safety net: :func:`redact_secrets` hides Hugging Face tokens in text that is printed,
and :func:`atomic_write_yaml` refuses to write one into a file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from lisa_align.errors import LisaError

# A Hugging Face access token ("hf_" + 34 letters/digits today); not inside a longer word.
HF_TOKEN_PATTERN = re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{20,}")
REDACTED = "hf_***"
_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_MIN_ENV_TOKEN = 8  # a shorter $HF_TOKEN is not replaced (it would garble ordinary text)


def default_cache_dir() -> Path:
    """Where shared artifacts are cached (the tiny base, tokenised data): $LISA_ALIGN_CACHE, else
    ~/.cache/lisa-align."""
    return Path(os.environ.get("LISA_ALIGN_CACHE", Path.home() / ".cache" / "lisa-align"))


def redact_secrets(text: Any) -> str:
    """``text`` with every ``hf_...`` token and the current value of $HF_TOKEN replaced by ``hf_***``.

    The environment is read at each call and nothing is kept."""
    text = str(text)
    for name in _TOKEN_ENV:
        value = os.environ.get(name, "").strip()
        if len(value) >= _MIN_ENV_TOKEN and value in text:
            text = text.replace(value, REDACTED)
    return HF_TOKEN_PATTERN.sub(REDACTED, text)


def holds_secret(text: Any) -> bool:
    """Whether ``text`` holds something :func:`redact_secrets` would hide."""
    return isinstance(text, str) and redact_secrets(text) != text


def find_secret(obj: Any, prefix: str = "") -> str | None:
    """The dotted path of the first key or string value in ``obj`` (nested dicts, lists, pydantic
    models) that looks like a Hugging Face token; None when there is none."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    if isinstance(obj, dict):
        for k, v in obj.items():
            where = f"{prefix}{k}"
            if holds_secret(str(k)):
                return f"{prefix}<a key>"  # the key itself is the secret: do not repeat it
            found = find_secret(v, where + ".")
            if found is not None:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = find_secret(v, f"{prefix}{i}.")
            if found is not None:
                return found
        return None
    if holds_secret(obj):
        return prefix.rstrip(".") or "<the value>"
    return None


def token_in_config_error(where: str) -> LisaError:
    return LisaError(f"config field {where} looks like a Hugging Face token: remove it and use HF_TOKEN "
                     "or `hf auth login` (huggingface-cli login)")


# ---- a full disk ----------------------------------------------------------------------------
_DISK_FULL_ERRNOS = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
LOW_SPACE_BYTES = 16 * 2**20


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (for this user) on the filesystem holding ``path`` or its nearest existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether ``exc`` (or an exception it came from) says the disk or the quota is full: an OSError
    with ENOSPC/EDQUOT, or a message such as safetensors' "No space left on device (os error 28)".
    ``torch.save`` reports a full disk as a bare RuntimeError; for one, ``path``'s filesystem having
    (almost) no free space left decides."""
    e: BaseException | None = exc
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(e).lower() for t in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    if path is not None and isinstance(exc, (OSError, RuntimeError)):
        free = free_bytes(path)
        return free is not None and free < LOW_SPACE_BYTES
    return False


def disk_full_error(path: str | os.PathLike, existed: bool) -> LisaError:
    kept = f"the previous {Path(path).name} is intact" if existed else "nothing was written"
    return LisaError(f"no space left on device while writing {path}; free space (or set output_dir on a larger "
                     f"disk) and re-run: {kept}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp makes it 0600)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename: ``path`` holds the old bytes or
    the new ones, never a part; a full disk raises a one-line LisaError (the old file intact)."""
    path = Path(path)
    existed = path.exists()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and is_disk_full(e):
            raise disk_full_error(path, existed) from e
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as YAML; refused (LisaError) when a key or value looks like a HF token."""
    where = find_secret(obj)
    if where is not None:
        raise token_in_config_error(where)
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file written by :func:`atomic_write_jsonl` (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one record (used for logs, where a partial last line is tolerated by readers)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    except OSError as e:
        if is_disk_full(e):
            raise LisaError(f"no space left on device while appending to {path}; free space (or set output_dir "
                            "on a larger disk) and re-run: finished stages are kept") from e
        raise
