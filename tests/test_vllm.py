"""The optional vLLM generation backend (eval.backend: vllm): imported lazily, a clear error without
it, the right model and adapter per evaluated model, and (only where vLLM and a GPU exist) the same
greedy answers as the Hugging Face path."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lisa_align import pipeline as pipeline_module
from lisa_align.config import validate_config
from lisa_align.errors import LisaError
from lisa_align.evaluation import vllm_backend
from lisa_align.pipeline import Pipeline

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed")
def test_without_vllm_the_backend_gives_the_install_hint(tmp_path):
    with pytest.raises(LisaError, match=r"vLLM is not installed: pip install 'lisa-align\[vllm\]'"):
        vllm_backend.VLLMGenerator(str(tmp_path))


@pytest.mark.parametrize("jobs", [1, 2])
def test_pipeline_serves_each_model_and_adapter_through_the_backend(tmp_path, monkeypatch, micro, jobs):
    """With --jobs 2 the method trains in a worker, but the main process evaluates every model: one vLLM
    engine at a time holds the GPU (a worker would not see this test's fake either)."""
    monkeypatch.setenv("LISA_ALIGN_CACHE", str(tmp_path / "cache"))
    made = []

    class FakeVLLM:
        def __init__(self, model_path, adapter_path=None, **kw):
            made.append((model_path, adapter_path, kw))

        def __call__(self, prompts, *, max_new_tokens, desc="generate"):
            return [f"sure {desc} {max_new_tokens}" for _ in prompts]

    cfg = validate_config(micro(**{"finetune.methods": ["sft"], "eval.models": ["base", "aligned", "methods"],
                                   "eval.backend": "vllm", "eval.vllm": {"gpu_memory_utilization": 0.5},
                                   "finetune.lora": {"r": 2, "alpha": 4, "dropout": 0.0,
                                                     "target_modules": ["q_proj", "v_proj"]}}))
    monkeypatch.setattr(pipeline_module, "VLLMGenerator", FakeVLLM)
    monkeypatch.setattr(Pipeline, "load_for_eval", lambda self, key: pytest.fail("HF model loaded for vllm"))
    pipe = Pipeline(cfg, echo=lambda *_: None)
    summary = pipe.run(jobs)
    assert [(m, a) for m, a, _ in made] == [
        (pipe.ensure_base(), None), (pipe.ensure_aligned(), None),
        (pipe.ensure_aligned(), str(cfg.run_dir / "finetune" / "sft" / "adapter"))]
    assert all(kw == {"dtype": "auto", "trust_remote_code": False, "allow_pickle": False,
                      "gpu_memory_utilization": 0.5} for _, _, kw in made)
    preds = [json.loads(x) for x in (cfg.run_dir / "eval" / "sft" / "predictions" / "harmful.jsonl").open()]
    assert {p["answer"] for p in preds} == {"sure harmful 6"}
    assert summary["sft"]["hs"] == 100.0  # "sure ..." never refuses


@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (pip install 'lisa-align[vllm]')")
def test_vllm_answers_equal_the_hf_answers(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    from lisa_align.evaluation.generation import generate
    from lisa_align.models.loading import load_model_and_tokenizer
    from lisa_align.training.tiny_base import ensure_tiny_base

    path = ensure_tiny_base(seed=0, cache_dir=tmp_path)
    model, tok = load_model_and_tokenizer(str(path))
    prompts = ["### Instruction:\nsay something kind\n\n### Response:", "### Instruction:\nname a colour\n\n### Response:"]
    hf = generate(model.cuda(), tok, prompts, max_new_tokens=8)
    assert vllm_backend.VLLMGenerator(str(path), dtype="float32")(prompts, max_new_tokens=8) == hf
