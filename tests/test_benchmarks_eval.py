"""benchmarks/eval_throughput.py on a micro model: it runs, and its last line is the JSON verdict."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from conftest import tiny_llama, word_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_throughput.py"
SPECIALS = ["[UNK]", "[PAD]", "</s>"]
# The Alpaca template's words plus a few from the synthetic prompts; anything else is [UNK] (one
# token per word, so prompt lengths still vary and the batched path really pads).
WORDS = (
    "below is an instruction that describes a task paired with input provides further context write "
    "response appropriately completes the request # : . , ? ! analyze sentiment of and respond only "
    "positive or negative the movie acting plot was great dull not how can i tell me to my"
).split()


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("eval_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory) -> Path:
    """A randomly initialised tiny Llama and a word-level tokenizer, saved with save_pretrained."""
    tokenizer = word_tokenizer(SPECIALS + sorted(set(WORDS)), unk_token="[UNK]", lowercase=True, pad_token="[PAD]",
                               eos_token="</s>")
    out = tmp_path_factory.mktemp("micro") / "model"
    tiny_llama(len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
               initializer_range=0.2).save_pretrained(out)  # decisive logits: no near-ties for float noise to flip
    tokenizer.save_pretrained(out)
    return out


def test_eval_throughput_main_reports_identical_answers_and_a_speedup(bench, micro_model, capsys):
    rc = bench.main(["--model", str(micro_model), "--prompts", "8", "--batch-size", "2", "--repeats", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert list(result)[:2] == ["speedup", "identical"]
    assert result["identical"] is True and rc == 0
    assert isinstance(result["speedup"], float) and math.isfinite(result["speedup"]) and result["speedup"] > 0
    assert result["n_prompts"] == 8 and result["batch_size"] == 2
    assert set(result["by_set"]) == {"harmful", "sst2"}
    assert any(line.startswith("all") for line in lines)  # the table


def test_prompt_sets_are_built_as_evaluation_builds_them_and_pad(bench, micro_model):
    from lisa_align.cli import preset_path
    from lisa_align.config import load_config
    from lisa_align.data.templates import PROMPT_NO_INPUT, PROMPT_WITH_INPUT
    from lisa_align.models.loading import load_tokenizer

    cfg = load_config(preset_path("demo"))
    sets = bench._prompt_sets(cfg, 8)
    assert [(name, len(p), mnt) for name, p, mnt in sets] == [("harmful", 4, cfg.eval.max_new_tokens_harmful),
                                                              ("sst2", 4, cfg.eval.max_new_tokens_task)]
    assert all(p.startswith(PROMPT_NO_INPUT.split("{")[0]) and "### Input:" not in p for p in sets[0][1])
    assert all(p.startswith(PROMPT_WITH_INPUT.split("{")[0]) and "### Input:" in p for p in sets[1][1])
    tok = load_tokenizer(str(micro_model))
    for _, prompts, _ in sets:  # different lengths in a batch of 2 (longest first): the batched path left-pads
        lengths = sorted((len(ids) for ids in tok(prompts)["input_ids"]), reverse=True)
        assert any(len(set(lengths[i:i + 2])) > 1 for i in range(0, len(lengths), 2))


def test_eval_throughput_reports_a_mismatch(bench, micro_model, capsys, monkeypatch):
    """A batched path that answers differently: the first differing prompt is shown, exit status 1."""
    import lisa_align.evaluation.generation as generation

    real = generation.generate

    def broken(model, tokenizer, prompts, **kw):
        return [a + " x" if i == 1 else a for i, a in enumerate(real(model, tokenizer, prompts, **kw))]

    monkeypatch.setattr(generation, "generate", broken)
    rc = bench.main(["--model", str(micro_model), "--prompts", "4", "--repeats", "1"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "MISMATCH (harmful, batched, repeat 0) at prompt 1" in out
    assert json.loads(out.strip().splitlines()[-1])["identical"] is False
