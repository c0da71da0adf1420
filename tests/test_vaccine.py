"""Vaccine / RandomVaccine: the perturbation, its norm, its removal, and generic layer discovery."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lisa_align.errors import LisaError
from lisa_align.training.vaccine import VaccineArguments, VaccineTrainer, attention_modules

from conftest import tiny_llama

SMALL = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=32)


def _llama(seed=0):
    return tiny_llama(**SMALL, seed=seed, pad_token_id=0)


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (n, 6), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 6] * n,
                                       "labels": [[-100, -100] + r[2:] for r in ids]})


def _collate(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


def _trainer(tmp_path, model=None, **kw):
    args = VaccineArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1,
                            learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no",
                            disable_tqdm=True, loss_reduction="example", optim="sgd", max_grad_norm=0.0, **kw)
    return VaccineTrainer(model=model or _llama(), args=args, train_dataset=_data(), data_collator=_collate)


@pytest.mark.parametrize("build", [
    lambda: tiny_llama(**SMALL, seed=None),
    lambda: MistralForCausalLM(MistralConfig(**SMALL)),
    lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)),
    lambda: GemmaForCausalLM(GemmaConfig(**SMALL, head_dim=8)),
    lambda: OPTForCausalLM(OPTConfig(vocab_size=40, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)),
])
def test_attention_modules_found_by_structure(build):
    model = build()
    mods = attention_modules(model)
    assert len(mods) == 2 and all("Attention" in type(m).__name__ for m in mods)


def test_no_decoder_layers():
    with pytest.raises(LisaError, match="self_attn"):
        attention_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_perturbation_has_norm_rho_follows_the_gradient_and_is_removed(tmp_path):
    trainer = _trainer(tmp_path, vaccine_rho=0.7)
    model = trainer.model
    batch = _collate([_data()[i] for i in range(4)])
    mods = attention_modules(model)
    eps = trainer._perturbations(model, batch, mods)
    total = torch.sqrt(sum((e ** 2).sum() for e in eps))
    assert float(total) == pytest.approx(0.7, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())  # pass 1 leaves parameter gradients alone
    # the direction is the gradient of the loss w.r.t. the attention outputs
    outs = []
    hs = [m.register_forward_hook(lambda _m, _i, o: outs.append(o[0])) for m in mods]
    loss = trainer.compute_loss(model, dict(batch))
    for h in hs:
        h.remove()
    grads = torch.autograd.grad(loss, outs)
    for e, g in zip(eps, grads):
        cos = torch.nn.functional.cosine_similarity(e.flatten(), g.flatten(), dim=0)
        assert float(cos) == pytest.approx(1.0, abs=1e-5)
    # a training run perturbs the second pass and removes its hooks afterwards
    trainer.train()
    assert trainer.last_perturbation is not None
    assert all(len(m._forward_hooks) == 0 for m in mods)


def test_vaccine_changes_the_update_and_rho_zero_is_sft(tmp_path):
    def final(**kw):
        t = _trainer(tmp_path / str(kw), **kw)
        t.train()
        return torch.cat([p.detach().flatten() for p in t.model.parameters()])

    plain, vaccine = final(vaccine_rho=0.0), final(vaccine_rho=5.0)
    assert not torch.allclose(plain, vaccine)
    from lisa_align.training import BaseArguments, BaseTrainer

    args = BaseArguments(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, num_train_epochs=1,
                          learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                          loss_reduction="example", optim="sgd", max_grad_norm=0.0)
    sft = BaseTrainer(model=_llama(), args=args, train_dataset=_data(), data_collator=_collate)
    sft.train()
    torch.testing.assert_close(plain, torch.cat([p.detach().flatten() for p in sft.model.parameters()]))


def test_random_vaccine_noise_has_variance_rho(tmp_path):
    trainer = _trainer(tmp_path, vaccine_rho=0.25, vaccine_random=True)
    mods = attention_modules(trainer.model)
    noises = []
    real = trainer.random_perturbation
    trainer.random_perturbation = lambda x: noises.append(real(x)) or noises[-1]
    batch = _collate([_data()[i] for i in range(4)])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop; we call one step directly
    trainer.training_step(trainer.model, batch)
    assert len(noises) == len(mods)  # one perturbation per attention output, one pass
    noise = torch.cat([n.flatten() for n in noises])
    assert float(noise.var()) == pytest.approx(0.25, rel=0.25) and abs(float(noise.mean())) < 0.1
    assert trainer.last_perturbation is None and all(len(m._forward_hooks) == 0 for m in mods)


def test_bad_vaccine_rho(tmp_path):
    with pytest.raises(LisaError, match="vaccine_rho"):
        VaccineArguments(output_dir=str(tmp_path), vaccine_rho=-1.0)
