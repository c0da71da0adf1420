"""benchmarks/overhead.py, part 1: what is measured. The run's Spec, the Llama shapes, the random
base model (or a real local model folder, ``--model``), the LoRA / full-fine-tuning copy, the
synthetic token rows and the SFT / Lisa trainers (built from lisa_align.training's public names only)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

# Llama shapes. "tiny" is read from the demo preset (model.tiny) and the tiny tokenizer's vocabulary.
SIZES = {
    "micro": dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=64, vocab_size=64,
                  tie=True),
    "100m": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2048,
                 vocab_size=32000, tie=True),
    "1b": dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632,
               vocab_size=32000, tie=False),  # the TinyLlama-1.1B shape
}
MODES = ("lora", "full")
METHODS = ("sft", "lisa")
LABELS = {"micro": "micro", "tiny": "tiny (demo)", "100m": "~100M", "1b": "~1B", "model": "--model"}
MODEL = "model"  # the config name of a real local model folder (--model); its arch holds "path"


@dataclass
class Spec:
    """One measurement: a config, a mode and the run's shape (what a memory child needs to rebuild it)."""

    config: str
    mode: str
    batch: int
    seq_len: int
    steps: int  # optimizer steps per method (warm-up included)
    warmup: int
    block: int
    k1: int
    k2: int
    device: str = "cpu"
    dtype: str = "float32"
    logging_steps: int = 10
    seed: int = 0
    arch: dict = field(default_factory=dict)


def training_api():
    """(the base trainer, its arguments, LisaTrainer, LisaArguments) from ``lisa_align.training``."""
    import lisa_align.training as tr

    return tr.BaseTrainer, tr.BaseArguments, tr.LisaTrainer, tr.LisaArguments


def tiny_arch() -> dict:
    """The demo preset's model.tiny settings, with the tiny tokenizer's vocabulary."""
    from lisa_align.cli import preset_path
    from lisa_align.config import load_config
    from lisa_align.models.tiny import build_tokenizer

    t = load_config(preset_path("demo")).model.tiny
    return dict(hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads, num_kv_heads=t.num_heads,
                intermediate_size=t.intermediate_size, vocab_size=len(build_tokenizer(0)), tie=True)


def arch_for(config: str) -> dict:
    return tiny_arch() if config == "tiny" else dict(SIZES[config])


def resolve_model(name: str) -> str:
    """The local model folder of ``--model``: a folder as given; a run config (.yaml/.yml/.json): its
    ``model.name`` as the project's pipeline resolves it (a GGUF file or wheel source converted once into
    the cache, LISA_ALIGN_CACHE; the tiny base built once; a folder or cached hub id as given), without
    writing a run folder."""
    import os

    if os.path.isdir(name):
        return os.path.abspath(name)
    if not (os.path.isfile(name) and name.endswith((".yaml", ".yml", ".json"))):
        raise SystemExit(f"--model {name!r}: not a model folder nor a run config (.yaml)")
    from lisa_align.config import load_config

    return config_model(load_config(name))


def config_model(cfg) -> str:
    """The base model folder of a loaded run config (see :func:`resolve_model`)."""
    from lisa_align.models.gguf import ensure_gguf_model, is_gguf

    m = cfg.model
    if is_gguf(m.name):
        return str(ensure_gguf_model(m.name, sha256=m.sha256, cache_dir=m.cache_dir))
    if m.name == "tiny":
        from lisa_align.training.tiny_base import ensure_tiny_base

        return str(ensure_tiny_base(m.tiny, seed=cfg.seed, cache_dir=m.cache_dir, use_cpu=True))
    return m.name


def model_arch(path: str) -> dict:
    """The shape of the local model folder ``path`` (its config.json), with ``path`` itself: what
    ``build_base`` loads, what the token rows draw their ids from (``vocab_size``) and what the table prints."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    c = getattr(c, "text_config", None) or c
    heads = c.num_attention_heads
    return dict(path=str(path), model_type=c.model_type, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
                num_heads=heads, num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                intermediate_size=getattr(c, "intermediate_size", None) or 0, vocab_size=c.vocab_size,
                tie=bool(getattr(c, "tie_word_embeddings", False)),
                max_positions=getattr(c, "max_position_embeddings", None))


def arch_text(a: dict) -> str:
    if a.get("path"):
        return (f"{a['model_type']} from {a['path']}: hidden {a['hidden_size']}, {a['num_layers']} layers, "
                f"{a['num_heads']} heads ({a['num_kv_heads']} kv), intermediate {a['intermediate_size']}, vocab "
                f"{a['vocab_size']}, {'tied' if a['tie'] else 'untied'} embeddings")
    return (f"hidden {a['hidden_size']}, {a['num_layers']} layers, {a['num_heads']} heads, intermediate "
            f"{a['intermediate_size']}, vocab {a['vocab_size']}, {'tied' if a['tie'] else 'untied'} embeddings")


def build_base(arch: dict, seq_len: int, dtype: str, seed: int, device: str = "cpu"):
    """A randomly initialised Llama (random weights time the same as trained ones), built on ``device``
    (``"meta"``: shapes only); or, when ``arch`` has a ``path`` (``--model``), that local folder's model,
    loaded with the project's loader (safetensors only) in ``dtype``."""
    if arch.get("path"):
        return load_base(arch, seq_len, dtype, device)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"],
                      intermediate_size=arch["intermediate_size"], num_hidden_layers=arch["num_layers"],
                      num_attention_heads=arch["num_heads"], num_key_value_heads=arch["num_kv_heads"],
                      max_position_embeddings=max(seq_len, 256), tie_word_embeddings=arch["tie"],
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(getattr(torch, dtype))


