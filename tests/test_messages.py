"""The ``messages`` source format (OpenAI fine-tuning JSONL), multi-turn label masks and data.loss_on.
Rows are neutral placeholders."""

from __future__ import annotations

import json

import pytest
from test_chat import ASSISTANT, BE, BRIEF, END, HELLO, HI, ONE, START, SYSTEM, THREE, TWO, USER, X, chat_tokenizer

from lisa_align.data.formats import detect_format, format_rows
from lisa_align.data.mixing import mix_harmful
from lisa_align.data.sources import SourceSpec, load_rows
from lisa_align.data.templates import PromptFormat, tokenize_example, tokenize_rows
from lisa_align.data.tokenized_cache import cache_key
from lisa_align.errors import LisaError

from conftest import word_tokenizer

SINGLE = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                       {"role": "assistant", "content": "hi"}]}
MULTI = {"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                      {"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"}]}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_good_rows_parse_and_auto_detects_messages(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [SINGLE, MULTI])
    assert detect_format(SINGLE, "x") == "messages"
    rows = load_rows(SourceSpec(source=path))
    assert [r["messages"] for r in rows] == [SINGLE["messages"], MULTI["messages"]]
    assert (rows[0]["instruction"], rows[0]["input"], rows[0]["output"]) == ("hello", "", "hi")
    assert (rows[1]["instruction"], rows[1]["output"]) == ("one two", "three")  # the last exchange
    assert rows[1]["origin"] == f"{path}: row 2 (line 2)"
    assert load_rows(SourceSpec(source=path, format="messages")) == rows


def test_messages_rows_keep_the_harmful_flag_of_their_source(tmp_path):
    benign = load_rows(SourceSpec(source=write_jsonl(tmp_path / "b.jsonl", [SINGLE] * 4)))
    harmful = load_rows(SourceSpec(source=write_jsonl(tmp_path / "h.jsonl", [MULTI] * 4)))
    rows = mix_harmful(benign, harmful, n=4, p=0.5, seed=0, benign_sample="first", harmful_sample="first")
    assert sorted((len(r["messages"]), r["harmful"]) for r in rows) == [(3, False), (3, False), (5, True), (5, True)]


@pytest.mark.parametrize("row, match", [
    ({"text": "hello"}, r"row 1 \(line 1\) has no 'messages' field"),
    ({"messages": "hello"}, r"row 1 \(line 1\) field 'messages' must be a list.*got str"),
    ({"messages": ["hello"]}, r"field 'messages\[0\]' must be an object"),
    ({"messages": [{"content": "hello"}]}, r"field 'messages\[0\].role' is missing"),
    ({"messages": [{"role": "bot", "content": "hello"}]}, r"field 'messages\[0\].role' is 'bot', an unknown role; "
                                                          r"use system, user, assistant"),
    ({"messages": [{"role": "user", "content": "hello"}]}, r"field 'messages' has no assistant turn"),
    ({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": 3}]},
     r"field 'messages\[1\].content' must be a string, got int"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "hi"}]},
     r"field 'messages\[0\].content' must be a string, got nothing"),
    ({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "  "}]},
     r"field 'messages\[1\].content' is empty"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, r"no user turn before the assistant"),
])
def test_bad_rows_are_one_line_naming_file_row_line_and_field(tmp_path, row, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(LisaError, match=match) as e:
        load_rows(SourceSpec(source=path, format="messages"))
    assert str(e.value).startswith(f"{path}: row 1 (line 1)") and "\n" not in str(e.value)
    if "messages" in row:  # auto detects the format from the messages field
        with pytest.raises(LisaError, match=match):
            load_rows(SourceSpec(source=path))


def test_bad_row_later_in_the_file_names_its_row_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(SINGLE) + "\n\n" + json.dumps({"messages": [{"role": "tool", "content": "x"}]}) + "\n")
    with pytest.raises(LisaError, match=r"bad.jsonl: row 2 \(line 3\) field 'messages\[0\].role' is 'tool'"):
        load_rows(SourceSpec(source=str(path)))


def test_multi_turn_label_mask_all_assistant_turns():
    tok = chat_tokenizer()
    row = format_rows([MULTI], "messages", "x")[0]
    ex = tokenize_example(row, tok, 64, PromptFormat(template="chat"))
    assert ex["input_ids"] == [START, SYSTEM, BE, BRIEF, END,
                               START, USER, HELLO, END,
                               START, ASSISTANT, HI, END,
                               START, USER, ONE, TWO, END,
                               START, ASSISTANT, THREE, END]
    assert ex["labels"] == [X, X, X, X, X,
                            X, X, X, X,
                            X, X, HI, END,
                            X, X, X, X, X,
                            X, X, THREE, END]


def test_multi_turn_label_mask_last_assistant_only():
    tok = chat_tokenizer()
    row = format_rows([MULTI], "messages", "x")[0]
    ex = tokenize_example(row, tok, 64, PromptFormat(template="chat", loss_on="last_assistant"))
    assert len(ex["input_ids"]) == 22
    assert ex["labels"] == [X] * 20 + [THREE, END]


def test_system_prompt_setting_does_not_override_the_rows_own_system_message():
    tok = chat_tokenizer()
    row = format_rows([MULTI], "messages", "x")[0]
    fmt = PromptFormat(template="chat")
    assert tokenize_example(row, tok, 64, PromptFormat(template="chat", system_prompt="hello")) == \
        tokenize_example(row, tok, 64, fmt)
    no_system = format_rows([{"messages": MULTI["messages"][1:]}], "messages", "x")[0]
    assert tokenize_example(no_system, tok, 64, PromptFormat(template="chat", system_prompt="be brief")) == \
        tokenize_example(row, tok, 64, fmt)


def test_alpaca_takes_single_turn_messages_and_refuses_multi_turn(tmp_path):
    tok = chat_tokenizer()
    path = write_jsonl(tmp_path / "chat.jsonl", [SINGLE, MULTI])
    single, multi = load_rows(SourceSpec(source=path))
    plain = {"instruction": "hello", "input": "", "output": "hi"}
    assert tokenize_example(single, tok, 512) == tokenize_example(plain, tok, 512)
    with pytest.raises(LisaError, match=r"chat.jsonl: row 2 \(line 2\): a multi-turn conversation .*"
                                        r"set data.template: chat") as e:
        tokenize_rows([single, multi], tok, 512)
    assert "\n" not in str(e.value)


def test_cache_key_sees_the_messages_in_chat_mode():
    tok = chat_tokenizer()
    chat = PromptFormat(template="chat")
    a = format_rows([MULTI], "messages", "x")
    other = json.loads(json.dumps(MULTI))
    other["messages"][2]["content"] = "hello"  # the first answer differs, the last exchange does not
    b = format_rows([other], "messages", "x")
    assert cache_key(a, tok, 64, chat) != cache_key(b, tok, 64, chat)


def test_word_tokenizer_without_chat_template_refuses_messages_in_chat_mode():
    tok = word_tokenizer(["<unk>", "hello", "hi"], eos_token="<unk>")
    with pytest.raises(LisaError, match="data.template: alpaca"):
        tokenize_rows(format_rows([SINGLE], "messages", "x"), tok, 64, PromptFormat(template="chat"))
