"""SafeLoRA's transform: C = V·Vᵀ/‖V‖_F as IBM/SafeLoRA builds it, the layers each mode selects,
B ← C·B on those only (lisa_align.post.safelora)."""

from __future__ import annotations

import pytest
import torch

from lisa_align.defenses import SafeLoRA
from lisa_align.errors import LisaError
from lisa_align.post import PostContext
from lisa_align.post.safelora import apply, project

from conftest import tiny_llama

LAYERS = [f"model.layers.{i}.self_attn.{m}" for i in range(3) for m in ("q_proj", "v_proj")]


def _setup(seed: int = 0):
    """A LoRA model with a 'trained' adapter, and aligned/base weights whose difference differs per layer."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(40, hidden_size=16, intermediate_size=32, num_hidden_layers=3, seed=seed)
    base_w = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    aligned_w = dict(base_w)
    for i, name in enumerate(LAYERS):  # low-rank alignment updates, of rank 1..6
        w = base_w[f"{name}.weight"]
        u, v = torch.randn(w.shape[0], i + 1, generator=g), torch.randn(i + 1, w.shape[1], generator=g)
        aligned_w[f"{name}.weight"] = w + u @ v
    return model, aligned_w, base_w


def _factors(model, name):
    layer = model.base_model.model.get_submodule(name)
    return layer.lora_B["default"].weight.detach().clone(), layer.lora_A["default"].weight.detach().clone()


def _direct(model, aligned_w, base_w):
    """name → (C as the reference builds it, the cosine of C·B·A with B·A, B, A)."""
    out = {}
    for name in LAYERS:
        v = aligned_w[f"{name}.weight"] - base_w[f"{name}.weight"]
        c = torch.mm(v, v.t()) / torch.norm(v)
        b, a = _factors(model, name)
        cos = torch.nn.functional.cosine_similarity((c @ b @ a).reshape(1, -1), (b @ a).reshape(1, -1)).item()
        out[name] = (c, round(cos, 5), b, a)
    return out


def _check(model, direct, chosen):
    for name in LAYERS:
        c, _, b, a = direct[name]
        b_now, a_now = _factors(model, name)
        assert torch.equal(a_now, a)  # A is never changed
        if name in chosen:
            torch.testing.assert_close(b_now, c @ b, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(b_now, b)


def test_threshold_mode_projects_exactly_the_layers_at_or_below_the_threshold():
    model, aligned_w, base_w = _setup()
    direct = _direct(model, aligned_w, base_w)
    cosines = sorted(cos for _, cos, _, _ in direct.values())
    threshold = (cosines[2] + cosines[3]) / 2  # between the third and the fourth
    chosen = {n for n, (_, cos, _, _) in direct.items() if cos <= threshold}
    assert len(chosen) == 3
    record = project(model, aligned_w, base_w, select="threshold", threshold=threshold)
    assert set(record["projected"]) == chosen
    assert record["cosines"] == pytest.approx({n: d[1] for n, d in direct.items()}, abs=2e-5)
    _check(model, direct, chosen)


@pytest.mark.parametrize("k", [1, 2, 6, 10])
def test_number_mode_projects_the_k_least_similar_layers(k):
    model, aligned_w, base_w = _setup()
    direct = _direct(model, aligned_w, base_w)
    chosen = set(sorted(LAYERS, key=lambda n: direct[n][1])[:k])
    record = project(model, aligned_w, base_w, select="number", num_proj_layers=k)
    assert set(record["projected"]) == chosen
    _check(model, direct, chosen)


def test_the_alignment_matrix_is_not_an_orthogonal_projector():
    model, aligned_w, base_w = _setup()
    c = _direct(model, aligned_w, base_w)[LAYERS[3]][0]
    assert not torch.allclose(c @ c, c, atol=1e-3)  # scaled Gram matrix: C² ≠ C in general


def test_no_alignment_difference_is_one_line():
    model, _, base_w = _setup()
    with pytest.raises(LisaError, match="same in the aligned and the base model"):
        project(model, dict(base_w), base_w)


def test_a_full_fine_tune_is_refused():
    model = tiny_llama(40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, seed=0)
    w = model.state_dict()
    with pytest.raises(LisaError, match="no LoRA adapter"):
        project(model, w, w)


def test_apply_uses_the_given_models_or_the_runs():
    model, aligned_w, base_w = _setup()
    direct = _direct(model, aligned_w, base_w)
    weights = {"A": aligned_w, "B": base_w}
    ctx = PostContext(base=lambda: "B", aligned=lambda: "A", load_weights=weights.__getitem__)
    record = apply(SafeLoRA(select="number", num_proj_layers=2), model, None, ctx)
    assert (record["aligned_model"], record["base_model"]) == ("A", "B") and len(record["projected"]) == 2
    _check(model, direct, set(record["projected"]))
    with pytest.raises(LisaError, match="are the same"):
        apply(SafeLoRA(aligned_model="B"), model, None, ctx)
