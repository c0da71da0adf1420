"""T-Vaccine: the seeded draw, the frozen layers, the measurement/draw schedule, the checkpointed state and
its bad settings (the pipeline run and the exact resume are in test_defense_contract.py)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from lisa_align.defenses import DEFENSES, TVaccine
from lisa_align.errors import LisaError
from lisa_align.training.t_vaccine import (
    DRAW,
    TVaccineArguments,
    TVaccineTrainer,
    draw_layers,
    layer_probabilities,
    step_seed,
)
from lisa_align.training.vaccine import VaccineArguments, VaccineTrainer, attention_modules

from conftest import tiny_llama

LAYERS = 4
SMALL = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=32)


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (n, 6), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 6] * n,
                                       "labels": [[-100, -100] + r[2:] for r in ids]})


def _collate(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


def _lora_model(targets=("q_proj", "v_proj", "up_proj")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(tiny_llama(**SMALL, seed=0, pad_token_id=0),
                          LoraConfig(r=2, lora_alpha=4, target_modules=list(targets), lora_dropout=0.0, bias="none"))


def _args(tmp_path, cls=TVaccineArguments, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, loss_reduction="example",
                weight_decay=0.1, seed=3, t_vaccine_harmful_rows=None,
                t_vaccine_sampled_layers=1)
    if cls is not TVaccineArguments:
        base = {k: v for k, v in base.items() if not k.startswith("t_vaccine_")}
    return cls(**{**base, **kw})


def _trainer(tmp_path, model=None, harmful=True, **kw):
    return TVaccineTrainer(model=model if model is not None else _lora_model(), args=_args(tmp_path, **kw),
                           train_dataset=_data(), data_collator=_collate,
                           harmful_dataset=_data(6, seed=1) if harmful else None)


# ---- (1) the draw follows the measured norms ---------------------------------------------------
def test_probabilities_are_the_norms_over_their_sum_and_the_draw_is_seeded_multinomial():
    p = layer_probabilities([1.0, 2.0, 3.0, 4.0], 2)
    torch.testing.assert_close(p, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    for seed in (0, 7, 123):
        want = torch.multinomial(p, 2, replacement=False, generator=torch.Generator().manual_seed(seed))
        assert draw_layers(p, 2, seed) == sorted(want.tolist())
    assert step_seed(3, DRAW, 20) == step_seed(3, DRAW, 20) != step_seed(3, DRAW, 40) != step_seed(4, DRAW, 20)


@pytest.mark.parametrize("k", [1, 2])
def test_draw_frequencies_approach_the_reference_probabilities(k):
    """Over many seeds, each layer is sampled as often as successive draws without replacement from p give
    (numpy.random.choice(replace=False, p=p), the reference's draw): p_i for one layer, else
    p_i + sum_j p_j p_i / (1 - p_j) for two."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    n = 4000
    ours = np.zeros(4)
    for s in range(n):
        ours[draw_layers(p, k, step_seed(0, DRAW, s))] += 1
    pn = p.numpy()
    want = pn if k == 1 else np.array([pn[i] + sum(pn[j] * pn[i] / (1 - pn[j]) for j in range(4) if j != i)
                                       for i in range(4)])
    rng = np.random.default_rng(0)
    ref = np.zeros(4)
    for _ in range(n):
        ref[np.random.RandomState(rng.integers(2**31)).choice(4, k, replace=False, p=pn)] += 1
    assert np.abs(ours / n - want).max() < 0.03
    assert np.abs(ref / n - want).max() < 0.03


def test_fewer_positive_norms_than_layers_to_draw_is_an_error():
    with pytest.raises(LisaError, match="only 1 layers have a nonzero"):
        layer_probabilities([0.0, 1.0, 0.0], 2)
    with pytest.raises(LisaError, match="non-finite"):
        layer_probabilities([float("nan"), 1.0], 1)


def test_measured_norms_are_the_harmful_gradient_at_the_attention_outputs(tmp_path):
    trainer = _trainer(tmp_path, vaccine_rho=0.0)  # rho=0 still measures
    model = trainer.model
    batch = trainer.harmful_batch(0)
    assert batch["input_ids"].shape[0] == 1  # the reference's harmful batch: one row
    for p in model.parameters():  # as a frozen state would leave them: the measurement unfreezes all layers
        p.requires_grad_(False)
    for p in trainer.layer_params[0]:
        p.requires_grad_(True)
    norms = trainer.measure_layer_norms(model, 0)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for ps in trainer.layer_params for p in ps] == [i == 0 for i in range(LAYERS)
                                                                           for _ in trainer.layer_params[i]]
    for ps in trainer.layer_params:
        for p in ps:
            p.requires_grad_(True)
    outs = []
    mods = attention_modules(model)
    hs = [m.register_forward_hook(lambda _m, _i, o: outs.append(o[0])) for m in mods]
    loss = trainer.compute_loss(model, dict(batch))
    for h in hs:
        h.remove()
    raw = torch.stack([g.norm() for g in torch.autograd.grad(loss, outs)]).double()
    torch.testing.assert_close(layer_probabilities(norms, 1), raw / raw.sum())
    assert trainer.harmful_batch(5)["input_ids"].tolist() == trainer.harmful_batch(5)["input_ids"].tolist()