def load_base(arch: dict, seq_len: int, dtype: str, device: str = "cpu"):
    """The real model of ``arch["path"]`` on ``device``, without a KV cache (training)."""
    from lisa_align.models.loading import load_causal_lm

    if arch.get("max_positions") and seq_len > arch["max_positions"]:
        raise SystemExit(f"--seq-len {seq_len} is longer than {arch['path']}'s {arch['max_positions']} positions")
    model = load_causal_lm(arch["path"], dtype=dtype)
    model.config.use_cache = False
    return model.to(device)


def with_mode(base, mode: str, seed: int, copy_base: bool = True):
    """``base`` (a copy unless ``copy_base`` is False) with the fine-tuning LoRA attached (mode "lora":
    r=8, alpha=4, q_proj,v_proj) or all weights trainable ("full")."""
    try:
        from lisa_align.models import FINETUNE_LORA, attach_lora
    except ImportError:  # older layout
        from lisa_align.models.lora import FINETUNE_LORA, attach_lora

    model = copy.deepcopy(base) if copy_base else base
    if mode == "lora":
        torch.manual_seed(seed + 1)  # the same LoRA initialisation for SFT and Lisa
        model = attach_lora(model, FINETUNE_LORA)
    return model


def trainable(model) -> list[torch.nn.Parameter]:
    """The trainable parameters in model order: what Lisa's anchor and proximal term cover."""
    return [p for p in model.parameters() if p.requires_grad]


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def trainable_bytes(model) -> int:
    return tensor_bytes(trainable(model))


def token_rows(n: int, seq_len: int, vocab: int, seed: int):
    """n rows of seq_len random tokens; the first quarter is the "prompt" (label -100)."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq_len), generator=g)
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * n,
                                       "labels": labels.tolist()})


def make_trainer(method: str, model, spec: Spec, out_dir: str, callbacks=(), classes: dict | None = None):
    """The SFT or Lisa trainer of ``spec`` on ``model``. ``classes`` may map a method to a subclass of its
    trainer (the timing subclasses of overhead_timing)."""
    from transformers import default_data_collator
    from transformers.trainer_callback import PrinterCallback

    base, base_args, lisa_cls, lisa_args = training_api()
    classes = classes or {}
    # The paper's fine-tuning settings (AdamW, constant schedule with 10% warm-up, weight decay 0, clip 1).
    common = dict(output_dir=out_dir, max_steps=spec.steps, per_device_train_batch_size=spec.batch,
                  learning_rate=1e-5, lr_scheduler_type="constant_with_warmup", warmup_steps=0.1, weight_decay=0.0,
                  max_grad_norm=1.0, optim="adamw_torch", seed=spec.seed, data_seed=spec.seed,
                  logging_steps=spec.logging_steps, report_to="none", save_strategy="no", disable_tqdm=True,
                  remove_unused_columns=False, dataloader_num_workers=0, use_cpu=spec.device == "cpu",
                  bf16=spec.dtype == "bfloat16")
    vocab = spec.arch["vocab_size"]
    n_rows = spec.batch * spec.steps  # one epoch is the whole run: no epoch boundary inside it
    user = token_rows(n_rows, spec.seq_len, vocab, spec.seed)
    kwargs = dict(model=model, train_dataset=user, data_collator=default_data_collator, callbacks=list(callbacks))
    if method == "sft":
        trainer = classes.get("sft", base)(args=base_args(**common), **kwargs)
    else:
        args = lisa_args(**common, k1=spec.k1, k2=spec.k2, rho=1.0, proximal_warmup_ratio=0.0)
        align = token_rows(n_rows, spec.seq_len, vocab, spec.seed + 7)  # the same shape as the user rows
        trainer = classes.get("lisa", lisa_cls)(args=args, alignment_dataset=align, **kwargs)
    trainer.remove_callback(PrinterCallback)
    return trainer


def lisa_k(steps: int, warmup: int) -> tuple[int, int]:
    """K1:K2 = 1:9 (the paper's 100:900) on a cycle of about half the run, so that both states and at
    least one switch fall after the warm-up."""
    cycle = max(2, math.ceil(steps / 2))
    k1 = max(1, round(cycle / 10))
    if cycle < warmup:
        raise SystemExit(f"{steps - warmup} measured steps after {warmup} warm-up steps leave no switch to "
                         "measure: give --steps at least the warm-up")
    return k1, cycle - k1


def preload() -> None:
    """Import what the trainers need once, here, so that forked children need not (imports start no
    torch thread pool)."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    from transformers import LlamaForCausalLM, Trainer  # noqa: F401

    import lisa_align.cli  # noqa: F401
    import lisa_align.models.lora  # noqa: F401
    import lisa_align.training  # noqa: F401
    import lisa_align.training.penalty  # noqa: F401
