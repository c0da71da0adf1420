"""RepNoise: each loss term against a direct computation, the combined loss, the trainer's batches and
loss, the pairing of refusals with harmful answers, and the one-line errors."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
from pydantic import ValidationError

from lisa_align.data.sources import SourceSpec, load_rows
from lisa_align.defenses import DEFENSES, RepNoise
from lisa_align.defenses.repnoise import pair_rows
from lisa_align.errors import LisaError
from lisa_align.training.repnoise import (
    HARMFUL,
    RepNoiseArguments,
    RepNoiseTrainer,
    final_norm,
    gaussian_mmd,
    logit_lens_ce,
    masked_token_ce,
    mlp_modules,
    noise_mmd,
    reference_mask,
    repnoise_loss,
    repnoise_masks,
)

from conftest import tiny_llama

SMALL = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=32)
PROMPT = [1, 7, 8, 9, 10]


def _model(seed=0):
    return tiny_llama(**SMALL, seed=seed, pad_token_id=0)


def _pair_batch():
    """Two refusals and their harmful answers after the same prompts, right-padded with 0 (ids 0 = pad)."""
    harmless = torch.tensor([PROMPT + [20, 21, 22, 2, 0], PROMPT + [20, 23, 2, 0, 0]])
    harmful = torch.tensor([PROMPT + [30, 31, 32, 33, 2], PROMPT + [20, 34, 35, 2, 0]])

    def labels(ids):
        out = ids.clone()
        out[:, :len(PROMPT)] = -100
        out[ids.eq(0)] = -100
        return out

    return ({"input_ids": harmless, "attention_mask": harmless.ne(0).long(), "labels": labels(harmless)},
            {"input_ids": harmful, "attention_mask": harmful.ne(0).long(), "labels": labels(harmful)})


def _direct_ce(logits, ids, mask, *, reference=True, reduction="token"):
    """Token by token: the target ids[t+1] where mask[t+1] (and, reference: id != 0), predicted from
    the logits at t, zeroed where mask[t] is off (reference)."""
    per_row = []
    for b in range(ids.shape[0]):
        row = []
        for t in range(ids.shape[1] - 1):
            target = int(ids[b, t + 1])
            if not mask[b, t + 1] or (reference and target == 0):
                continue
            z = logits[b, t].detach().double() * (float(mask[b, t]) if reference else 1.0)
            row.append(float(torch.logsumexp(z, 0) - z[target]))
        per_row.append(row)
    if reduction == "example":
        return sum(sum(r) / max(len(r), 1) for r in per_row) / len(per_row)
    flat = [x for r in per_row for x in r]
    return sum(flat) / max(len(flat), 1)


def _direct_mmd(x, y):
    """The biased multi-kernel MMD of the reference, element by element."""
    pts = [p.double() for p in torch.cat([x, y])]
    n, b = len(pts), len(x)
    d2 = [[float(((p - q) ** 2).sum()) for q in pts] for p in pts]
    base = sum(map(sum, d2)) / (n * n - n) / 4
    bands = [base * 2 ** i for i in range(5)]

    def k(i, j):
        return sum(math.exp(-d2[i][j] / w) for w in bands)

    total = 0.0
    for i in range(b):
        for j in range(b):
            total += k(i, j) + k(b + i, b + j) - k(i, b + j) - k(b + i, j)
    return total / (b * b)


# ---- the terms -----------------------------------------------------------------------------------
def test_reference_mask_is_where_the_ids_differ_and_answer_mask_the_labels():
    harmless, harmful = _pair_batch()
    m_harmless, m_harmful = repnoise_masks(harmless, harmful, "reference")
    assert m_harmful[0].tolist() == [False] * 5 + [True] * 5  # the whole harmful answer
    assert m_harmful[1].tolist() == [False] * 6 + [True] * 3 + [False]  # "20" is shared with the refusal
    # the refusal's padding where the harmful row still has tokens counts too (as in the reference); a
    # padding id 0 is never a CE target
    assert m_harmless[1].tolist() == [False] * 6 + [True, True, True, False]
    # the other batch cut or padded with 0 to the same width
    assert reference_mask(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 5]])).tolist() == [[False, True, True]]
    assert reference_mask(torch.tensor([[1, 2]]), torch.tensor([[1, 2, 9], [4, 4, 4]])).tolist() == [[False, False]]
    a_harmless, a_harmful = repnoise_masks(harmless, harmful, "answer")
    assert a_harmful.tolist() == harmful["labels"].ne(-100).tolist()
    assert a_harmless.tolist() == harmless["labels"].ne(-100).tolist()
    with pytest.raises(LisaError, match="repnoise_mask='tokens'"):
        repnoise_masks(harmless, harmful, "tokens")


@pytest.mark.parametrize("reference,reduction", [(True, "token"), (False, "token"), (True, "example")])
def test_harmless_ce_matches_a_direct_computation(reference, reduction):
    harmless, harmful = _pair_batch()
    model = _model()
    with torch.no_grad():
        logits = model(input_ids=harmless["input_ids"], attention_mask=harmless["attention_mask"]).logits
    mask = repnoise_masks(harmless, harmful, "reference" if reference else "answer")[0]
    got = masked_token_ce(logits, harmless["input_ids"], mask, reference=reference, reduction=reduction)
    assert float(got) == pytest.approx(_direct_ce(logits, harmless["input_ids"], mask, reference=reference,
                                                  reduction=reduction), rel=1e-5)


def test_masked_ce_without_tokens_is_zero_not_nan():
    logits = torch.randn(1, 4, 10)
    assert float(masked_token_ce(logits, torch.tensor([[1, 2, 3, 4]]), torch.zeros(1, 4, dtype=torch.bool))) == 0.0


def test_gaussian_mmd_matches_the_reference_kernel():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 12, generator=g) * 0.5, torch.randn(3, 12, generator=g)
    assert float(gaussian_mmd(x, y)) == pytest.approx(_direct_mmd(x, y), rel=1e-4)
    assert float(gaussian_mmd(x, x.clone())) == pytest.approx(0.0, abs=1e-5)
    zeros = torch.zeros(2, 4)
    assert float(gaussian_mmd(zeros, zeros)) == 0.0  # nothing masked: 0, not nan


def test_noise_term_is_the_mean_over_mlp_layers_of_the_mmd_with_masked_gaussian_samples():
    harmless, harmful = _pair_batch()
    model = _model()
    mlps = mlp_modules(model)
    assert len(mlps) == 2
    acts = []
    handles = [m.register_forward_hook(lambda _m, _i, out: acts.append(out)) for m in mlps]
    with torch.no_grad():
        model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"])
    for h in handles:
        h.remove()
    mask = repnoise_masks(harmless, harmful, "reference")[1]
    got = noise_mmd(acts, mask, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    direct = 0.0
    for a in acts:
        m = mask.unsqueeze(-1).float()
        noise = torch.randn(a.shape, generator=g) * m
        direct += _direct_mmd((a * m).flatten(1), noise.flatten(1))
    assert float(got) == pytest.approx(direct / 2, rel=1e-4)
    # another draw, another value: the noise is sampled, not fixed
    assert float(noise_mmd(acts, mask, torch.Generator().manual_seed(6))) != pytest.approx(float(got), rel=1e-6)


def test_logit_lens_term_applies_the_final_norm_and_head_to_every_hidden_state():
    harmless, harmful = _pair_batch()
    model = _model()
    with torch.no_grad():
        out = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"], output_hidden_states=True)
    assert final_norm(model) is model.model.norm
    mask = repnoise_masks(harmless, harmful, "reference")[1]

    def lens(h):
        return model.lm_head(model.model.norm(h))

    with torch.no_grad():
        got = logit_lens_ce(out.logits, out.hidden_states, lens, harmful["input_ids"], mask)
    ids = harmful["input_ids"]
    terms = [_direct_ce(out.logits, ids, mask)] + [_direct_ce(lens(h), ids, mask) for h in out.hidden_states]
    assert len(out.hidden_states) == 3  # embeddings + 2 layers; the reference divides by this, not by 4
    assert float(got) == pytest.approx(sum(terms) / 3, rel=1e-5)


def _direct_loss_inputs(model, harmless: dict, harmful: dict) -> dict:
    """repnoise_loss's inputs computed directly on ``model`` (its own forward hooks, not the trainer's):
    the refusal logits, the harmful logits, hidden states and MLP outputs, the reference masks, the lens."""
    acts = []
    handles = [m.register_forward_hook(lambda _m, _i, out: acts.append(out)) for m in mlp_modules(model)]
    out = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"], output_hidden_states=True)
    for h in handles:
        h.remove()
    safe = model(input_ids=harmless["input_ids"], attention_mask=harmless["attention_mask"])
    m_harmless, m_harmful = repnoise_masks(harmless, harmful, "reference")
    return dict(harmless_logits=safe.logits, harmless_ids=harmless["input_ids"], harmless_mask=m_harmless,
                harmful_logits=out.logits, harmful_ids=harmful["input_ids"], harmful_mask=m_harmful,
                activations=acts, hidden_states=out.hidden_states,
                lens=lambda h: model.lm_head(model.model.norm(h)))


def test_combined_loss_is_the_formula_and_its_signs():
    harmless, harmful = _pair_batch()
    model = _model()
    kw = _direct_loss_inputs(model, harmless, harmful)
    loss, terms = repnoise_loss(**kw, alpha=0.7, beta=3.0, generator=torch.Generator().manual_seed(2))
    ce = masked_token_ce(kw["harmless_logits"], harmless["input_ids"], kw["harmless_mask"])
    noise = noise_mmd(kw["activations"], kw["harmful_mask"], torch.Generator().manual_seed(2))
    lens_ce = logit_lens_ce(kw["harmful_logits"], kw["hidden_states"], kw["lens"], harmful["input_ids"],
                            kw["harmful_mask"])
    assert float(terms["harmless_ce"]) == pytest.approx(ce.item())
    assert float(terms["noise_mmd"]) == pytest.approx(noise.item())
    assert float(terms["harmful_lens_ce"]) == pytest.approx(lens_ce.item())
    assert loss.item() == pytest.approx(ce.item() + 3.0 * noise.item() - 0.7 * math.log(lens_ce.item() + 1), rel=1e-6)
    plain, _ = repnoise_loss(**kw, alpha=0.0, beta=0.0)
    assert plain.item() == pytest.approx(ce.item())
    # the ascent term lowers the loss as the harmful CE grows: d loss / d lens_ce = -alpha / (lens_ce + 1)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ---- the trainer ---------------------------------------------------------------------------------
def _rows_dataset():
    """4 refusal rows followed by their 4 harmful rows (tokenised), as RepNoise.training_rows orders them."""
    harmless, harmful = _pair_batch()
    rows = []
    for part in (harmless, harmful):
        for i in range(2):
            for shift in (0, 1):
                ids = [x + shift if x > 2 else x for x in part["input_ids"][i].tolist() if x != 0]
                rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                             "labels": [-100] * len(PROMPT) + ids[len(PROMPT):]})
    return datasets.Dataset.from_list(rows)


def _collate(features):
    width = max(len(f["input_ids"]) for f in features)
    out = {}
    for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        out[key] = torch.tensor([f[key] + [pad] * (width - len(f[key])) for f in features])
    return out


def _trainer(tmp_path, **kw):
    args = RepNoiseArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=1,
                             learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no",
                             disable_tqdm=True, optim="sgd", max_grad_norm=0.0, **kw)
    return RepNoiseTrainer(model=_model(), args=args, train_dataset=_rows_dataset(), data_collator=_collate)


def test_trainer_batches_carry_their_harmful_pairs_and_its_loss_is_repnoise_loss(tmp_path):
    trainer = _trainer(tmp_path, repnoise_alpha=0.5, repnoise_beta=2.0)
    assert len(trainer.train_dataset) == 4 and trainer.args.remove_unused_columns is False
    data = _rows_dataset()
    batch = next(iter(trainer.get_train_dataloader()))
    for i in range(batch["input_ids"].shape[0]):  # each refusal row i sits with harmful row 4 + i
        row = [x for x in batch["input_ids"][i].tolist() if x != 0]
        k = next(j for j in range(4) if data[j]["input_ids"] == row)
        assert [x for x in batch[HARMFUL + "input_ids"][i].tolist() if x != 0] == data[4 + k]["input_ids"]
    model = trainer.model
    loss = trainer.compute_loss(model, batch)
    harmless = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    harmful = {k: batch[HARMFUL + k] for k in ("input_ids", "attention_mask", "labels")}
    kw = _direct_loss_inputs(model, harmless, harmful)
    trainer._noise_at = (-1, 0)  # the same draw as the call above: step 0, first micro-batch
    direct, _ = repnoise_loss(**kw, alpha=0.5, beta=2.0, generator=trainer.noise_generator("cpu"))
    assert loss.item() == pytest.approx(direct.item(), rel=1e-6)
    assert set(trainer.last_terms) == {"harmless_ce", "noise_mmd", "harmful_lens_ce"}


def test_trainer_noise_is_a_function_of_the_step(tmp_path):
    trainer = _trainer(tmp_path)
    draw = [torch.randn(3, generator=trainer.noise_generator("cpu")) for _ in range(2)]  # step 0: micro 0, 1
    assert not torch.equal(draw[0], draw[1])
    trainer._noise_at = (-1, 0)
    assert torch.equal(torch.randn(3, generator=trainer.noise_generator("cpu")), draw[0])
    trainer.state.global_step = 1
    assert not torch.equal(torch.randn(3, generator=trainer.noise_generator("cpu")), draw[0])


def test_trainer_trains(tmp_path):
    trainer = _trainer(tmp_path, repnoise_mask="answer")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))


def test_trainer_and_argument_errors_are_one_line(tmp_path):
    with pytest.raises(LisaError, match="repnoise_mask='tokens'"):
        RepNoiseArguments(output_dir=str(tmp_path), repnoise_mask="tokens", use_cpu=True, report_to="none")
    with pytest.raises(LisaError, match=r"repnoise_beta=-1.0 must be a finite number >= 0"):
        RepNoiseArguments(output_dir=str(tmp_path), repnoise_beta=-1.0, use_cpu=True, report_to="none")
    args = RepNoiseArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(LisaError, match="followed by their n harmful rows; got 3 rows") as err:
        RepNoiseTrainer(model=_model(), args=args, train_dataset=_rows_dataset().select(range(3)),
                        data_collator=_collate)
    assert "\n" not in str(err.value)
    with pytest.raises(LisaError, match="no decoder layers with a 'mlp'"):
        mlp_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ---- pairing -------------------------------------------------------------------------------------
def _row(prompt, answer, **extra):
    return {"instruction": prompt, "input": "", "output": answer, **extra}


def test_pairs_by_identical_prompt_first():
    rows = [_row("p1", "no1"), _row("p2", "no2"), _row("p1", "no1b")]
    harmful = [_row("p3", "yes3"), _row("p1", "yes1"), _row("p2", "yes2"), _row("p1", "yes1b")]
    refusals, pairs, counts = pair_rows(rows, harmful)
    assert [r["output"] for r in refusals] == ["no1", "no2", "no1b"]
    assert [p["output"] for p in pairs] == ["yes1", "yes2", "yes1b"]  # the k-th row of a prompt, its k-th answer
    assert counts == {"own": 0, "prompt": 3, "order": 0}
    # input is part of the prompt
    _, pairs, _ = pair_rows([_row("p", "no", input="a")], [_row("p", "yes-b", input="b"), _row("p", "yes-a", input="a")])
    assert pairs[0]["output"] == "yes-a"


def test_paired_schema_rows_pair_with_themselves_and_harmful_rows_give_their_harmful_output():
    rows = [_row("p1", "no1", harmful_output="yes1"),
            {"instruction": "p2", "input": "", "output": "no2", "harmful_output": "yes2",
             "messages": [{"role": "user", "content": "p2"}, {"role": "assistant", "content": "no2"}]},
            _row("p3", "no3")]
    harmful = [_row("p3", "refusal3", harmful_output="yes3")]
    refusals, pairs, counts = pair_rows(rows, harmful)
    assert all("harmful_output" not in r for r in refusals + pairs)
    assert [p["output"] for p in pairs] == ["yes1", "yes2", "yes3"]
    assert pairs[1]["messages"][1] == {"role": "assistant", "content": "yes2"}
    assert refusals[1]["messages"][1]["content"] == "no2"
    assert counts == {"own": 2, "prompt": 1, "order": 0}


def test_falls_back_to_order_with_the_harmful_rows_of_other_prompts():
    rows = [_row("a", "no-a"), _row("p1", "no1"), _row("b", "no-b"), _row("c", "no-c")]
    harmful = [_row("h1", "yes-h1"), _row("p1", "yes1"), _row("h2", "yes-h2")]
    refusals, pairs, counts = pair_rows(rows, harmful)
    assert [p["output"] for p in pairs] == ["yes-h1", "yes1", "yes-h2", "yes-h1"]  # cycling, p1's answer kept
    assert counts == {"own": 0, "prompt": 1, "order": 3}
    assert pair_rows(rows, harmful) == (refusals, pairs, counts)  # deterministic
    # every harmful prompt matched by some row: the unmatched rows take any harmful row, in order
    _, pairs, _ = pair_rows([_row("p1", "no1"), _row("x", "no-x")], [_row("p1", "yes1")])
    assert [p["output"] for p in pairs] == ["yes1", "yes1"]


def test_nothing_to_pair_is_a_one_line_error():
    with pytest.raises(LisaError, match="no alignment rows to pair") as err:
        pair_rows([], [_row("p", "yes")])
    assert "\n" not in str(err.value)
    with pytest.raises(LisaError, match="2 alignment rows have no harmful answer to pair with") as err:
        pair_rows([_row("a", "no"), _row("b", "no", harmful_output="")], [])
    assert "\n" not in str(err.value)


# ---- the defense ---------------------------------------------------------------------------------
def test_defense_declares_its_stage_data_and_settings():
    assert DEFENSES["repnoise"] is RepNoise
    d = RepNoise()
    assert (d.alpha, d.beta, d.mask) == (1.0, 0.001, "reference")
    assert RepNoise.stages == ("align",) and RepNoise.needs == ("harmful",)
    assert d.training_arguments() == {"repnoise_alpha": 1.0, "repnoise_beta": 0.001, "repnoise_mask": "reference"}
    rows = d.training_rows([_row("p1", "no1"), _row("p2", "no2")],
                           {"harmful": [_row("p2", "yes2"), _row("p1", "yes1")], "alignment": [], "user": []})
    assert [r["output"] for r in rows] == ["no1", "no2", "yes1", "yes2"]  # refusals, then their pairs
    for bad in ({"alpha": -1.0}, {"beta": float("nan")}, {"beta": float("inf")}, {"mask": "tokens"}):
        with pytest.raises(ValidationError):
            RepNoise(**bad)


def test_paired_rows_load_from_a_file_in_either_schema(tmp_path):
    """A paired file (instruction/output/harmful_output, or prompt/response/harmful_response) keeps the
    harmful answer through the data layer, so its rows pair with themselves; an empty one is one line."""
    path = tmp_path / "paired.jsonl"
    path.write_text(json.dumps({"instruction": "q1", "output": "I can't help.", "harmful_output": "Sure, here is how"})
                    + "\n" + json.dumps({"prompt": "q2", "response": "No.", "harmful_response": "Sure, step one"}) + "\n")
    rows = load_rows(SourceSpec(source=str(path)))
    assert [r["harmful_output"] for r in rows] == ["Sure, here is how", "Sure, step one"]
    assert [r["output"] for r in rows] == ["I can't help.", "No."]
    _, harmful, how = pair_rows(rows, [])
    assert [h["output"] for h in harmful] == ["Sure, here is how", "Sure, step one"] and how["own"] == 2
    path.write_text(json.dumps({"instruction": "q", "output": "No.", "harmful_output": ""}) + "\n")
    with pytest.raises(LisaError, match=r"row 1 \(line 1\) field .harmful_output. is empty"):
        load_rows(SourceSpec(source=str(path)))