# ---- (2) only the sampled layers train, and only they are perturbed -------------------------------
def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _layer_of(name):
    return int(name.split(".layers.")[1].split(".")[0])


@pytest.mark.parametrize("scope", ["attention", "layer"])
def test_only_the_sampled_layers_weights_change(tmp_path, scope):
    trainer = _trainer(tmp_path, vaccine_rho=0.5, t_vaccine_sampled_layers=2, t_vaccine_resample_every=100,
                       t_vaccine_measure_every=100, t_vaccine_scope=scope, max_steps=4)
    before = _snapshot(trainer.model)
    trainer.train()
    sampled = trainer.sampled_layers
    assert len(sampled) == 2 and trainer.drawn_at == 0
    after = _snapshot(trainer.model)
    for name, w in before.items():
        in_attention = ".self_attn." in name
        if _layer_of(name) in sampled or (scope == "attention" and not in_attention):
            # trains (the reference freezes only the attention LoRA; up_proj's LoRA always trains there)
            if "lora_B" in name:
                assert not torch.equal(w, after[name]), name
        else:
            assert torch.equal(w, after[name]), name  # bit-identical: no gradient, no weight decay
    # the perturbation: on the sampled layers' attention outputs, total norm rho; an exact zero elsewhere
    eps = trainer.last_perturbation
    assert all(eps[i].dim() == 0 and float(eps[i]) == 0.0 for i in range(LAYERS) if i not in sampled)
    assert float(torch.sqrt(sum((eps[i] ** 2).sum() for i in sampled))) == pytest.approx(0.5, rel=1e-5)


def test_sampling_every_layer_is_vaccine(tmp_path):
    """S = the number of layers: every layer trains and is perturbed, so the run is Vaccine's."""
    def final(trainer):
        trainer.train()
        return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])

    t = final(_trainer(tmp_path / "t", model=tiny_llama(**SMALL, seed=0, pad_token_id=0), vaccine_rho=0.5,
                       t_vaccine_sampled_layers=LAYERS, t_vaccine_resample_every=1, t_vaccine_measure_every=1))
    v = final(VaccineTrainer(model=tiny_llama(**SMALL, seed=0, pad_token_id=0),
                             args=_args(tmp_path / "v", cls=VaccineArguments, vaccine_rho=0.5),
                             train_dataset=_data(), data_collator=_collate))
    torch.testing.assert_close(t, v, rtol=0, atol=1e-6)


