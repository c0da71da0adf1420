"""Lisa in TRL: ``LisaMixin`` before ``trl.SFTTrainer`` trains like ``LisaTrainer``.

A tiny word-level tokenizer with a chat template that marks the assistant turn (``{% generation %}``),
conversational ``messages`` rows (user rows use the words u*, alignment rows a*; the first word of each
row is its own marker) and a tiny random Llama. SFTTrainer prepares both datasets itself (chat template,
assistant-only labels); the same rows tokenised by hand go to ``LisaTrainer``, and the two runs take the
same batches in the same states, switch at the same steps and end with the same weights. A run stopped
right after a mid-run checkpoint (between two switches) and resumed ends where a straight run does.
"""

from __future__ import annotations

import copy
import random

import datasets
import pytest
import torch

pytest.importorskip("trl")

from trl import SFTTrainer  # noqa: E402

from lisa_align.errors import LisaError  # noqa: E402
from lisa_align.training import LisaArguments, LisaMixin, LisaTrainer  # noqa: E402
from lisa_align.training.trl import LisaSFTConfig, LisaSFTTrainer  # noqa: E402

from conftest import tiny_llama, word_tokenizer  # noqa: E402

SPECIALS = ["<unk>", "<pad>", "</s>", "USER:", "BOT:"]
USER_WORDS = [f"u{i}" for i in range(20)]
ALIGN_WORDS = [f"a{i}" for i in range(20)]
VOCAB = SPECIALS + USER_WORDS + ALIGN_WORDS
ID = {w: i for i, w in enumerate(VOCAB)}
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}BOT: "
            "{% generation %}{{ m['content'] }} </s>{% endgeneration %} {% endif %}{% endfor %}"
            "{% if add_generation_prompt %}BOT: {% endif %}")

# T = 15 steps (10 user rows, batch 2, 3 epochs); K1/K2 = 2/3: switches at 2, 5, 7, 10, 12
COMMON = dict(use_cpu=True, report_to="none", disable_tqdm=True, logging_strategy="no", save_strategy="no",
              dataloader_num_workers=0, seed=0, data_seed=0, lr_scheduler_type="constant", warmup_steps=0,
              weight_decay=0.0, max_grad_norm=0.0, per_device_train_batch_size=2, num_train_epochs=3,
              learning_rate=5e-3, k1=2, k2=3, rho=1.0, proximal_warmup_ratio=0.0)
SWITCHES = [2, 5, 7, 10, 12]


def conversations(n: int, words: list[str], seed: int) -> list[tuple[list[str], list[str]]]:
    """n (prompt words, answer words); row i's prompt starts with words[i], its marker."""
    rng = random.Random(seed)
    return [([words[i]] + rng.choices(words, k=rng.randint(1, 3)), rng.choices(words, k=rng.randint(1, 4)))
            for i in range(n)]


def messages_rows(convs) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"messages": [
        [{"role": "user", "content": " ".join(p)}, {"role": "assistant", "content": " ".join(a)}] for p, a in convs]})


def tokenised_rows(convs) -> datasets.Dataset:
    """The rows the chat template makes, tokenised by hand; only the answer and its </s> are labelled."""
    ids, labels = [], []
    for p, a in convs:
        prompt = [ID["USER:"], *(ID[w] for w in p), ID["BOT:"]]
        answer = [*(ID[w] for w in a), ID["</s>"]]
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids],
                                       "labels": labels})


USER = conversations(10, USER_WORDS, seed=0)
ALIGN = conversations(8, ALIGN_WORDS, seed=1)


