"""Optional vLLM generation backend for HS / FA generation (``eval.backend: vllm``).

``pip install 'lisa-align[vllm]'`` (needs a CUDA GPU). vLLM is imported only when this backend is
used. The base (or aligned) model is loaded once per evaluated model; a fine-tuned LoRA adapter is
served with vLLM's LoRA support (``LoRARequest``), a full fine-tune is loaded as a model. Decoding is
greedy (temperature 0) with the same prompts as the Hugging Face path, and answers are decoded with
special tokens skipped and stripped, as :func:`lisa_align.evaluation.generation.generate` does.

Chat prompts (``data.template: chat``) take the options of
:func:`lisa_align.evaluation.generation.generation_options`: ``add_special_tokens=False`` (the prompts
are tokenised here, without the BOS that vLLM would add to a rendered template that holds one) and
``stop_token_ids`` (EOS and the template's end-of-turn token: ``SamplingParams(stop_token_ids=...)``),
before the first of which the answer is cut.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lisa_align.errors import LisaError

INSTALL_HINT = "pip install 'lisa-align[vllm]' (a CUDA GPU is needed), or set eval.backend: hf"


def _import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError:
        raise LisaError(f"eval.backend is vllm but vLLM is not installed: {INSTALL_HINT}") from None
    return LLM, SamplingParams, LoRARequest


class VLLMGenerator:
    """``generator(prompts, max_new_tokens=..., desc=...) -> answers`` backed by one vLLM engine."""

    chunk_size = 1024  # prompts per call (and per append to the partial predictions): vLLM batches inside

    def __init__(self, model_path: str, adapter_path: str | None = None, *, dtype: str = "auto",
                 trust_remote_code: bool = False, allow_pickle: bool = False, add_special_tokens: bool = True,
                 stop_token_ids: Sequence[int] | None = None, **engine_kwargs: Any):
        LLM, self._SamplingParams, LoRARequest = _import_vllm()
        self.add_special_tokens = add_special_tokens
        self.stop_token_ids = [int(i) for i in stop_token_ids] if stop_token_ids else None
        self.lora = None
        kwargs = dict(engine_kwargs)
        if not allow_pickle:  # weights from safetensors only, as everywhere in lisa-align
            kwargs.setdefault("load_format", "safetensors")
        if adapter_path is not None:
            cfg_path = Path(adapter_path) / "adapter_config.json"
            if not cfg_path.is_file():
                raise LisaError(f"{adapter_path}: no adapter_config.json; pass a PEFT LoRA adapter folder")
            rank = int(json.loads(cfg_path.read_text()).get("r", 16))
            kwargs.setdefault("enable_lora", True)
            kwargs.setdefault("max_lora_rank", max(8, rank))
            self.lora = LoRARequest("finetuned", 1, str(adapter_path))
        self.llm = LLM(model=str(model_path), dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)

    def __call__(self, prompts: Sequence[str], *, max_new_tokens: int, desc: str = "generate") -> list[str]:
        stops = {"stop_token_ids": self.stop_token_ids} if self.stop_token_ids else {}
        params = self._SamplingParams(temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True, **stops)
        inputs: list[Any] = list(prompts)
        if not self.add_special_tokens:  # a rendered chat prompt holds its own special tokens
            tok = self.llm.get_tokenizer()
            inputs = [{"prompt_token_ids": list(tok.encode(p, add_special_tokens=False))} for p in prompts]
        outputs = self.llm.generate(inputs, params, lora_request=self.lora, use_tqdm=False)
        if not self.stop_token_ids:
            return [o.outputs[0].text.strip() for o in outputs]
        return [self._cut(o.outputs[0].token_ids) for o in outputs]

    def _cut(self, token_ids: Sequence[int]) -> str:
        """The answer in ``token_ids``, cut before the first stop token (vLLM keeps a stop token in the
        text unless it is a special token), decoded with special tokens skipped and stripped."""
        ids = list(token_ids)
        stop = set(self.stop_token_ids or ())
        ids = next((ids[:k] for k, t in enumerate(ids) if t in stop), ids)
        return self.llm.get_tokenizer().decode(ids, skip_special_tokens=True).strip()
