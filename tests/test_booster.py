"""Booster's step on a tiny Llama: the gradient the optimizer receives equals, by autograd,
∇f(w) + λ·(∇h(w) − ∇h(w′)) with w′ = w − α·∇h(w)/(‖∇h(w)‖ + 1e-7) (the norm over all trainable tensors),
per micro-batch and averaged over gradient accumulation, under full fine-tuning and LoRA; the weights are
back at w after the perturbation; the harmful stream is seeded and its position is checkpointed; bad
settings are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from lisa_align.config import validate_config
from lisa_align.errors import LisaError
from lisa_align.training.booster import NORM_EPS, BoosterArguments, BoosterTrainer

from conftest import MICRO, tiny_llama

VOCAB, LENGTH = 32, 6
LAMB, ALPHA = 5.0, 0.1


def _rows(n: int, seed: int, prompt: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
    return [{"input_ids": r.tolist(), "attention_mask": [1] * LENGTH, "labels": [-100] * prompt + r.tolist()[prompt:]}
            for r in ids]


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


class Grads(TrainerCallback):
    """The gradient the optimizer is about to apply, and the weights it applies it to."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Recording(BoosterTrainer):
    """Keeps each micro-batch's input ids (the alignment rows it trained on)."""

    def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
        self.seen.append(inputs["input_ids"].clone())
        return super().training_step(model, inputs, num_items_in_batch, **kwargs)


def _model(lora: bool):
    model = tiny_llama(VOCAB, seed=0)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                                 lora_dropout=0.0, init_lora_weights=False))
    return model


def _trainer(tmp_path, model, align, harmful, *, batch, grad_accum=1, reduction="token", lr=0.0, seed=0):
    args = BoosterArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch,
                            gradient_accumulation_steps=grad_accum, max_steps=1, learning_rate=lr, weight_decay=0.0,
                            max_grad_norm=0.0, loss_reduction=reduction, booster_lambda=LAMB, booster_alpha=ALPHA,
                            seed=seed, data_seed=seed, use_cpu=True, report_to="none", save_strategy="no",
                            remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Recording(model=model, args=args, train_dataset=Dataset.from_list(align), data_collator=_collate,
                        harmful_dataset=Dataset.from_list(harmful))
    trainer.seen = []
    grads = Grads()
    trainer.add_callback(grads)
    return trainer, grads


def _loss(model, batch, reduction: str) -> torch.Tensor:
    if reduction == "token":
        return model(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    mask = target.ne(-100)
    return ((tok * mask).sum(1) / mask.sum(1)).mean()


def _by_hand(model, params, align_batch, harmful_batch, reduction) -> list[torch.Tensor]:
    """∇f(w) + λ(∇h(w) − ∇h(w′)) by autograd, w′ = w − α∇h(w)/(‖∇h(w)‖ + 1e-7), the weights left at w."""
    w = [p.detach().clone() for p in params]
    gf = torch.autograd.grad(_loss(model, align_batch, reduction), params, allow_unused=True)
    gh = torch.autograd.grad(_loss(model, harmful_batch, reduction), params, allow_unused=True)
    gf = [torch.zeros_like(p) if g is None else g for g, p in zip(gf, params)]
    gh = [torch.zeros_like(p) if g is None else g for g, p in zip(gh, params)]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in gh)).item()
    with torch.no_grad():
        for p, g in zip(params, gh):
            p.sub_(ALPHA * g / (norm + NORM_EPS))
    gp = torch.autograd.grad(_loss(model, harmful_batch, reduction), params, allow_unused=True)
    gp = [torch.zeros_like(p) if g is None else g for g, p in zip(gp, params)]
    with torch.no_grad():
        for p, v in zip(params, w):
            p.copy_(v)
    return [a + LAMB * (b - c) for a, b, c in zip(gf, gh, gp)]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_one_step_applies_the_booster_gradient(tmp_path, lora):
    align, harmful = _rows(4, seed=1), _rows(4, seed=2, prompt=2)  # the harmful batch: all 4 harmful rows
    model = _model(lora)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    expected = _by_hand(model, [p for _, p in named], _collate(align), _collate(harmful), "token")

    trainer, grads = _trainer(tmp_path, model, align, harmful, batch=4)
    trainer.train()
    assert set(grads.grads) == {n for n, _ in named}
    for (name, _), want in zip(named, expected):
        assert torch.allclose(grads.grads[name], want, atol=1e-6, rtol=1e-5), name
    assert max(float(e.abs().max()) for e in expected) > 1e-3  # a gradient that says something
    # learning rate 0: the perturbed weights were put back exactly, frozen ones never moved
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n].detach()) for n in before)
    assert trainer.harmful_draws == 1


