"""data.template: chat stops at the template's end-of-turn token, not only at EOS (Llama-3's <|eot_id|> is
not its <|end_of_text|>): end_of_turn_ids, the stop ids of the HF generation and of the vLLM backend, and
chat prompts on the vLLM path rendered with the served model's tokenizer. Rows are neutral placeholders."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lisa_align import pipeline as pipeline_module
from lisa_align.config import validate_config
from lisa_align.data.templates import PromptFormat, chat_prompt, end_of_turn_ids
from lisa_align.evaluation import vllm_backend
from lisa_align.evaluation.generation import generate, generate_one_by_one, generation_options
from lisa_align.pipeline import Pipeline

from conftest import tiny_llama, word_tokenizer

# Turns end with <|eot|>, a special token that is not the EOS (</s>), as in Llama-3 or Gemma.
EOT_TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PLAIN = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\nend\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:{% endif %}")
VOCAB = ["<unk>", "<pad>", "<s>", "</s>", "<|start|>", "<|eot|>", "user", "assistant", "hello", "hi", "there",
         "end", "assistant:", "user:"]
UNK, PAD, BOS, EOS, START, EOT, USER, ASSISTANT, HELLO, HI, THERE, END = range(12)
CHAT = PromptFormat(template="chat")


def eot_tokenizer():
    return word_tokenizer(VOCAB, additional_special_tokens=["<|start|>", "<|eot|>"], eos_token="</s>",
                          pad_token="<pad>", bos_token="<s>", chat_template=EOT_TEMPLATE)


def test_end_of_turn_is_the_special_token_after_the_assistant_content():
    tok = eot_tokenizer()
    assert tok.eos_token_id == EOS != EOT
    assert end_of_turn_ids(tok) == [EOT]


def test_chatml_end_of_turn_is_its_eos():
    tok = word_tokenizer(["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hi"], chat_template=CHATML,
                         additional_special_tokens=["<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>")
    assert end_of_turn_ids(tok) == [tok.eos_token_id] == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_a_template_without_a_special_end_token_gives_none():
    tok = word_tokenizer(VOCAB, eos_token="</s>", pre_tokenizer="WhitespaceSplit", chat_template=PLAIN)
    assert end_of_turn_ids(tok) == []  # "end" is a plain word of the vocabulary
    assert generation_options(CHAT, tok) == {"add_special_tokens": False, "stop_token_ids": [EOS]}


def test_generation_options_are_none_for_alpaca_and_eos_plus_end_of_turn_for_chat():
    tok = eot_tokenizer()
    assert generation_options(None, tok) == generation_options(PromptFormat(), tok) == {}
    assert generation_options(CHAT, tok) == {"add_special_tokens": False, "stop_token_ids": [EOS, EOT]}


NEXT = {ASSISTANT: HI, HI: THERE, THERE: EOT}  # then <|eot|> -> hello -> hello ...


def chain_llama():
    """A tiny Llama that answers the chat prompt with "hi there <|eot|>" and then "hello" forever: the layer
    adds nothing (o_proj = down_proj = 0), embeddings are one-hot, and lm_head maps each token to the next."""
    model = tiny_llama(len(VOCAB), hidden_size=16, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(len(VOCAB), 16))
        model.lm_head.weight.zero_()
        for t in range(len(VOCAB)):
            model.lm_head.weight[NEXT.get(t, HELLO), t] = 10.0
    assert model.generation_config.eos_token_id == EOS
    return model


def test_chat_generation_stops_at_the_end_of_turn_token():
    tok = eot_tokenizer()
    model = chain_llama()
    prompts = [chat_prompt(tok, [{"role": "user", "content": "hello"}]),
               chat_prompt(tok, [{"role": "user", "content": "hello hello hi"}])]  # two lengths: left padding
    opts = generation_options(CHAT, tok)
    assert generate(model, tok, prompts, max_new_tokens=8, **opts) == ["hi there", "hi there"]
    assert generate_one_by_one(model, tok, prompts, max_new_tokens=8, **opts) == ["hi there", "hi there"]
    enc = tok(prompts[:1], return_tensors="pt", add_special_tokens=False)
    stops = {"eos_token_id": [EOS, EOT], "pad_token_id": PAD, "do_sample": False}
    out = model.generate(**enc, max_new_tokens=8, **stops)
    assert out[0, enc["input_ids"].shape[1]:].tolist() == [HI, THERE, EOT]  # stopped right after <|eot|>
    # Without the end-of-turn stop the model runs on to max_new_tokens past its answer.
    out = model.generate(**enc, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, do_sample=False)
    assert out[0, enc["input_ids"].shape[1]:].tolist() == [HI, THERE, EOT] + [HELLO] * 5
    assert generate(model, tok, prompts[:1], max_new_tokens=8, add_special_tokens=False) == [
        "hi there " + " ".join(["hello"] * 5)]


def test_the_answer_is_cut_before_a_stop_token_that_is_not_special():
    tok = eot_tokenizer()
    model = chain_llama()
    prompt = chat_prompt(tok, [{"role": "user", "content": "hello"}])
    # "there" is a plain word: skip_special_tokens would keep it, the cut drops it.
    assert generate(model, tok, [prompt], max_new_tokens=8, add_special_tokens=False, stop_token_ids=[THERE]) == [
        "hi"]
    assert generate_one_by_one(model, tok, [prompt], max_new_tokens=8, add_special_tokens=False,
                               stop_token_ids=[THERE]) == ["hi"]


def test_vllm_generator_passes_the_stop_ids_and_tokenises_chat_prompts_itself(monkeypatch):
    tok = eot_tokenizer()
    calls = []

    class FakeLLM:
        def __init__(self, model, **kw):
            self.kw = kw

        def get_tokenizer(self):
            return tok

        def generate(self, inputs, params, lora_request=None, use_tqdm=False):
            calls.append((inputs, params))
            # vLLM keeps a stop token that is not special in the text; token_ids hold it either way
            return [SimpleNamespace(outputs=[SimpleNamespace(text="hi there <|eot|>", token_ids=[HI, THERE, EOT])])
                    for _ in inputs]

    monkeypatch.setattr(vllm_backend, "_import_vllm", lambda: (FakeLLM, SimpleNamespace, None))
    prompt = chat_prompt(tok, [{"role": "user", "content": "hello"}])
    gen = vllm_backend.VLLMGenerator("model", **generation_options(CHAT, tok))
    assert gen([prompt], max_new_tokens=5) == ["hi there"]
    inputs, params = calls[-1]
    assert params.stop_token_ids == [EOS, EOT] and params.max_tokens == 5 and params.temperature == 0.0
    assert inputs == [{"prompt_token_ids": tok(prompt, add_special_tokens=False)["input_ids"]}]
    plain = vllm_backend.VLLMGenerator("model")  # alpaca: prompts as text, no stop ids, vLLM's own text
    assert plain(["a prompt"], max_new_tokens=5) == ["hi there <|eot|>"]
    inputs, params = calls[-1]
    assert inputs == ["a prompt"] and not hasattr(params, "stop_token_ids")


def test_pipeline_vllm_chat_renders_prompts_with_the_served_tokenizer(tmp_path, monkeypatch, micro):
    served = tmp_path / "served"
    eot_tokenizer().save_pretrained(served)
    made, seen, loaded = [], [], []

    class FakeVLLM:
        def __init__(self, model_path, adapter_path=None, **kw):
            made.append((model_path, adapter_path, kw))

        def __call__(self, prompts, *, max_new_tokens, desc="generate"):
            seen.extend(prompts)
            return ["sure"] * len(prompts)

    real = pipeline_module.load_tokenizer

    def spy(name, **kw):
        loaded.append((name, kw))
        return real(name, **kw)

    cfg = validate_config(micro(**{"data.template": "chat", "eval.backend": "vllm", "eval.models": ["base"],
                                   "model.trust_remote_code": True}))
    monkeypatch.setattr(pipeline_module, "VLLMGenerator", FakeVLLM)
    monkeypatch.setattr(pipeline_module, "load_tokenizer", spy)
    monkeypatch.setattr(Pipeline, "ensure_base", lambda self: str(served))
    monkeypatch.setattr(Pipeline, "load_for_eval", lambda self, key: pytest.fail("HF model loaded for vllm"))
    metrics = Pipeline(cfg, echo=lambda *_: None).evaluate("base")
    assert loaded == [(str(served), {"trust_remote_code": True})]
    assert [(m, a) for m, a, _ in made] == [(str(served), None)]
    kw = made[0][2]
    assert kw["stop_token_ids"] == [EOS, EOT] and kw["add_special_tokens"] is False
    assert seen and all(p.startswith("<|start|>user\n") and p.endswith("<|eot|>\n<|start|>assistant\n")
                        for p in seen)
    rec = json.loads((cfg.run_dir / "eval" / "base" / "predictions" / "harmful.jsonl").open().readline())
    assert rec["prompt"].startswith("<|start|>user\n") and rec["answer"] == "sure"
    assert metrics["n_harmful"] > 0
