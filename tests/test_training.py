"""Tests for lisa_align.training: the Bi-State schedule, the sampler, LisaTrainer (anchor, proximal term,
gradient accumulation, BSO) and BaseTrainer's per-example loss.

Everything runs offline on a tiny randomly initialised Llama (hidden 32, 2 layers, vocab 50) and tiny
hand-built datasets. User rows use tokens [10, 30) and alignment rows tokens [30, 50); the first token of
each row is a unique marker (10 + i for user row i, 30 + j for alignment row j), so every micro-batch
tells which stream and which rows it came from.
"""

from __future__ import annotations

import copy
import math

import datasets
import pytest
import torch
from transformers import LlamaForCausalLM, TrainerCallback

from lisa_align.config import StageSettings
from lisa_align.defenses.lisa import validate_lisa_settings
from lisa_align.errors import LisaError
from lisa_align.training import (
    ALIGNMENT,
    FINETUNE,
    BaseArguments,
    BaseTrainer,
    BiStateSchedule,
    LisaArguments,
    LisaTrainer,
    per_example_loss,
)
from lisa_align.training.run import training_arguments
from lisa_align.training.sampler import BiStateBatchSampler, steps_per_epoch

from conftest import tiny_llama

A, F = ALIGNMENT, FINETUNE
USER_LO, ALIGN_LO, SPAN = 10, 30, 20
VOCAB = 50

# --------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------



@pytest.fixture(scope="module")
def base_model() -> LlamaForCausalLM:
    return tiny_llama(VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                      bos_token_id=None, tie_word_embeddings=False, initializer_range=0.2)


@pytest.fixture
def model(base_model) -> LlamaForCausalLM:
    return copy.deepcopy(base_model)


def make_rows(n: int, lo: int, lengths=(6,), seed: int = 0) -> datasets.Dataset:
    """n rows; row i starts with the marker lo + i, the rest are tokens from [lo, lo + 20). The first two
    tokens are "prompt" (label -100)."""
    assert n <= SPAN
    g = torch.Generator().manual_seed(seed)
    ids = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        ids.append([lo + i] + torch.randint(lo, lo + SPAN, (length - 1,), generator=g).tolist())
    return datasets.Dataset.from_dict({
        "input_ids": ids,
        "attention_mask": [[1] * len(x) for x in ids],
        "labels": [[-100, -100] + x[2:] for x in ids],
    })


def pad_collate(features):
    """Right padding: pad id 0, attention 0, label -100."""
    width = max(len(f["input_ids"]) for f in features)

    def pad(key, value):
        return torch.tensor([list(f[key]) + [value] * (width - len(f[key])) for f in features])

    return {"input_ids": pad("input_ids", 0), "attention_mask": pad("attention_mask", 0), "labels": pad("labels", -100)}


COMMON = dict(use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, logging_strategy="no",
              remove_unused_columns=False, dataloader_num_workers=0, seed=0, data_seed=0,
              lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0)


def lisa_args(tmp_path, **kw) -> LisaArguments:
    opts = dict(COMMON, output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=3,
                learning_rate=1e-2, k1=2, k2=3, rho=1.0, proximal_warmup_ratio=0.0)
    opts.update(kw)
    return LisaArguments(**opts)


def sft_args(tmp_path, **kw) -> BaseArguments:
    opts = dict(COMMON, output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=3,
                learning_rate=1e-2)
    opts.update(kw)
    return BaseArguments(**opts)


