"""data.template: chat: the tokenizer's chat template, the assistant-only label mask, the cache key and the
evaluation prompts. Rows are neutral placeholders."""

from __future__ import annotations

import json

import pytest

from lisa_align.data.templates import (
    IGNORE_INDEX,
    PromptFormat,
    chat_prompt,
    prompt_messages,
    tokenize_chat,
    tokenize_example,
    tokenize_rows,
)
from lisa_align.data.tokenized_cache import cache_key, tokenize_rows_cached
from lisa_align.errors import LisaError

from conftest import tiny_llama, word_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = ["<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "be", "brief", "hello", "world",
         "hi", "there", "one", "two", "three"]
UNK, START, END, SYSTEM, USER, ASSISTANT, BE, BRIEF, HELLO, WORLD, HI, THERE, ONE, TWO, THREE = range(len(VOCAB))
X = IGNORE_INDEX
ROW = {"instruction": "hello", "input": "world", "output": "hi there"}
CHAT = PromptFormat(template="chat")


def chat_tokenizer(template: str = CHATML, **kw):
    """ChatML-like word tokenizer; EOS = pad = <|im_end|> (the end-of-turn token)."""
    kw = {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>", **kw}
    return word_tokenizer(VOCAB, additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=template,
                          **kw)


def test_chat_row_exact_ids_and_labels_with_system_prompt():
    tok = chat_tokenizer()
    ex = tokenize_example(ROW, tok, 64, PromptFormat(template="chat", system_prompt="be brief"))
    assert ex["input_ids"] == [START, SYSTEM, BE, BRIEF, END,
                               START, USER, HELLO, WORLD, END,
                               START, ASSISTANT, HI, THERE, END]
    assert ex["labels"] == [X, X, X, X, X,
                            X, X, X, X, X,
                            X, X, HI, THERE, END]
    assert ex["attention_mask"] == [1] * 15
    assert END in ex["labels"]  # the end-of-turn token is learnt: the model learns to stop


def test_chat_row_without_system_and_without_input():
    tok = chat_tokenizer()
    ex = tokenize_example({"instruction": "hello", "input": "", "output": "hi"}, tok, 64, CHAT)
    assert ex["input_ids"] == [START, USER, HELLO, END, START, ASSISTANT, HI, END]
    assert ex["labels"] == [X, X, X, X, X, X, HI, END]


def test_alpaca_stays_the_default():
    tok = chat_tokenizer()
    assert tokenize_example(ROW, tok, 512) == tokenize_example(ROW, tok, 512, PromptFormat())
    assert START not in tokenize_example(ROW, tok, 512)["input_ids"]


def test_collator_pads_labels_with_ignore_only_where_padded_when_pad_is_eos():
    from transformers import DataCollatorForSeq2Seq

    tok = chat_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id == END
    long = tokenize_example(ROW, tok, 64, CHAT)
    short = tokenize_example({"instruction": "hello", "input": "", "output": "hi"}, tok, 64, CHAT)
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX)([long, short])
    n, m = len(long["input_ids"]), len(short["input_ids"])
    assert batch["labels"][1].tolist() == short["labels"] + [X] * (n - m)
    assert batch["labels"][0].tolist() == long["labels"]
    assert batch["input_ids"][1].tolist() == short["input_ids"] + [END] * (n - m)
    assert batch["attention_mask"][1].tolist() == [1] * m + [0] * (n - m)
    assert batch["labels"][1].tolist()[m - 1] == END  # the real end-of-turn keeps its label


def test_truncation_keeps_the_prompt_and_cuts_the_answer():
    tok = chat_tokenizer()
    ex = tokenize_example({"instruction": "hello", "input": "", "output": "hi there"}, tok, 7, CHAT)
    assert ex["input_ids"] == [START, USER, HELLO, END, START, ASSISTANT, HI]
    assert ex["labels"] == [X, X, X, X, X, X, HI]
    with pytest.raises(LisaError, match=r"max_length=5 .*raise data.max_length"):
        tokenize_example({"instruction": "hello", "input": "", "output": "hi"}, tok, 5, CHAT)


def test_boundary_merged_by_the_tokenizer_is_still_exact():
    """A template whose generation prompt runs into the answer ("assistant:hi" is one chunk of a
    whitespace-split tokenizer): the conversation is tokenised piecewise, the labels are the answer."""
    template = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }} <|im_end|> {% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    tok = word_tokenizer(["<unk>", "<|im_end|>", "user:hello", "assistant:", "hi", "assistant:hi", "there"],
                         pre_tokenizer="WhitespaceSplit", additional_special_tokens=["<|im_end|>"],
                         eos_token="<|im_end|>", chat_template=template)
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("<|im_end|>", "user:hello", "assistant:", "hi", "there")}
    ex = tokenize_chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}], tok, 64)
    assert ex["input_ids"] == [ids["user:hello"], ids["<|im_end|>"], ids["assistant:"], ids["hi"], ids["there"],
                               ids["<|im_end|>"]]
    assert ex["labels"] == [X, X, X, ids["hi"], ids["there"], ids["<|im_end|>"]]


def test_chat_without_a_chat_template_is_one_line_naming_the_tokenizer_and_the_fix():
    tok = word_tokenizer(VOCAB, eos_token="<|im_end|>")
    tok.name_or_path = "org/plain-model"
    with pytest.raises(LisaError, match=r"org/plain-model.*has none.*data.template: alpaca") as e:
        tokenize_rows([ROW], tok, 64, CHAT)
    assert "\n" not in str(e.value)