def test_gradient_accumulation_averages_the_micro_batch_booster_gradients(tmp_path):
    align, harmful = _rows(4, seed=3), _rows(4, seed=4, prompt=1)
    model = _model(False)
    trainer, grads = _trainer(tmp_path, model, align, harmful, batch=2, grad_accum=2, reduction="example")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert len(trainer.seen) == 2 and trainer.harmful_draws == 2

    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    rows = {tuple(r["input_ids"]): r for r in align}
    total = [torch.zeros_like(p) for p in params]
    for m, ids in enumerate(trainer.seen):
        align_batch = _collate([rows[tuple(r.tolist())] for r in ids])
        harmful_batch = _collate([harmful[i] for i in trainer.harmful_indices(m)])
        for t, g in zip(total, _by_hand(model, params, align_batch, harmful_batch, "example")):
            t.add_(g / 2)
    for (name, _), want in zip(named, total):
        assert torch.allclose(grads.grads[name], want, atol=1e-6, rtol=1e-5), name


def test_the_harmful_stream_is_seeded_full_and_checkpointed(tmp_path):
    harmful = _rows(6, seed=5)
    a, _ = _trainer(tmp_path, _model(False), _rows(2, seed=6), harmful, batch=2, seed=0)
    b, _ = _trainer(tmp_path, _model(False), _rows(2, seed=6), harmful, batch=2, seed=0)
    c, _ = _trainer(tmp_path, _model(False), _rows(2, seed=6), harmful, batch=2, seed=1)
    draws = [a.harmful_indices(k) for k in range(6)]
    assert draws == [b.harmful_indices(k) for k in range(6)]
    assert draws != [c.harmful_indices(k) for k in range(6)]
    assert all(len(d) == 2 for d in draws)
    assert sorted(sum(draws[:3], [])) == list(range(6)) == sorted(sum(draws[3:], []))  # each pass: every row once
    assert draws[:3] != draws[3:]  # a new permutation per pass

    a.harmful_draws = 5
    tensors, meta = a.trainer_state()
    b.restore_trainer_state(tensors, json.loads(json.dumps(meta)))
    assert b.harmful_draws == 5
    with pytest.raises(LisaError, match="not written by Booster"):
        b._resume_dir = "ckpt"
        b.restore_trainer_state({}, {"trainer": "lisa"})


def test_the_trainer_needs_harmful_rows(tmp_path):
    with pytest.raises(LisaError, match="harmful_dataset"):
        _trainer(tmp_path, _model(False), _rows(2, seed=6), [], batch=2)


@pytest.mark.parametrize(("setting", "value"), [("lamb", -1.0), ("lamb", float("nan")), ("alpha", float("inf")),
                                                ("alpha", -0.1)])
def test_bad_settings_are_one_clear_error(tmp_path, setting, value):
    cfg = json.loads(json.dumps(MICRO))
    cfg["output_dir"] = str(tmp_path)
    cfg["align"]["method"] = {"name": "booster", setting: value}
    with pytest.raises(LisaError) as err:
        validate_config(cfg)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and f"align.method.booster.{setting}" in msg, msg
    with pytest.raises(LisaError, match="booster_lambda=-1.0 must be a finite number >= 0"):
        BoosterArguments(output_dir=str(tmp_path / "o"), booster_lambda=-1.0)


def test_defaults_are_the_reference_ones():
    cfg = json.loads(json.dumps(MICRO))
    cfg["output_dir"] = "unused"
    cfg["align"]["method"] = {"name": "booster"}
    method = validate_config(cfg).align.method
    assert (method.lamb, method.alpha) == (5.0, 0.1)
    assert method.training_arguments() == {"booster_lambda": 5.0, "booster_alpha": 0.1}