def pad_collate(features):
    width = max(len(f["input_ids"]) for f in features)

    def pad(key, value):
        return torch.tensor([list(f[key]) + [value] * (width - len(f[key])) for f in features])

    return {"input_ids": pad("input_ids", ID["<pad>"]), "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100)}


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(VOCAB, pre_tokenizer="WhitespaceSplit", chat_template=TEMPLATE, pad_token="<pad>",
                          eos_token="</s>")


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama(len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=ID["<pad>"],
                      eos_token_id=ID["</s>"], bos_token_id=None, tie_word_embeddings=False, initializer_range=0.2)


class Recording:
    """Records (optimizer step, Lisa state, the micro-batch's input ids) for every micro-batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, str, list[list[int]]]] = []

    def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
        self.seen.append((self.state.global_step, self.current_state(), inputs["input_ids"].tolist()))
        return super().training_step(model, inputs, num_items_in_batch, **kwargs)


class TrlLisa(Recording, LisaMixin, SFTTrainer):  # the two lines a TRL user writes (less the recording)
    pass


class PlainLisa(Recording, LisaTrainer):
    pass


def trl_trainer(base_model, tokenizer, out, cls=TrlLisa, **kw):
    args = LisaSFTConfig(**{**COMMON, "output_dir": str(out), "bf16": False, "gradient_checkpointing": False,
                            "assistant_only_loss": True, **kw})
    return cls(model=copy.deepcopy(base_model), args=args, processing_class=tokenizer,
               train_dataset=messages_rows(USER), alignment_dataset=messages_rows(ALIGN))


def weights(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]


def max_diff(xs, ys) -> float:
    assert len(xs) == len(ys)
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(xs, ys))


def unpadded(batch: list[list[int]]) -> list[list[int]]:
    return [[t for t in row if t != ID["<pad>"]] for row in batch]


def test_lisa_on_sft_trainer_equals_lisa_trainer(base_model, tokenizer, tmp_path):
    trl = trl_trainer(base_model, tokenizer, tmp_path / "trl")
    # both datasets went through SFTTrainer's preparation: the chat template, assistant-only labels
    for prepared, convs in ((trl.train_dataset, USER), (trl.alignment_dataset, ALIGN)):
        hand = tokenised_rows(convs)
        assert prepared["input_ids"] == hand["input_ids"] and prepared["labels"] == hand["labels"]
    trl.train()

    plain = PlainLisa(model=copy.deepcopy(base_model), args=LisaArguments(
        **COMMON, output_dir=str(tmp_path / "plain"), remove_unused_columns=False),
        train_dataset=tokenised_rows(USER), alignment_dataset=tokenised_rows(ALIGN), data_collator=pad_collate)
    plain.train()

    assert trl.state.global_step == plain.state.global_step == 15
    assert [r["lisa/step"] for r in trl.switch_log] == [r["lisa/step"] for r in plain.switch_log] == SWITCHES
    # the same batches, in the same states: alignment steps on alignment rows only (markers a*)
    assert [(s, st, unpadded(b)) for s, st, b in trl.seen] == [(s, st, unpadded(b)) for s, st, b in plain.seen]
    align_ids = {ID[w] for w in ALIGN_WORDS}
    for _, state, batch in trl.seen:
        assert all((row[1] in align_ids) == (state == "alignment") for row in batch)
    assert [r["lisa/drift"] for r in trl.switch_log] == pytest.approx([r["lisa/drift"] for r in plain.switch_log],
                                                                      abs=1e-6)
    assert max_diff(trl.anchor, plain.anchor) <= 1e-6
    assert max_diff(weights(trl), weights(plain)) <= 1e-6
    assert max_diff(weights(trl), [p.detach() for p in base_model.parameters()]) > 1e-3  # it did train


class Stopped(Exception):
    pass


class RecordingLisaSFT(Recording, LisaSFTTrainer):
    pass


class StopsAfterCheckpoint6(LisaSFTTrainer):
    """Stands for a process killed right after checkpoint-6 (between the switches at 5 and 7)."""

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.state.global_step == 6:
            raise Stopped


def test_a_stopped_run_resumes_to_the_straight_run(base_model, tokenizer, tmp_path):
    kw = dict(save_strategy="steps", save_steps=3, rho=20.0)
    straight = trl_trainer(base_model, tokenizer, tmp_path / "straight", cls=LisaSFTTrainer, **kw)
    straight.train()

    with pytest.raises(Stopped):
        trl_trainer(base_model, tokenizer, tmp_path / "killed", cls=StopsAfterCheckpoint6, **kw).train()
    assert (tmp_path / "killed" / "checkpoint-6" / "lisa_align_state.safetensors").is_file()
    resumed = trl_trainer(base_model, tokenizer, tmp_path / "killed", cls=RecordingLisaSFT, **kw)
    resumed.train(resume_from_checkpoint=True)

    assert resumed.state.global_step == 15 and resumed.seen[0][0] == 6  # it went on from checkpoint-6
    # the switch log before the stop came back from the checkpoint; the drift at 7 is against the anchor of 5
    assert [r["lisa/step"] for r in resumed.switch_log] == SWITCHES
    assert [r["lisa/drift"] for r in resumed.switch_log] == pytest.approx(
        [r["lisa/drift"] for r in straight.switch_log], abs=1e-6)
    assert max_diff(resumed.anchor, straight.anchor) <= 1e-6
    assert max_diff(weights(resumed), weights(straight)) <= 1e-6


def test_sft_trainer_without_lisa_settings_is_one_line(base_model, tokenizer, tmp_path):
    from trl import SFTConfig

    args = SFTConfig(**{k: v for k, v in COMMON.items() if k not in ("k1", "k2", "rho", "proximal_warmup_ratio")},
                     output_dir=str(tmp_path), bf16=False, gradient_checkpointing=False)
    with pytest.raises(LisaError, match="LisaSFTConfig"):
        LisaSFTTrainer(model=copy.deepcopy(base_model), args=args, processing_class=tokenizer,
                       train_dataset=messages_rows(USER), alignment_dataset=messages_rows(ALIGN))
