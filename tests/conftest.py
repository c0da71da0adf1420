"""Shared test fixtures and builders.

* ``tiny_llama(vocab_size, ...)`` / ``tiny_llama_config(vocab_size, ...)``: a small random Llama.
* ``word_tokenizer(vocab | train_on=texts, ...)``: a word-level ``PreTrainedTokenizerFast``.
* ``MICRO`` and the ``micro`` fixture: the micro run config (the whole pipeline in seconds), whose tiny
  base model is built once per session (``tiny_base_cache``), not once per test.

Test files import the plain builders with ``from conftest import tiny_llama, word_tokenizer`` (pytest
puts tests/ on sys.path; so does ``python tests/<worker>.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

# ---------------------------------------------------------------------------------------------
# The micro run config: tiny base -> align -> SFT/BSO/Lisa -> evaluate, in seconds
# ---------------------------------------------------------------------------------------------
MICRO = {
    "name": "micro",
    "seed": 0,
    "model": {"name": "tiny", "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
                                       "pretrain_rows": 64, "epochs": 1, "batch_size": 16}},
    "data": {"task": "sst2", "max_length": 128, "n": 24, "p": 0.25,
             "user": {"source": "synthetic:sst2", "split": "train", "size": 100},
             "harmful": {"source": "synthetic:beavertails", "split": "30k_train", "filter": "unsafe", "size": 100},
             "alignment": [{"source": "synthetic:beavertails", "split": "30k_train", "filter": "safe", "n": 16,
                            "size": 100}]},
    "align": {"lora": None, "lr": 1e-3, "epochs": 1, "batch_size": 8, "loss_reduction": "example"},
    "finetune": {"lora": None, "lr": 1e-3, "epochs": 2, "batch_size": 4, "loss_reduction": "example",
                 "methods": ["sft", "bso", "lisa"], "lisa": {"k1": 2, "k2": 4, "rho": 1.0}},
    "eval": {"judge": "refusal", "batch_size": 8, "max_new_tokens_harmful": 6, "max_new_tokens_task": 3,
             "max_new_tokens_benign": 6, "models": ["base", "aligned", "methods"],
             "harmful": {"source": "synthetic:beavertails", "split": "30k_test", "n": 6, "seed": 7},
             "task": {"source": "synthetic:sst2", "split": "validation", "n": 6, "seed": 7},
             "benign": {"source": "synthetic:alpaca", "split": "eval", "n": 4, "seed": 7}},
}


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and leave the other core to other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_base_cache(tmp_path_factory) -> Path:
    """The session's tiny-base folder, ``model.cache_dir`` of every micro config: the first run that needs
    a tiny base (per seed and tiny settings) builds it there, every later run of the session reuses it."""
    return tmp_path_factory.mktemp("tiny-base")


@pytest.fixture(scope="session")
def micro_config(tiny_base_cache):
    """``micro_config(root, **changes)``: a fresh copy of MICRO with ``output_dir`` root/runs and the
    session's tiny base. Dotted keys change nested fields: ``micro_config(root, **{"data.p": 0.5})``.
    For module- or session-scoped fixtures; tests use ``micro``."""

    def make(root: str | Path, **changes) -> dict:
        cfg = json.loads(json.dumps(MICRO))
        cfg["output_dir"] = str(Path(root) / "runs")
        cfg["model"]["cache_dir"] = str(tiny_base_cache)
        for dotted, value in changes.items():
            node = cfg
            *path, last = dotted.split(".")
            for p in path:
                node = node[p]
            node[last] = value
        return cfg

    return make


@pytest.fixture
def micro(micro_config, tmp_path, monkeypatch):
    """``micro(**changes)``: ``micro_config(tmp_path, **changes)``. The test also gets its own, empty
    ``LISA_ALIGN_CACHE`` (tmp_path/cache, the tokenised-data cache); the tiny base stays shared."""
    monkeypatch.setenv("LISA_ALIGN_CACHE", str(tmp_path / "cache"))

    def make(**changes) -> dict:
        return micro_config(tmp_path, **changes)

    return make


# ---------------------------------------------------------------------------------------------
# A tiny random Llama
# ---------------------------------------------------------------------------------------------
def tiny_llama_config(vocab_size: int, *, hidden_size: int = 16, intermediate_size: int = 32,
                      num_hidden_layers: int = 1, num_attention_heads: int = 2, num_key_value_heads: int | None = None,
                      **extra):
    """A small ``LlamaConfig``; ``num_key_value_heads`` defaults to ``num_attention_heads``. ``extra`` goes
    to LlamaConfig as given (max_position_embeddings, pad/bos/eos_token_id, tie_word_embeddings,
    initializer_range, num_labels, ...); what is not given keeps LlamaConfig's default."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                       num_key_value_heads=num_attention_heads if num_key_value_heads is None else num_key_value_heads,
                       **extra)


def tiny_llama(vocab_size: int, *, seed: int | None = 0, **config):
    """A random ``LlamaForCausalLM(tiny_llama_config(vocab_size, **config))``, initialised after
    ``torch.manual_seed(seed)``; ``seed=None`` leaves the global RNG as it is."""
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(vocab_size, **config)
    if seed is not None:
        torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


# ---------------------------------------------------------------------------------------------
# A word-level tokenizer
# ---------------------------------------------------------------------------------------------
def word_tokenizer(vocab: Iterable[str] | None = None, *, train_on: Iterable[str] | None = None,
                   specials: Iterable[str] = ("<unk>", "<pad>", "<s>", "</s>"), unk_token: str = "<unk>",
                   lowercase: bool = False, pre_tokenizer: str = "Whitespace", prepend: str | None = None,
                   chat_template: str | None = None, **special_tokens):
    """A word-level ``PreTrainedTokenizerFast``.

    The vocabulary is either ``vocab``, every token in id order (repeats dropped), or the words of the
    texts ``train_on`` (WordLevelTrainer, ``specials`` first). ``pre_tokenizer`` names a
    ``tokenizers.pre_tokenizers`` class: "Whitespace" (words and punctuation runs) or "WhitespaceSplit"
    (whitespace-separated chunks). ``lowercase`` adds a Lowercase normalizer; ``prepend`` a token put
    before every encoded text (e.g. "<s>"). ``unk_token`` and ``special_tokens`` (pad_token, bos_token,
    eos_token, ...) go to PreTrainedTokenizerFast; ``chat_template`` is set when given.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if (vocab is None) == (train_on is None):
        raise ValueError("word_tokenizer: give either vocab or train_on")
    if vocab is not None:
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(vocab))}, unk_token=unk_token))
    else:
        tok = Tokenizer(models.WordLevel(unk_token=unk_token))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = getattr(pre_tokenizers, pre_tokenizer)()
    if train_on is not None:
        tok.train_from_iterator(train_on, trainer=trainers.WordLevelTrainer(special_tokens=list(specials)))
    if prepend is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{prepend} $A",
                                                           special_tokens=[(prepend, tok.token_to_id(prepend))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk_token, **special_tokens)
    if chat_template:
        hf.chat_template = chat_template
    return hf