class RecordingLisa(LisaTrainer):
    """Records (optimizer step, row markers) for every micro-batch it trains on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
        self.seen.append((self.state.global_step, inputs["input_ids"][:, 0].tolist()))
        return super().training_step(model, inputs, num_items_in_batch, **kwargs)


class WeightsAtStepBegin(TrainerCallback):
    """The trainable weights at the start of every optimizer step (before its update)."""

    def __init__(self):
        self.weights: dict[int, list[torch.Tensor]] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = [p.detach().clone() for p in model.parameters() if p.requires_grad]


def lisa_trainer(model, args, n_user=10, n_align=8, lengths=(6,), cls=LisaTrainer, callbacks=None, **kw):
    align = make_rows(n_align, ALIGN_LO, lengths, seed=1) if n_align else None
    return cls(model=model, args=args, train_dataset=make_rows(n_user, USER_LO, lengths), alignment_dataset=align,
               data_collator=pad_collate, callbacks=callbacks, **kw)


def trainable(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def max_diff(xs, ys) -> float:
    assert len(xs) == len(ys)
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(xs, ys))


def stream_of(markers: list[int]) -> str:
    kinds = {F if USER_LO <= m < ALIGN_LO else A for m in markers}
    assert len(kinds) == 1, f"micro-batch mixes user and alignment rows: {markers}"
    return kinds.pop()


# --------------------------------------------------------------------------------------------------
# 1. The schedule and the settings
# --------------------------------------------------------------------------------------------------


def test_schedule_exact_sequence_k1_2_k2_3():
    s = BiStateSchedule(2, 3, 12)
    assert "".join("A" if x == A else "F" for x in s.states) == "AAFFFAAFFFAF"
    assert s.state(0) == A
    assert s.switch_steps() == [2, 5, 7, 10, 11]
    assert [t for t in range(12) if s.is_switch(t)] == [2, 5, 7, 10, 11]
    assert not s.is_switch(0)
    assert [s.last_switch(t) for t in range(12)] == [0, 0, 2, 2, 2, 5, 5, 7, 7, 7, 10, 11]
    assert [s.count_before(A, t) for t in range(13)] == [0, 1, 2, 2, 2, 2, 3, 4, 4, 4, 4, 5, 5]
    assert [s.count_before(F, t) for t in range(13)] == [0, 0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 6, 7]
    with pytest.raises(IndexError):
        s.state(12)
    with pytest.raises(IndexError):
        s.state(-1)


@pytest.mark.parametrize("k1,k2,T,expected", [
    (1, 1, 5, "AFAFF"),          # tail r=1: round(0.5)=1 capped at r-1=0 -> F
    (9, 1, 12, "AAAAAAAAAFAF"),  # tail r=2: round(1.8)=2 capped at 1 -> A F
    (3, 1, 6, "AAAFAF"),         # tail r=2: round(1.5)=2 capped at 1
    (1, 3, 7, "AFFFAFF"),        # tail r=3: round(0.75)=1 -> A F F
    (2, 2, 3, "AAF"),            # no full cycle: r=3, round(1.5)=2 (cap r-1=2) -> A A F
    (1, 5, 2, "AF"),             # no full cycle: round(1/3)=0, but a run starts aligned -> A F
    (1, 9, 4, "AFFF"),           # no full cycle: round(0.4)=0 -> at least one alignment step
])
def test_schedule_final_partial_cycle(k1, k2, T, expected):
    s = BiStateSchedule(k1, k2, T)
    r = T % (k1 + k2)
    full = T - r
    tail_a = min(math.floor(r * k1 / (k1 + k2) + 0.5), max(r - 1, 0))
    if full == 0 and r >= 2:
        tail_a = max(tail_a, 1)
    want = ["A" if (t % (k1 + k2) < k1 if t < full else t - full < tail_a) else "F" for t in range(T)]
    got = "".join("A" if x == A else "F" for x in s.states)
    assert got == "".join(want) == expected
    assert s.states[-1] == F


def test_schedule_paper_defaults_tail_and_budget():
    s = BiStateSchedule(100, 900, 1500)
    assert s.states[:100] == [A] * 100 and s.states[100:1000] == [F] * 900
    assert s.states[1000:1050] == [A] * 50 and s.states[1050:] == [F] * 450
    assert s.switch_steps() == [100, 1000, 1050]
    assert s.count_before(A, 1500) == 150  # K1/(K1+K2) of the budget
    s = BiStateSchedule(100, 900, 1001)
    assert s.states[1000] == F  # round(0.1) = 0 alignment steps in a 1-step tail


@pytest.mark.parametrize("k1", [1, 2, 3, 7])
@pytest.mark.parametrize("k2", [1, 2, 5])
def test_schedule_always_ends_on_finetune_and_keeps_ratio(k1, k2):
    for T in range(1, 40):
        s = BiStateSchedule(k1, k2, T)
        assert s.states[-1] == F
        assert len(s.states) == T
        n_align = s.count_before(A, T)
        cycles, r = divmod(T, k1 + k2)
        tail_a = min(math.floor(r * k1 / (k1 + k2) + 0.5), max(r - 1, 0))
        if cycles == 0 and r >= 2:
            tail_a = max(tail_a, 1)
        assert n_align == cycles * k1 + tail_a
        # starts in the alignment state (a 1-step run is a single fine-tuning step)
        assert s.states[0] == (A if T >= 2 else F)
        if T >= k1 + k2:
            assert s.states[0] == A
        # phases alternate with lengths K1, K2 inside full cycles
        for t in range(cycles * (k1 + k2)):
            assert s.state(t) == (A if t % (k1 + k2) < k1 else F)


def test_schedule_degenerate_k():
    s = BiStateSchedule(3, 0, 10)
    assert s.states == [A] * 10 and s.switch_steps() == [] and s.last_switch(9) == 0
    s = BiStateSchedule(0, 4, 10)
    assert s.states == [F] * 10 and s.switch_steps() == [] and s.last_switch(9) == 0
    assert s.count_before(F, 10) == 10 and s.count_before(A, 10) == 0
    s = BiStateSchedule(5, 0, 7)  # K2 = 0: the tail is all alignment too
    assert s.states == [A] * 7


def test_schedule_proximal_threshold():
    s = BiStateSchedule(2, 3, 100)
    assert [t for t in range(100) if s.proximal_active(t, 0.1)] == list(range(11, 100))  # step > 10
    assert [t for t in range(100) if s.proximal_active(t, 0.0)] == list(range(1, 100))
    assert not any(s.proximal_active(t, 1.0) for t in range(100))
    s = BiStateSchedule(2, 3, 12)
    assert [t for t in range(12) if s.proximal_active(t, 0.5)] == [7, 8, 9, 10, 11]  # step > 6


@pytest.mark.parametrize("kw,msg", [
    (dict(k1=0, k2=0), "K1 = K2 = 0"),
    (dict(k1=-1), "K1=-1"),
    (dict(k2=-3), "K2=-3"),
    (dict(k1=1.5), "K1=1.5"),
    (dict(rho=-0.5), "rho=-0.5"),
    (dict(rho=float("nan")), "rho=nan"),
    (dict(rho=float("inf")), "rho=inf"),
    (dict(proximal_warmup_ratio=1.5), "proximal_warmup_ratio=1.5"),
    (dict(proximal_warmup_ratio=-0.1), "proximal_warmup_ratio=-0.1"),
])
def test_invalid_settings_raise_lisa_error(tmp_path, kw, msg):
    settings = dict(k1=100, k2=900, rho=1.0, proximal_warmup_ratio=0.1) | kw
    with pytest.raises(LisaError, match=msg.replace("+", r"\+")) as e:
        validate_lisa_settings(**settings)
    assert "\n" not in str(e.value)
    with pytest.raises(LisaError, match=msg):
        LisaArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)


def test_valid_settings_accepted(tmp_path):
    validate_lisa_settings(0, 5, 0.0)  # BSO, all fine-tuning
    validate_lisa_settings(5, 0, 10.0, 1.0)
    args = LisaArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", k1=3, k2=0, rho=0.0)
    assert (args.k1, args.k2, args.rho, args.proximal_warmup_ratio) == (3, 0, 0.0, 0.1)
    defaults = LisaArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert (defaults.k1, defaults.k2, defaults.rho, defaults.proximal_warmup_ratio) == (100, 900, 1.0, 0.1)
    with pytest.raises(LisaError):
        BiStateSchedule(1, 1, 0)
    with pytest.raises(LisaError, match="loss_reduction"):
        BaseArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", loss_reduction="sum")


def test_trainer_setting_errors(tmp_path, model):
    user = make_rows(4, USER_LO)
    with pytest.raises(LisaError, match="LisaArguments"):
        LisaTrainer(model=model, args=sft_args(tmp_path), train_dataset=user, data_collator=pad_collate)
    with pytest.raises(LisaError, match="alignment_dataset"):
        LisaTrainer(model=model, args=lisa_args(tmp_path), train_dataset=user, data_collator=pad_collate)
    with pytest.raises(LisaError, match="alignment_rows=9"):
        LisaTrainer(model=model, args=lisa_args(tmp_path, alignment_rows=9), train_dataset=user,
                    alignment_dataset=make_rows(4, ALIGN_LO), data_collator=pad_collate)
    # K1 = 0 needs no alignment data
    LisaTrainer(model=model, args=lisa_args(tmp_path, k1=0, k2=1), train_dataset=user, data_collator=pad_collate)


# --------------------------------------------------------------------------------------------------
# The sampler (pure: no model)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_user,n_align,batch,ga,ws,epochs,k1,k2", [
    (10, 6, 2, 1, 1, 4, 2, 3),
    (7, 5, 3, 1, 1, 5, 1, 2),    # batches straddle passes over the user rows
    (12, 4, 2, 2, 1, 4, 2, 3),
    (9, 7, 2, 2, 2, 6, 1, 1),
])
def test_sampler_streams_and_no_user_row_dropped(n_user, n_align, batch, ga, ws, epochs, k1, k2):
    spe = steps_per_epoch(n_user, batch, ga, ws)
    assert spe == max(math.ceil(math.ceil(n_user / (batch * ws)) / ga), 1)
    sched = BiStateSchedule(k1, k2, spe * epochs)
    sampler = BiStateBatchSampler(sched, n_user=n_user, n_align=n_align, batch_size=batch, grad_accum=ga,
                                  world_size=ws, steps_per_epoch=spe, seed=0)
    assert len(sampler) == spe * ga * ws
    user_seen, align_seen = [], []
    for step in range(sched.total_steps):
        batches = sampler.batches_for_step(step)
        assert len(batches) == ga * ws and all(len(b) == batch for b in batches)
        flat = [i for b in batches for i in b]
        if sched.state(step) == F:
            assert all(0 <= i < n_user for i in flat)
            user_seen += flat
        else:
            assert all(n_user <= i < n_user + n_align for i in flat)
            align_seen += flat
    n_f = sched.count_before(F, sched.total_steps)
    assert len(user_seen) == n_f * ga * ws * batch
    assert len(user_seen) >= n_user
    # every complete pass over each stream is a permutation: nothing skipped, nothing repeated early
    for seen, lo, n in ((user_seen, 0, n_user), (align_seen, n_user, n_align)):
        for p in range(len(seen) // n):
            assert sorted(seen[p * n:(p + 1) * n]) == list(range(lo, lo + n)), (p, seen)
    # set_epoch(e) yields exactly the batches of steps [e*spe, (e+1)*spe)
    for e in range(epochs):
        sampler.set_epoch(e)
        want = [b for s in range(e * spe, (e + 1) * spe) for b in sampler.batches_for_step(s)]
        assert list(sampler) == want
    # deterministic in the step (every rank and every resume computes the same batches)
    again = BiStateBatchSampler(sched, n_user=n_user, n_align=n_align, batch_size=batch, grad_accum=ga,
                                world_size=ws, steps_per_epoch=spe, seed=0)
    assert [again.batches_for_step(s) for s in reversed(range(sched.total_steps))] == \
        [sampler.batches_for_step(s) for s in reversed(range(sched.total_steps))]


def test_sampler_user_stream_keeps_position_across_alignment_steps():
    """The user batch an alignment step replaces is not thrown away: the user stream resumes where it stopped."""
    sched = BiStateSchedule(2, 3, 12)
    sampler = BiStateBatchSampler(sched, n_user=100, n_align=10, batch_size=2, grad_accum=1, world_size=1,
                                  steps_per_epoch=12, seed=0)
    user = [sampler.batches_for_step(s)[0] for s in range(12) if sched.state(s) == F]
    flat = [i for b in user for i in b]
    assert len(flat) == 14 == len(set(flat))  # 7 finetune steps, 14 distinct user rows
    # the same rows as an SFT-like stream that only ever takes user batches
    only_user = BiStateBatchSampler(BiStateSchedule(0, 1, 7), n_user=100, n_align=0, batch_size=2, grad_accum=1,
                                    world_size=1, steps_per_epoch=7, seed=0)
    assert flat == [i for s in range(7) for i in only_user.batches_for_step(s)[0]]


def test_sampler_groups_by_length_within_each_stream():
    """group_by_length: each stream's pass is a seeded permutation cut into megabatches sorted by length (the
    Trainer's get_length_grouped_indices); every row still comes once per pass, the streams stay apart, a
    batch's rows are of similar length (far less padding than random batches), and it is a pure function
    of the step (the same batches from a fresh sampler, in any order)."""
    gen = torch.Generator().manual_seed(0)
    n_user, n_align, batch = 400, 80, 4
    lengths = torch.randint(5, 200, (n_user + n_align,), generator=gen).tolist()
    sched = BiStateSchedule(1, 9, 200)
    kw = dict(n_user=n_user, n_align=n_align, batch_size=batch, grad_accum=1, world_size=1, steps_per_epoch=100,
              seed=3)
    grouped = BiStateBatchSampler(sched, lengths=lengths, **kw)
    plain = BiStateBatchSampler(sched, **kw)

    def padding(sampler, state):
        pad = tot = 0
        for s in range(sched.total_steps):
            if sched.state(s) == state:
                for b in sampler.batches_for_step(s):
                    ls = [lengths[i] for i in b]
                    pad, tot = pad + max(ls) * len(ls) - sum(ls), tot + max(ls) * len(ls)
        return pad / tot

    user = [i for s in range(sched.total_steps) if sched.state(s) == F for i in grouped.batches_for_step(s)[0]]
    assert sorted(user[:n_user]) == list(range(n_user))  # one pass: every user row once
    align = [i for s in range(sched.total_steps) if sched.state(s) == A for i in grouped.batches_for_step(s)[0]]
    assert all(n_user <= i < n_user + n_align for i in align) and sorted(align[:n_align]) == list(
        range(n_user, n_user + n_align))
    assert padding(grouped, F) < 0.25 * padding(plain, F)
    again = BiStateBatchSampler(sched, lengths=lengths, **kw)
    assert [again.batches_for_step(s) for s in reversed(range(50))] == \
        [grouped.batches_for_step(s) for s in reversed(range(50))]


# --------------------------------------------------------------------------------------------------
# 2. The trainer follows the schedule, with SFT's budget, and drops no user row
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k1,k2,n_user,batch,ga,epochs", [
    (2, 3, 10, 2, 1, 3),   # T = 15
    (2, 3, 12, 2, 2, 4),   # T = 12: A A F F F A A F F F A F, two micro-batches per step
    (0, 1, 7, 3, 1, 2),    # all fine-tuning
    (1, 0, 6, 2, 1, 2),    # all alignment
])
def test_trainer_follows_schedule(tmp_path, model, k1, k2, n_user, batch, ga, epochs):
    args = lisa_args(tmp_path, k1=k1, k2=k2, per_device_train_batch_size=batch, gradient_accumulation_steps=ga,
                     num_train_epochs=epochs, learning_rate=1e-3)
    trainer = lisa_trainer(model, args, n_user=n_user, n_align=8 if k1 else 0, cls=RecordingLisa)
    trainer.train()
    T = epochs * math.ceil(math.ceil(n_user / batch) / ga)
    assert trainer.state.global_step == T
    assert trainer.schedule.total_steps == T
    assert trainer.schedule.states == BiStateSchedule(k1, k2, T).states
    steps = [s for s, _ in trainer.seen]
    assert steps == [s for s in range(T) for _ in range(ga)]  # ga micro-batches per optimizer step
    per_step = {}
    for s, markers in trainer.seen:
        assert len(markers) == batch
        per_step.setdefault(s, set()).add(stream_of(markers))
    assert [per_step[s].pop() for s in range(T)] == trainer.schedule.states
    user = [m - USER_LO for _, ms in trainer.seen for m in ms if m < ALIGN_LO]
    if k2 > 0:
        n_f = trainer.schedule.count_before(F, T)
        assert len(user) == n_f * ga * batch
        assert len(user) >= n_user
        assert sorted(user[:n_user]) == list(range(n_user))  # every user row before any repeat
    else:
        assert user == []
    if k1 > 0:
        align = [m - ALIGN_LO for _, ms in trainer.seen for m in ms if m >= ALIGN_LO]
        assert len(align) == trainer.schedule.count_before(A, T) * ga * batch
        if len(align) >= 8:
            assert sorted(align[:8]) == list(range(8))
        else:
            assert len(set(align)) == len(align)
    # the switch log records every switch, with the state entered
    assert [r["lisa/step"] for r in trainer.switch_log] == trainer.schedule.switch_steps()
    switches = trainer.schedule.switch_steps()
    assert [r["lisa/state"] for r in trainer.switch_log] == [trainer.schedule.state(s) for s in switches]


def test_total_steps_equal_sft(tmp_path, model):
    """Lisa's budget is SFT's: same optimizer steps for the same user set, batch, accumulation and epochs."""
    for n_user, batch, ga, epochs in ((10, 3, 2, 3), (7, 2, 1, 2)):
        shape = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=ga, num_train_epochs=epochs,
                     learning_rate=1e-4)
        sft = BaseTrainer(model=copy.deepcopy(model), train_dataset=make_rows(n_user, USER_LO),
                         data_collator=pad_collate, args=sft_args(tmp_path, **shape))
        sft.train()
        lisa = lisa_trainer(copy.deepcopy(model), lisa_args(tmp_path, **shape), n_user=n_user)
        lisa.train()
        assert lisa.state.global_step == sft.state.global_step == epochs * math.ceil(math.ceil(n_user / batch) / ga)
        assert lisa.state.max_steps == sft.state.max_steps


# --------------------------------------------------------------------------------------------------
# 3. The anchor is the weights at the last switch; one copy
# --------------------------------------------------------------------------------------------------


def test_anchor_is_weights_at_last_switch(tmp_path, model):
    rec = WeightsAtStepBegin()
    trainer = lisa_trainer(model, lisa_args(tmp_path, num_train_epochs=3), n_user=10, callbacks=[rec])  # T = 15
    trainer.train()
    T = trainer.state.global_step
    assert T == 15 and sorted(rec.weights) == list(range(T))
    sched = trainer.schedule
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = trainer.anchor
    assert len(anchor) == len(params)  # one copy, one tensor per trainable parameter
    assert all(a.shape == p.shape and a.dtype == p.dtype for a, p in zip(anchor, params))
    assert all(a.data_ptr() != p.data_ptr() for a, p in zip(anchor, params))  # a copy, not a view
    # only one copy of the weights is held (the reference keeps two): scan the trainer's attributes
    shapes = [p.shape for p in params]
    ptrs = {p.data_ptr() for p in params}
    copies = [name for name, v in vars(trainer).items()
              if isinstance(v, (list, tuple)) and len(v) == len(params) and all(torch.is_tensor(t) for t in v)
              and [t.shape for t in v] == shapes and not {t.data_ptr() for t in v} & ptrs]
    assert copies == ["_anchor"]
    last = sched.last_switch(T - 1)
    assert last == sched.switch_steps()[-1] == 12
    assert all(torch.equal(a, w) for a, w in zip(anchor, rec.weights[last]))
    # and not some other step's weights: the test would catch a stale or a per-step anchor
    for other in (0, sched.switch_steps()[-2], last - 1, last + 1):
        assert max_diff(anchor, rec.weights[other]) > 1e-4
    assert max_diff(anchor, trainable(model)) > 1e-4
    # drift logged at each switch = ||w(switch) - w(previous switch)||
    prev = 0
    for record, s in zip(trainer.switch_log, sched.switch_steps()):
        want = math.sqrt(sum(float(((w - a).double() ** 2).sum()) for w, a in zip(rec.weights[s], rec.weights[prev])))
        assert record["lisa/drift"] == pytest.approx(want, rel=1e-5)
        assert record["lisa/proximal_term"] == pytest.approx(0.5 * 1.0 * want ** 2, rel=1e-4)
        prev = s


def test_anchor_taken_at_step_zero_and_refreshed_at_each_switch(tmp_path, model):
    """Snapshot the anchor at the start of every step (after the trainer took it): it must be w(last_switch(s))."""
    snaps: dict[int, list[torch.Tensor]] = {}

    class Spy(LisaTrainer):
        def _apply_proximal(self, step):
            snaps.setdefault(step, [a.clone() for a in self.anchor])
            return super()._apply_proximal(step)

    rec = WeightsAtStepBegin()
    trainer = lisa_trainer(model, lisa_args(tmp_path, num_train_epochs=2), n_user=10, cls=Spy, callbacks=[rec])
    trainer.train()
    assert sorted(snaps) == list(range(10))
    for s in range(10):
        ls = trainer.schedule.last_switch(s)
        assert all(torch.equal(a, w) for a, w in zip(snaps[s], rec.weights[ls])), s


# --------------------------------------------------------------------------------------------------
# 4-5. The proximal gradient, and its warm-up
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def trained_lisa(tmp_path, model):
    """A trained LisaTrainer (T = 12, last switch at 11, so the weights have left the anchor)."""

    def build(**kw):
        trainer = lisa_trainer(model, lisa_args(tmp_path, num_train_epochs=3, **kw), n_user=8)
        trainer.train()
        assert trainer.state.global_step == 12
        return trainer

    return build


def test_proximal_gradient_matches_autograd(trained_lisa):
    rho = 2.5
    trainer = trained_lisa(rho=rho, proximal_warmup_ratio=0.1)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    anchor = trainer.anchor
    # the weights have moved since the last switch: the term is not trivially zero
    assert max_diff(trainable(trainer.model), anchor) > 1e-3
    g = torch.Generator().manual_seed(0)
    g0 = [torch.randn(p.shape, generator=g) * 0.1 for p in params]
    for p, x in zip(params, g0):
        p.grad = x.clone()
    trainer._apply_proximal(11)
    w64 = [p.detach().double().requires_grad_() for p in params]
    term = rho / 2 * sum(((w - a.double()) ** 2).sum() for w, a in zip(w64, anchor))
    auto = torch.autograd.grad(term, w64)
    assert max_diff([p.grad for p in params], [x.double() + d for x, d in zip(g0, auto)]) < 1e-6
    # and with no gradient yet (p.grad None), the term alone
    for p in params:
        p.grad = None
    trainer._apply_proximal(11)
    assert max_diff([p.grad for p in params], list(auto)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_proximal_gradient_rounded_once(trained_lisa, dtype):
    """Low-precision weights (e.g. full fine-tuning of a bf16 checkpoint): the gradient must be
    grad + rho*(w - anchor) rounded once, as autograd of the term gives, not grad + rho*w - rho*anchor,
    which in bf16 wipes out a 1e-3 gradient on a weight of 1.0 (the RMSNorm weights)."""
    rho = 1.0
    trainer = trained_lisa(rho=rho)
    trainer.model.to(dtype)
    trainer._params = None
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer._anchor = [p.detach().clone() for p in params]  # right after a switch: w == anchor
    g = torch.Generator().manual_seed(0)
    g0 = [(torch.randn(p.shape, generator=g) * 1e-3).to(dtype) for p in params]
    for p, x in zip(params, g0):
        p.grad = x.clone()
    trainer._apply_proximal(11)
    assert all(torch.equal(p.grad, x) for p, x in zip(params, g0))  # the term is exactly zero
    with torch.no_grad():  # one ulp away from the anchor
        for p in params:
            p.copy_(torch.nextafter(p, torch.full_like(p, math.inf)))
    for p, x in zip(params, g0):
        p.grad = x.clone()
    trainer._apply_proximal(11)
    for p, a, x in zip(params, trainer.anchor, g0):
        want = (x.double() + rho * (p.detach().double() - a.double())).to(dtype)
        assert torch.equal(p.grad, want)


def test_proximal_gradient_chunked(trained_lisa, monkeypatch):
    """The term is formed in bounded chunks: tiny chunks give the same gradient as one chunk."""
    import lisa_align.training.penalty as penalty

    trainer = trained_lisa(rho=0.7)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    g0 = [torch.randn_like(p) for p in params]
    results = []
    for chunk in (1 << 26, 1000, 1):
        monkeypatch.setattr(penalty, "CHUNK", chunk)
        for p, x in zip(params, g0):
            p.grad = x.clone()
        trainer._apply_proximal(11)
        results.append([p.grad.clone() for p in params])
    assert penalty.chunks([5, 5, 3, 20, 1], 10) == [[0, 1], [2], [3], [4]]
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], r))


def test_no_proximal_during_warmup(trained_lisa):
    trainer = trained_lisa(proximal_warmup_ratio=0.5)  # T = 12: on for step > 6
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    g0 = [torch.randn_like(p) for p in params]
    changed = []
    for step in range(12):
        for p, x in zip(params, g0):
            p.grad = x.clone()
        trainer._apply_proximal(step)
        if any(not torch.equal(p.grad, x) for p, x in zip(params, g0)):
            changed.append(step)
    assert changed == [7, 8, 9, 10, 11]
    assert [s for s in range(12) if trainer.proximal_active(s)] == [7, 8, 9, 10, 11]


def test_warmup_end_to_end(tmp_path, base_model):
    """Warm-up 0.5 with T = 12 (A A F F F A A F F F A F): the term is off for steps 0..6, and at step 7, a
    switch, the anchor is refreshed to the current weights first, so the term is exactly zero there too.
    The run therefore equals BSO (rho = 0) bit for bit up to the start of step 8, and leaves it after."""
    runs = {}
    for rho in (0.0, 1.0):
        rec = WeightsAtStepBegin()
        trainer = lisa_trainer(copy.deepcopy(base_model), lisa_args(tmp_path, rho=rho, proximal_warmup_ratio=0.5),
                               n_user=8, callbacks=[rec])
        trainer.train()
        assert trainer.state.global_step == 12 and trainer.schedule.switch_steps() == [2, 5, 7, 10, 11]
        runs[rho] = rec.weights
    for s in range(9):
        assert all(torch.equal(a, b) for a, b in zip(runs[0.0][s], runs[1.0][s])), s
    assert max_diff(runs[0.0][9], runs[1.0][9]) > 1e-4


# --------------------------------------------------------------------------------------------------
# 6. Gradient accumulation: 2 x b == 1 x 2b (proximal once per optimizer step; example-mean loss)
# --------------------------------------------------------------------------------------------------

LENGTHS = (5, 8, 6, 9, 7, 5, 8, 6)  # different label counts per row; padding must not matter


def _lisa_ga_run(base_model, tmp_path, ga, batch, rho=1.0, cls=LisaTrainer):
    args = lisa_args(tmp_path, k1=1, k2=2, rho=rho, proximal_warmup_ratio=0.0, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=ga, num_train_epochs=3, learning_rate=0.5, optim="sgd",
                     loss_reduction="example")
    trainer = lisa_trainer(copy.deepcopy(base_model), args, n_user=8, n_align=8, lengths=LENGTHS, cls=cls)
    trainer.train()
    assert trainer.state.global_step == 6
    return trainer


class ProxEveryMicroBatch(LisaTrainer):
    """A mutant that adds the proximal gradient after every micro-batch (counted ga times per step)."""

    def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
        self._prox_step = -1
        return super().training_step(model, inputs, num_items_in_batch, **kwargs)


def test_gradient_accumulation_equivalence_lisa(tmp_path, base_model):
    calls = []

    class Spy(LisaTrainer):
        def _apply_proximal(self, step):
            calls.append(step)
            return super()._apply_proximal(step)

    acc = _lisa_ga_run(base_model, tmp_path, ga=2, batch=2, cls=Spy)
    assert calls == list(range(6))  # once per optimizer step, not per micro-batch
    big = _lisa_ga_run(base_model, tmp_path, ga=1, batch=4)
    w_acc, w_big = trainable(acc.model), trainable(big.model)
    assert max_diff(w_acc, trainable(base_model)) > 1e-2  # it trained
    assert max_diff(w_acc, w_big) < 1e-5
    assert max_diff(acc.anchor, big.anchor) < 1e-5
    # the comparison is sensitive: the proximal term matters here, and counting it per micro-batch shows
    bso = _lisa_ga_run(base_model, tmp_path, ga=1, batch=4, rho=0.0)
    assert max_diff(w_acc, trainable(bso.model)) > 1e-3
    twice = _lisa_ga_run(base_model, tmp_path, ga=2, batch=2, cls=ProxEveryMicroBatch)
    assert max_diff(w_acc, trainable(twice.model)) > 1e-3


def test_gradient_accumulation_equivalence_sft(tmp_path, base_model):
    def run(ga, batch):
        args = sft_args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=ga, num_train_epochs=2,
                        learning_rate=0.5, optim="sgd", loss_reduction="example")
        trainer = BaseTrainer(model=copy.deepcopy(base_model), args=args, data_collator=pad_collate,
                             train_dataset=make_rows(8, USER_LO, LENGTHS))
        trainer.train()
        assert trainer.state.global_step == 4
        return trainable(trainer.model)

    acc, big = run(2, 2), run(1, 4)
    assert max_diff(acc, trainable(base_model)) > 1e-2
    assert max_diff(acc, big) < 1e-5


# --------------------------------------------------------------------------------------------------
# 7. rho = 0 is BSO
# --------------------------------------------------------------------------------------------------


def test_rho_zero_is_bso(tmp_path, base_model, monkeypatch):
    def run(rho):
        rec = WeightsAtStepBegin()
        trainer = lisa_trainer(copy.deepcopy(base_model), lisa_args(tmp_path, rho=rho, proximal_warmup_ratio=0.0),
                               n_user=10, callbacks=[rec])
        trainer.train()
        return trainer, rec.weights

    bso, bso_w = run(0.0)
    lisa, _ = run(1.0)
    assert [r["lisa/step"] for r in bso.switch_log] == bso.schedule.switch_steps() != []  # still bi-state
    assert all(r["lisa/proximal_term"] == 0.0 for r in bso.switch_log)
    assert max_diff(trainable(bso.model), trainable(lisa.model)) > 1e-3  # the term matters at rho = 1
    # the same run with the proximal term removed altogether (rho = 1 but no term): identical at every step
    monkeypatch.setattr(LisaTrainer, "_apply_proximal", lambda self, step: None)
    plain, plain_w = run(1.0)
    for s in bso_w:
        assert all(torch.equal(a, b) for a, b in zip(bso_w[s], plain_w[s])), s
    assert all(torch.equal(a, b) for a, b in zip(trainable(bso.model), trainable(plain.model)))
    monkeypatch.undo()
    # and at rho = 0 the hook never touches a gradient
    params = [p for p in bso.model.parameters() if p.requires_grad]
    g0 = [torch.randn_like(p) for p in params]
    for step in range(bso.schedule.total_steps):
        for p, x in zip(params, g0):
            p.grad = x.clone()
        bso._apply_proximal(step)
        assert all(torch.equal(p.grad, x) for p, x in zip(params, g0))


@pytest.mark.parametrize("ga, reduction", [(1, "example"), (2, "example"), (2, "token")])
def test_proximal_in_the_loss_equals_the_fused_gradient(tmp_path, base_model, ga, reduction):
    """The loss mode (used under DeepSpeed, whose gradients live in its own buffers) trains the same
    weights as the fused gradient mode, with and without gradient accumulation."""
    def run(mode):
        args = lisa_args(tmp_path, rho=5.0, proximal_mode=mode, gradient_accumulation_steps=ga,
                         per_device_train_batch_size=2 // ga if ga <= 2 else 1, loss_reduction=reduction)
        trainer = lisa_trainer(copy.deepcopy(base_model), args, n_user=10)
        trainer.train()
        return trainer

    grad, loss = run("grad"), run("loss")
    assert not grad.proximal_in_loss and loss.proximal_in_loss
    assert max_diff(trainable(grad.model), trainable(base_model)) > 1e-2
    assert max_diff(trainable(grad.model), trainable(loss.model)) < 1e-5
    assert run("auto").proximal_in_loss is False  # no DeepSpeed here: the fused gradient


def test_deepspeed_zero3_is_refused_and_zero2_puts_the_term_in_the_loss(tmp_path, base_model, monkeypatch):
    from types import SimpleNamespace

    stage = {"value": 3}

    def fake_stage(self):
        return stage["value"]

    monkeypatch.setattr(LisaTrainer, "deepspeed_zero_stage", fake_stage)
    with pytest.raises(LisaError, match="ZeRO-3.*ZeRO-2, FSDP2 or DDP"):
        lisa_trainer(copy.deepcopy(base_model), lisa_args(tmp_path))
    stage["value"] = 2
    assert lisa_trainer(copy.deepcopy(base_model), lisa_args(tmp_path)).proximal_in_loss
    assert not lisa_trainer(copy.deepcopy(base_model), lisa_args(tmp_path, proximal_mode="grad")).proximal_in_loss
    monkeypatch.undo()
    t = lisa_trainer(copy.deepcopy(base_model), lisa_args(tmp_path))
    t.is_deepspeed_enabled = True
    monkeypatch.setattr(type(t.accelerator.state), "deepspeed_plugin", SimpleNamespace(zero_stage=3), raising=False)
    assert t.deepspeed_zero_stage() == 3
    with pytest.raises(LisaError, match="proximal_mode='sum'"):
        lisa_args(tmp_path, proximal_mode="sum")


# --------------------------------------------------------------------------------------------------
# 8. per_example_loss
# --------------------------------------------------------------------------------------------------


def _ce(logits_row, target):
    z = [float(v) for v in logits_row]
    m = max(z)
    return -(z[target] - m - math.log(sum(math.exp(v - m) for v in z)))


def test_per_example_loss_by_hand():
    logits = torch.tensor([
        [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]],
        [[1.0, 2.0, 3.0], [0.0, -2.0, 1.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]],
    ])
    labels = torch.tensor([
        [-100, 1, 2, 0],        # 3 labelled targets: positions 0,1,2 predict 1,2,0
        [-100, -100, -100, 2],  # 1 labelled target: position 2 predicts 2
    ])
    row0 = (_ce(logits[0, 0], 1) + _ce(logits[0, 1], 2) + _ce(logits[0, 2], 0)) / 3
    row1 = _ce(logits[1, 2], 2)
    got = per_example_loss(logits, labels)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx([row0, row1], rel=1e-6)
    example_mean = (row0 + row1) / 2
    token_mean = (3 * row0 + row1) / 4
    assert float(got.mean()) == pytest.approx(example_mean, rel=1e-6)
    assert abs(example_mean - token_mean) > 0.1  # the two reductions really differ here
    # bf16 logits are upcast: the same value to bf16 rounding of the inputs
    assert per_example_loss(logits.bfloat16(), labels).dtype == torch.float32


def test_sft_compute_loss_example_vs_token(tmp_path, model):
    ds = make_rows(2, USER_LO, lengths=(5, 9))
    batch = pad_collate([ds[0], ds[1]])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_ex = per_example_loss(logits, batch["labels"])
    ex = BaseTrainer(model=model, args=sft_args(tmp_path, loss_reduction="example"), data_collator=pad_collate)
    tok = BaseTrainer(model=model, args=sft_args(tmp_path, loss_reduction="token"), data_collator=pad_collate)
    assert ex.loss_is_scaled_for_ga is False  # the Trainer divides the batch mean by the accumulation steps
    with torch.no_grad():
        got_ex = ex.compute_loss(model, dict(batch))
        got_tok = tok.compute_loss(model, dict(batch))
    assert float(got_ex) == pytest.approx(float(per_ex.mean()), rel=1e-5)
    n = batch["labels"][:, 1:].ne(-100).sum(1).float()  # 3 and 7 labelled targets
    assert n.tolist() == [3.0, 7.0]
    assert float(got_tok) == pytest.approx(float((per_ex * n).sum() / n.sum()), rel=1e-5)
    assert abs(float(got_ex) - float(got_tok)) > 1e-4


# --------------------------------------------------------------------------------------------------
# 9. LoRA: the anchor and the term cover only the adapter's A and B
# --------------------------------------------------------------------------------------------------


def test_lora_anchor_covers_only_adapter(tmp_path, model):
    from lisa_align.models.lora import LoraSettings, attach_lora

    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    lora = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(lora) == 2 * 2 * 2  # 2 layers x {q, v} x {A, B}
    assert all(("lora_A" in n or "lora_B" in n) and ("q_proj" in n or "v_proj" in n) for n, _ in lora)
    rec = WeightsAtStepBegin()
    trainer = lisa_trainer(peft_model, lisa_args(tmp_path, learning_rate=5e-2), n_user=10, callbacks=[rec])
    trainer.train()
    T = trainer.state.global_step
    anchor = trainer.anchor
    assert len(anchor) == len(lora)
    assert [a.shape for a in anchor] == [p.shape for _, p in lora]
    last = trainer.schedule.last_switch(T - 1)
    assert all(torch.equal(a, w) for a, w in zip(anchor, rec.weights[last]))
    assert max_diff(anchor, rec.weights[0]) > 1e-4  # refreshed, not the initial adapter
    # base weights are untouched, and the proximal term writes gradients only to the adapter
    for n, p in peft_model.named_parameters():
        if not p.requires_grad:
            key = n.replace("base_model.model.", "", 1).replace(".base_layer", "")
            assert torch.equal(p, base_before[key]), n
    peft_model.zero_grad(set_to_none=True)
    trainer._apply_proximal(T - 1)
    for n, p in peft_model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert max_diff([p.grad for _, p in lora], [1.0 * (p.detach() - a) for (_, p), a in zip(lora, anchor)]) < 1e-7


@pytest.mark.parametrize("ratio, total, warmup", [(1.0, 40, 40), (0.5, 40, 20), (0.1, 12, 2), (0.0, 12, 0)])
def test_warmup_ratio_is_a_share_of_the_steps(tmp_path, ratio, total, warmup):
    """``warmup_ratio: 1.0`` warms up over every step (transformers reads warmup_steps=1.0 as one step)."""
    from lisa_align.config import StageSettings
    from lisa_align.training.run import training_arguments

    args = training_arguments(StageSettings(warmup_ratio=ratio), tmp_path, seed=0, use_cpu=True)
    assert args.get_warmup_steps(total) == warmup
    with pytest.raises(LisaError, match="warmup_ratio=1.5 must be in"):
        BaseArguments(output_dir=str(tmp_path), warmup_ratio=1.5)


def test_a_constant_schedule_starts_at_the_set_rate(tmp_path):
    """The reference fine-tunes with lr_scheduler_type constant (its warmup_ratio 0.1 is ignored): the
    learning rate of step 0 is the set rate, as is every later one."""
    from lisa_align.config import FinetuneStage
    from lisa_align.training.run import training_arguments

    stage = FinetuneStage(lr=2e-3, max_steps=5, batch_size=2, lora=None)
    assert stage.scheduler == "constant" and stage.warmup_ratio == 0.1  # the defaults are the reference's
    args = training_arguments(stage, tmp_path, seed=0, use_cpu=True)
    model = torch.nn.Linear(2, 2)
    trainer = BaseTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    rates = []
    for _ in range(3):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert rates == [2e-3, 2e-3, 2e-3]


def test_group_by_length_is_a_stage_setting_that_reaches_the_trainer(tmp_path):
    assert training_arguments(StageSettings(), tmp_path, seed=0).train_sampling_strategy == "random"
    grouped = training_arguments(StageSettings(group_by_length=True), tmp_path, seed=0)
    assert grouped.train_sampling_strategy == "group_by_length"
