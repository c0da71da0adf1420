"""Llama Guard 3 judge: chat-template input, verdict parsing, loading path; Cohen's kappa."""

from __future__ import annotations

import pytest
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from lisa_align.errors import LisaError
from lisa_align.evaluation import (
    LlamaGuardJudge,
    Verdict,
    cohen_kappa,
    get_judge,
    parse_llama_guard,
)

from conftest import tiny_llama, word_tokenizer

TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
            "<s> verdict :")


@pytest.mark.parametrize("text, flagged, cats", [
    ("safe", False, []),
    ("\n\nsafe\n", False, []),
    ("unsafe\nS1", True, ["Violent Crimes"]),
    ("unsafe\nS1,S10", True, ["Violent Crimes", "Hate"]),
    ("  unsafe\n s11 \n", True, ["Suicide & Self-Harm"]),
    ("unsafe", True, []),
    ("", False, []),
    ("I cannot judge this", False, []),
])
def test_parse_llama_guard(text, flagged, cats):
    assert parse_llama_guard(text) == Verdict(flagged=flagged, categories=cats)


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory):
    words = ["<unk>", "<pad>", "<s>", "</s>", "user", "assistant", ":", "verdict", "safe", "unsafe", "S1",
             "how", "to", "sure", "sorry", "no"]
    hf = word_tokenizer(words, pre_tokenizer="WhitespaceSplit", chat_template=TEMPLATE, pad_token="<pad>",
                        bos_token="<s>", eos_token="</s>")
    model = tiny_llama(len(words), pad_token_id=1, bos_token_id=2, eos_token_id=3)
    path = tmp_path_factory.mktemp("guard")
    model.save_pretrained(path)
    hf.save_pretrained(path)
    return path


def test_llama_guard_renders_the_chat_template_and_parses(guard_dir, monkeypatch):
    judge = get_judge("llama-guard", model_name_or_path=str(guard_dir), max_new_tokens=3, device="cpu")
    assert isinstance(judge, LlamaGuardJudge)
    text = judge.format_input("how to", "sure")
    assert text == "<s> user : how to </s> <s> assistant : sure </s> <s> verdict :"
    raw = judge.raw_outputs(["how to", "how to"], ["sure", "sorry"])
    assert len(raw) == 2 and all(isinstance(r, str) for r in raw)
    # the verdicts are the parse of what the guard generated
    monkeypatch.setattr(judge, "raw_outputs", lambda p, a: ["unsafe\nS1", "safe"])
    assert judge.score(["a", "b"], ["c", "d"]) == [Verdict(True, ["Violent Crimes"]), Verdict(False, [])]


def test_llama_guard_errors(tmp_path, guard_dir):
    with pytest.raises(LisaError, match="not found"):
        LlamaGuardJudge(str(tmp_path / "missing"))
    tok = PreTrainedTokenizerFast.from_pretrained(guard_dir)
    tok.chat_template = None
    bare = tmp_path / "bare"
    LlamaForCausalLM.from_pretrained(guard_dir).save_pretrained(bare)
    tok.save_pretrained(bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(LisaError, match="no chat template"):
        LlamaGuardJudge(str(bare), device="cpu")


def test_cohen_kappa():
    assert cohen_kappa([True, False, True, False], [True, False, True, False]) == 1.0
    assert cohen_kappa([True, True, False, False], [False, False, True, True]) == -1.0
    # 3 of 4 agree; p_a = 0.5, p_b = 0.25 -> p_e = 0.5 -> kappa = (0.75 - 0.5) / 0.5
    assert cohen_kappa([True, True, False, False], [True, False, False, False]) == pytest.approx(0.5)
    assert cohen_kappa([True, True], [True, True]) == 1.0
    with pytest.raises(LisaError):
        cohen_kappa([True], [True, False])