def test_cache_key_holds_template_chat_template_and_system_prompt(tmp_path):
    tok = chat_tokenizer()
    rows = [ROW]
    alpaca = cache_key(rows, tok, 64)
    chat = cache_key(rows, tok, 64, CHAT)
    assert alpaca == cache_key(rows, tok, 64, PromptFormat()) != chat
    assert chat == cache_key(rows, chat_tokenizer(), 64, CHAT)
    assert chat != cache_key(rows, tok, 64, PromptFormat(template="chat", system_prompt="be brief"))
    assert chat != cache_key(rows, tok, 64, PromptFormat(template="chat", loss_on="last_assistant"))
    assert chat != cache_key(rows, chat_tokenizer(CHATML.replace("\n{{ m['content'] }}", " {{ m['content'] }}")),
                             64, CHAT)
    ds, info = tokenize_rows_cached(rows, tok, 64, cache_dir=tmp_path, fmt=CHAT)
    assert not info["cached"] and ds[0]["labels"][-1] == END
    ds2, info2 = tokenize_rows_cached(rows, tok, 64, cache_dir=tmp_path, fmt=CHAT)
    assert info2["cached"] and ds2[0] == ds[0]
    _, info3 = tokenize_rows_cached(rows, tok, 64, cache_dir=tmp_path)
    assert not info3["cached"]  # alpaca: another entry


def test_data_settings_template_fields():
    from lisa_align.config import DataSettings

    d = DataSettings()
    assert (d.template, d.system_prompt, d.loss_on) == ("alpaca", None, "all_assistant")
    d = DataSettings(template="chat", system_prompt="be brief", loss_on="last_assistant")
    assert PromptFormat.of(d) == PromptFormat("chat", "be brief", "last_assistant")
    with pytest.raises(ValueError):
        DataSettings(template="chatml")


def test_eval_prompts_use_the_chat_template_and_the_judge_sees_the_plain_prompt(tmp_path):
    from lisa_align.evaluation.evaluate import evaluate_model

    tok = chat_tokenizer()
    fmt = PromptFormat(template="chat", system_prompt="be brief")
    harmful = [{"instruction": "hello", "input": "ignored", "output": "hi", "category": []}]
    benign = [{"instruction": "hello", "input": "world", "output": "hi"}]
    assert prompt_messages(harmful[0], None, with_input=False) == [{"role": "user", "content": "hello"}]
    seen: list[str] = []

    def generator(prompts, *, max_new_tokens, desc):
        seen.extend(prompts)
        return ["hi there"] * len(prompts)

    metrics = evaluate_model(None, tok, out_dir=tmp_path, judge="refusal", harmful_rows=harmful, benign_rows=benign,
                             generator=generator, prompt_format=fmt)
    want_h = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    want_b = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello\n\nworld<|im_end|>\n"
              "<|im_start|>assistant\n")
    assert seen == [want_h, want_b]
    rec = json.loads((tmp_path / "predictions" / "harmful.jsonl").read_text().splitlines()[0])
    assert rec["instruction"] == "hello" and rec["prompt"] == want_h and rec["answer"] == "hi there"
    assert metrics["n_harmful"] == 1 and metrics["n_benign"] == 1
    with pytest.raises(LisaError, match="data.template: alpaca"):
        evaluate_model(None, word_tokenizer(VOCAB, eos_token="<|im_end|>"), out_dir=tmp_path / "x", judge="refusal",
                       harmful_rows=harmful, generator=generator, prompt_format=fmt)


def test_chat_generation_with_a_tiny_model_adds_no_special_tokens(tmp_path):
    """The rendered prompt holds its own special tokens; generation runs end to end on a tiny Llama."""
    from lisa_align.evaluation.evaluate import evaluate_model

    tok = chat_tokenizer(bos_token="<|im_start|>")
    model = tiny_llama(len(VOCAB), pad_token_id=END, eos_token_id=END, bos_token_id=START)
    assert chat_prompt(tok, [{"role": "user", "content": "hello"}]).startswith("<|im_start|>user")
    metrics = evaluate_model(model, tok, out_dir=tmp_path, judge="refusal",
                             benign_rows=[{"instruction": "hello", "input": "", "output": "hi"}],
                             max_new_tokens_benign=2, batch_size=1, prompt_format=CHAT)
    assert metrics["n_benign"] == 1


def test_train_stage_on_chat_rows(tmp_path):
    from lisa_align.config import StageSettings
    from lisa_align.training.run import train_stage

    tok = chat_tokenizer()
    model = tiny_llama(len(VOCAB), pad_token_id=END, eos_token_id=END)
    stage = StageSettings(lora=None, lr=1e-3, epochs=1, batch_size=2, max_steps=1)
    rows = [ROW, {"instruction": "hello", "input": "", "output": "hi"}]
    _, trainer = train_stage(model, tok, rows, stage, tmp_path / "out", seed=0, max_length=64, use_cpu=True,
                             prompt_format=CHAT, save_checkpoints=False)
    assert trainer.state.global_step == 1
    assert trainer.train_dataset[0]["labels"] == tokenize_example(ROW, tok, 64, CHAT)["labels"]


def test_chat_run_on_a_model_without_chat_template_fails_in_one_line(micro):
    from lisa_align.config import validate_config
    from lisa_align.pipeline import Pipeline

    cfg = validate_config(micro(**{"data.template": "chat"}))
    with pytest.raises(LisaError, match=r"has none: use data.template: alpaca") as e:
        Pipeline(cfg, echo=lambda *_: None).run()
    assert "\n" not in str(e.value)
