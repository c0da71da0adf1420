"""The real-model benchmarks' own parts, on micro models (no real model, no network):
train_throughput's padding arithmetic (exact numbers on hand-made lengths) and batchings, and its run
on a micro config; overhead.py --model on a saved micro Llama folder (a folder, or a run config naming
it); eval_throughput.py --config (the run's HS prompts, chat template and eval batch size)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import MICRO, tiny_llama, word_tokenizer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
WORDS = ("below is an instruction that describes a task write response appropriately completes the request "
         "# : . , ? ! how can i tell me to my the a user assistant sorry help with that").split()
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tt():
    yield _load("train_throughput")
    _cleanup()


@pytest.fixture(scope="module")
def overhead():
    yield _load("overhead")
    _cleanup()


def _cleanup():
    for name in [n for n in sys.modules if n.startswith(("bench_", "overhead_"))]:
        sys.modules.pop(name)
    while str(BENCH) in sys.path:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def micro_folder(tmp_path_factory) -> Path:
    """A saved micro Llama with a word-level tokenizer that has a chat template."""
    tok = word_tokenizer(["[UNK]", "[PAD]", "</s>", "<|user|>", "<|assistant|>"] + sorted(set(WORDS)),
                         unk_token="[UNK]", lowercase=True, pad_token="[PAD]", eos_token="</s>", chat_template=CHAT)
    out = tmp_path_factory.mktemp("micro-real") / "model"
    tiny_llama(len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
               initializer_range=0.2).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def micro_run_config(micro_folder, tmp_path_factory) -> Path:
    """A micro run config (conftest.MICRO) whose model is the micro folder, chat template, LoRA stages."""
    cfg = json.loads(json.dumps(MICRO))
    root = tmp_path_factory.mktemp("micro-run")
    cfg["output_dir"] = str(root / "runs")
    cfg["model"] = {"name": str(micro_folder)}
    cfg["data"]["template"] = "chat"
    lora = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    cfg["align"].update(lora=lora, batch_size=4)
    cfg["finetune"].update(lora=lora)
    path = root / "micro.yaml"
    path.write_text(json.dumps(cfg))  # YAML is a superset of JSON
    return path


# ---- train_throughput: the padding arithmetic ---------------------------------------------------
def test_padding_stats_exact_on_hand_made_lengths(tt):
    lengths = [2, 4, 4, 8, 5]
    s = tt.padding_stats(lengths, [[0, 3], [1, 2], [4]])
    # [2, 8] -> 16 slots, 10 real; [4, 4] -> 8 slots, 8 real; [5] -> 5 slots, 5 real
    assert (s["batches"], s["real_tokens"], s["slots"], s["pad_tokens"]) == (3, 23, 29, 6)
    assert s["pad_fraction"] == pytest.approx(6 / 29)
    assert s["mean_batch_pad_fraction"] == pytest.approx((6 / 16 + 0 + 0) / 3)
    assert s["pad_tokens_per_batch"] == pytest.approx(2.0) and s["real_tokens_per_batch"] == pytest.approx(23 / 3)
    assert tt.padding_stats([3, 3, 3], [[0, 1, 2]])["pad_fraction"] == 0.0
    assert tt.padding_stats(lengths, [])["pad_fraction"] == 0.0


def test_batchings_partition_the_rows_and_grouping_pads_less(tt):
    lengths = [10, 200, 12, 190, 11, 210, 13, 205] * 8  # two clear length groups
    for kind in ("random", "grouped", "sorted"):
        batches = tt.epoch_batches(kind, lengths, 4, seed=3)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every row once
        assert [len(b) for b in batches] == [4] * 16
    assert tt.random_batches(64, 4, 3) == tt.random_batches(64, 4, 3) != tt.random_batches(64, 4, 4)
    table = tt.padding_table(lengths, 4, seeds=5)
    assert table["sorted"]["pad_fraction"] <= table["grouped"]["pad_fraction"] < table["random"]["pad_fraction"]
    assert table["sorted"]["pad_fraction"] == pytest.approx(tt.padding_stats(
        lengths, tt.sorted_batches(lengths, 4))["pad_fraction"])
    assert table["grouped"]["real_tokens"] == table["random"]["real_tokens"] == sum(lengths)
    sample = tt.sample_batches(tt.random_batches(10, 4, 0), 5, seed=1)  # only full batches (2 of them), repeated
    assert len(sample) == 5 and all(len(b) == 4 for b in sample)


def test_same_rows_plans_and_step_time_fit(tt):
    lengths = [5 + (7 * i) % 40 for i in range(60)]
    plans = tt.same_rows_plans(lengths, 4, warmup=2, steps=6, seed=0)
    r, g = plans["random"], plans["grouped"]
    assert len(r) == len(g) == 8 and r[:2] == g[:2]  # the warm-up batches alike
    assert sorted(i for b in r[2:] for i in b) == sorted(i for b in g[2:] for i in b)  # the same rows measured
    assert len({i for b in r for i in b}) == 32  # no row twice
    assert tt.padding_stats(lengths, g[2:])["slots"] <= tt.padding_stats(lengths, r[2:])["slots"]
    a, b = tt.fit_step_time([1.0 + 0.01 * x for x in (100, 300, 200)], [100, 300, 200])
    assert a == pytest.approx(1.0) and b == pytest.approx(0.01)
    assert tt.fit_step_time([1.0, 2.0], [5, 5]) is None and tt.fit_step_time([2.0, 1.0], [1, 2]) is None


def test_placeholder_has_the_words_asked_for(tt):
    assert len(tt.placeholder(48).split()) == 48 and len(tt.placeholder(3).split()) == 3


def test_train_throughput_runs_on_a_micro_config(tt, micro_run_config, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LISA_ALIGN_CACHE", str(tmp_path / "cache"))
    rc = tt.main(["--config", str(micro_run_config), "--steps", "2", "--warmup", "1", "--epochs-sampled", "3",
                  "--threads", "0"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["rows"] == 16 and out["batch_size"] == 4 and out["part"] == "alignment"
    assert out["tokens_per_s_ratio"] > 0
    for k in ("random", "grouped"):
        m = out["measured"][k]
        assert m["steps"] == 2 and m["real_tokens"] > 0 and m["slots"] >= m["real_tokens"]
    # 16 rows in batches of 4: one batch per mega-batch, so grouping cannot beat random here; sorting can
    assert out["pad_fraction_sorted"] <= min(out["pad_fraction_grouped"], out["pad_fraction_random"])


# ---- overhead.py --model ------------------------------------------------------------------------
def _spec_args(model: str) -> list[str]:
    return ["--model", model, "--steps", "2", "--warmup", "1", "--batch", "2", "--seq-len", "16"]


def test_overhead_model_specs_from_a_folder_and_a_config(overhead, micro_folder, micro_run_config):
    for given in (str(micro_folder), str(micro_run_config)):
        specs = overhead.build_specs(overhead.parse_args(_spec_args(given)))
        assert [(s.config, s.mode, s.batch, s.seq_len) for s in specs] == [("model", "lora", 2, 16)]
        arch = specs[0].arch
        assert arch["path"] == str(micro_folder) and arch["num_layers"] == 2 and arch["vocab_size"] > 20
    full = overhead.build_specs(overhead.parse_args(_spec_args(str(micro_folder)) + ["--modes", "lora", "full"]))
    assert [s.mode for s in full] == ["lora", "full"]
    plain = overhead.build_specs(overhead.parse_args(["--model-size", "micro"]))  # without --model: as before
    assert [(s.config, s.mode) for s in plain] == [("tiny", "lora"), ("tiny", "full"), ("micro", "lora"),
                                                   ("micro", "full")]
    assert all("path" not in s.arch for s in plain)


def test_overhead_model_runs_and_reports_one_anchor_copy(overhead, micro_folder, capsys):
    from transformers.utils import logging as hf_logging

    rc = overhead.main(_spec_args(str(micro_folder)) + ["--threads", "0"])
    hf_logging.enable_progress_bar()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["config"] == "model" and out["model_path"] == str(micro_folder)
    assert out["lora_time_ratio"] > 0 and out["full_time_ratio"] is None and out["lora_measured_steps"] == 2
    row = out["rows"][0]
    assert row["anchor_bytes"] == row["trainable_bytes"] == out["lora_trainable_bytes"] > 0
    assert row["trainable_params"] < row["params"]
    assert row["anchor_bytes"] <= out["lora_extra_mem_bytes"] < 2 * row["anchor_bytes"]


# ---- eval_throughput.py --config ----------------------------------------------------------------
def test_eval_throughput_config_uses_the_runs_prompts_and_template(micro_run_config, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LISA_ALIGN_CACHE", str(tmp_path / "cache"))
    bench = _load("eval_throughput")
    try:
        rc = bench.main(["--config", str(micro_run_config), "--prompts", "4", "--repeats", "1"])
    finally:
        _cleanup()
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert rc == 0 and out["identical"] is True and out["differing"] == 0
    assert out["n_prompts"] == 4 and out["batch_size"] == MICRO["eval"]["batch_size"]
    assert set(out["by_set"]) == {"harmful"} and out["config"] == str(micro_run_config)
    assert "template chat" in lines[0]
