"""Load any HF causal LM and its tokenizer (HF id or local folder), with the reference's pad handling."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lisa_align.errors import LisaError

log = logging.getLogger(__name__)
DEFAULT_PAD_TOKEN = "[PAD]"


def _not_found(kind: str, name: str, err: Exception) -> LisaError:
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        return LisaError(f"{kind} path '{name}' does not exist; pass an existing folder saved with save_pretrained "
                         "or a HF id such as meta-llama/Llama-2-7b-hf")
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    hint = "the folder has no config.json" if Path(name).exists() else "no such local folder, and the hub cannot provide it"
    return LisaError(f"{kind} '{name}' could not be loaded ({hint}: {first}); "
                     "pass a local folder saved with save_pretrained or a HF id (set HF_TOKEN for gated models)")


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


def load_causal_lm(name: str, *, dtype: str | None = "auto", trust_remote_code: bool = False, device_map=None):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=resolve_dtype(dtype), device_map=device_map,
                                                    trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _not_found("model", name, e) from None


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
                             device_map=None):
    """Model + tokenizer with a pad token; ``trust_remote_code`` stays off unless asked for."""
    if trust_remote_code:
        log.warning("trust_remote_code=True: code shipped with '%s' will run", name)
    tok = load_tokenizer(name, trust_remote_code=trust_remote_code)
    model = load_causal_lm(name, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map)
    ensure_pad_token(model, tok)
    return model, tok