# ---- (3) the schedule: measure every K steps, draw every J ---------------------------------------
def test_norms_are_measured_every_k_steps_and_layers_drawn_every_j(tmp_path):
    trainer = _trainer(tmp_path, t_vaccine_sampled_layers=2, t_vaccine_resample_every=3, t_vaccine_measure_every=5,
                       max_steps=7, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    measured, drawn = [], []
    measure, draw = trainer.measure_layer_norms, trainer.draw

    def count_measure(model, step):
        measured.append(step)
        return measure(model, step)

    def count_draw(step):
        drawn.append((step, list(trainer.layer_norms)))
        return draw(step)

    trainer.measure_layer_norms, trainer.draw = count_measure, count_draw
    trainer.train()
    assert measured == [0, 5]  # once per optimizer step, not per micro-batch
    assert [s for s, _ in drawn] == [0, 3, 6]
    assert drawn[0][1] == drawn[1][1] != drawn[2][1]  # step 6 draws from the norms re-measured at step 5
    assert trainer.measured_at == 5 and trainer.drawn_at == 6


# ---- the checkpointed state ------------------------------------------------------------------------
def test_state_round_trips_and_refuses_other_settings(tmp_path):
    trainer = _trainer(tmp_path / "a", t_vaccine_sampled_layers=2, max_steps=2)
    trainer.train()
    tensors, meta = trainer.trainer_state()
    assert meta["sampled"] == trainer.sampled_layers and len(meta["layer_norms"]) == LAYERS
    other = _trainer(tmp_path / "b", t_vaccine_sampled_layers=2)
    other._resume_dir = "ckpt"
    other.restore_trainer_state(tensors, meta)
    assert (other.layer_norms, other.sampled_layers) == (trainer.layer_norms, trainer.sampled_layers)
    third = _trainer(tmp_path / "c", t_vaccine_sampled_layers=3)
    third._resume_dir = "ckpt"
    with pytest.raises(LisaError, match="resume with the same settings"):
        third.restore_trainer_state(tensors, meta)


# ---- (4) bad settings -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [{"sampled_layers": 0}, {"resample_every": 0}, {"measure_every": -1},
                                 {"harmful_rows": 0}, {"probe_batch_size": 0}, {"scope": "mlp"}, {"rho": -1.0}])
def test_bad_defense_settings(bad):
    with pytest.raises(ValidationError) as e:
        TVaccine(**bad)
    assert next(iter(bad)) in str(e.value)


@pytest.mark.parametrize("bad, match", [
    ({"t_vaccine_sampled_layers": 0}, "t_vaccine_sampled_layers=0 must be an integer >= 1"),
    ({"t_vaccine_resample_every": 0}, "t_vaccine_resample_every=0"),
    ({"t_vaccine_measure_every": 2.5}, "t_vaccine_measure_every=2.5"),
    ({"t_vaccine_scope": "mlp"}, "t_vaccine_scope='mlp'"),
    ({"vaccine_random": True}, "no random variant"),
    ({"vaccine_rho": -1.0}, "vaccine_rho"),
])
def test_bad_arguments(tmp_path, bad, match):
    with pytest.raises(LisaError, match=match):
        _args(tmp_path, **bad)


def test_bad_model_or_data(tmp_path):
    with pytest.raises(LisaError, match=f"samples 5 layers but the model has {LAYERS} decoder layers"):
        _trainer(tmp_path, t_vaccine_sampled_layers=5)
    with pytest.raises(LisaError, match="needs harmful_dataset"):
        _trainer(tmp_path, harmful=False)
    with pytest.raises(LisaError, match="t_vaccine_harmful_rows=200 but the harmful dataset has 6 rows"):
        _trainer(tmp_path, t_vaccine_harmful_rows=200)
    with pytest.raises(LisaError, match="no trainable weights"):
        _trainer(tmp_path, model=_lora_model(targets=("up_proj",)))


def test_defense_declaration():
    d = DEFENSES["t_vaccine"]
    assert d is TVaccine and d.stages == ("align",) and d.needs == ("harmful",)
    assert d.datasets == {"harmful_dataset": "harmful"}
    t = TVaccine()
    assert (t.rho, t.sampled_layers, t.resample_every, t.measure_every, t.harmful_rows) == (3.0, 8, 20, 200, 200)
    with pytest.raises(LisaError, match="harmful_rows=200 but the harmful data has 10 rows"):
        t.training_rows([], {"harmful": [{}] * 10})
