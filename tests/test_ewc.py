"""EWC: the diagonal Fisher of the alignment data and the pull 2λF(w − w0)."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import LlamaForCausalLM

from lisa_align.errors import LisaError
from lisa_align.training import BaseArguments, BaseTrainer, EWCArguments, EWCTrainer
from lisa_align.training.base import per_example_loss

from conftest import tiny_llama

VOCAB = 40


def _model(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(VOCAB, seed=seed, max_position_embeddings=32, pad_token_id=0)


def _data(n: int, lo: int, seed: int) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, lo + 10, (n, 6), generator=g).tolist()
    labels = [[-100, -100] + row[2:] for row in ids]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 6] * n, "labels": labels})


def _collate(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


def _args(tmp_path, cls=EWCArguments, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, num_train_epochs=1,
                use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, loss_reduction="example",
                lr_scheduler_type="constant", seed=0, optim="sgd", max_grad_norm=0.0)
    return cls(**(base | kw))


def _trainer(tmp_path, **kw):
    return EWCTrainer(model=_model(), args=_args(tmp_path, **kw), train_dataset=_data(8, 10, 1),
                      fisher_dataset=_data(8, 25, 2), data_collator=_collate)


def test_fisher_is_mean_of_squared_batch_gradients(tmp_path):
    trainer = _trainer(tmp_path)
    fisher = trainer.compute_fisher()
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is None for p in params)  # nothing left behind for the first real step
    want = [torch.zeros_like(p) for p in params]
    align = _data(8, 25, 2)
    for start in (0, 4):
        batch = _collate([align[i] for i in range(start, start + 4)])
        model.zero_grad()
        labels = batch.pop("labels")
        per_example_loss(model(**batch).logits, labels).mean().backward()
        for w, p in zip(want, params):
            w += p.grad ** 2
    for f, w in zip(fisher, want):
        torch.testing.assert_close(f, w / 2, rtol=1e-5, atol=1e-10)


def test_pull_gradient_equals_autograd(tmp_path):
    trainer = _trainer(tmp_path, ewc_lambda=0.37)
    params = trainer._trainable()
    torch.manual_seed(3)
    trainer.reference = [p.detach() + 0.1 * torch.randn_like(p) for p in params]
    trainer.fisher = [torch.rand_like(p) for p in params]
    for p in params:
        p.grad = None
    trainer._apply_pull()
    penalty = 0.37 * sum((f * (p - r) ** 2).sum() for p, r, f in zip(params, trainer.reference, trainer.fisher))
    want = torch.autograd.grad(penalty, params)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=0, atol=1e-6)


def test_training_applies_the_pull_once_per_step(tmp_path):
    ewc = _trainer(tmp_path / "a", ewc_lambda=50.0)
    ewc.train()
    sft = BaseTrainer(model=_model(), args=_args(tmp_path / "b", cls=BaseArguments), train_dataset=_data(8, 10, 1),
                     data_collator=_collate)
    sft.train()
    zero = _trainer(tmp_path / "c", ewc_lambda=0.0)
    zero.train()
    w = lambda t: torch.cat([p.detach().flatten() for p in t.model.parameters()])  # noqa: E731
    assert torch.equal(w(zero), w(sft))  # λ = 0 is SFT
    assert not torch.allclose(w(ewc), w(sft))
    # the pull moves the weights back toward w0 where the Fisher is large
    w0 = torch.cat([r.flatten() for r in ewc.reference])
    assert (w(ewc) - w0).norm() < (w(sft) - w0).norm()


def test_bad_lambda_and_missing_fisher_data(tmp_path):
    with pytest.raises(LisaError, match="ewc_lambda=-1"):
        _args(tmp_path, ewc_lambda=-1)
    with pytest.raises(LisaError, match="fisher_dataset"):
        EWCTrainer(model=_model(), args=_args(tmp_path), train_dataset=_data(4, 10, 1), data_collator=_collate)


def test_resume_restores_the_start_weights_and_fisher(tmp_path):
    """An EWC run stopped after a checkpoint and resumed pulls toward the start-of-fine-tuning w0 with
    the Fisher measured there (saved in the checkpoint), not toward the weights at the resume step."""
    from transformers import TrainerCallback

    kw = dict(ewc_lambda=50.0, num_train_epochs=4, optim="adamw_torch", save_strategy="steps", save_steps=3)

    def trainer(out, callbacks=()):
        t = EWCTrainer(model=_model(), args=_args(out, **kw), train_dataset=_data(8, 10, 1),
                       fisher_dataset=_data(8, 25, 2), data_collator=_collate, callbacks=list(callbacks))
        return t

    straight = trainer(tmp_path / "straight")
    straight.train()

    class StopAfter3(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    first = trainer(tmp_path / "resumed", [StopAfter3()])
    first.train()
    assert first.state.global_step == 3
    second = trainer(tmp_path / "resumed")
    second.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    assert all(torch.equal(a, b) for a, b in zip(second.reference, straight.reference))
    assert all(torch.equal(a, b) for a, b in zip(second.fisher, straight.fisher))
    final = [p.detach() for p in second.model.parameters()]
    assert max(float((a - b).abs().max()) for a, b in zip(final, straight.model.parameters())) <= 1e-6


@pytest.mark.parametrize("ga", [1, 2])
def test_pull_in_the_loss_equals_the_fused_gradient(tmp_path, ga):
    """The loss mode (DeepSpeed keeps gradients in its own buffers, so an addition to .grad would be
    lost) trains the same weights as the fused gradient mode, with and without accumulation."""
    def run(mode):
        t = _trainer(tmp_path / f"{mode}{ga}", ewc_lambda=2e4, ewc_mode=mode, gradient_accumulation_steps=ga,
                     per_device_train_batch_size=4 // ga, num_train_epochs=2)
        t.train()
        return t

    grad, loss, plain = run("grad"), run("loss"), _trainer(tmp_path / f"plain{ga}", ewc_lambda=0.0,
                                                           gradient_accumulation_steps=ga,
                                                           per_device_train_batch_size=4 // ga, num_train_epochs=2)
    plain.train()
    assert not grad.pull_in_loss and loss.pull_in_loss
    diff = lambda a, b: max((x - y).abs().max().item() for x, y in zip(a._trainable(), b._trainable()))  # noqa: E731
    assert diff(grad, plain) > 1e-3  # the pull changed the result
    assert diff(grad, loss) < 1e-5


def test_deepspeed_puts_the_pull_in_the_loss_and_zero3_is_refused(tmp_path, monkeypatch):
    stage = {"value": 2}
    monkeypatch.setattr(EWCTrainer, "deepspeed_zero_stage", lambda self: stage["value"])
    assert _trainer(tmp_path).pull_in_loss  # auto under DeepSpeed: the loss
    assert not _trainer(tmp_path, ewc_mode="grad").pull_in_loss
    stage["value"] = 3
    with pytest.raises(LisaError, match="EWC does not support DeepSpeed ZeRO-3"):
        _trainer(tmp_path)
    with pytest.raises(LisaError, match="ewc_mode='sum'"):
        _args(tmp_path, ewc_mode="sum")


def test_the_references_fisher_is_the_sum_in_train_mode(tmp_path):
    """fisher_reduction: sum (the reference sums the squared batch gradients) and fisher_mode: train (it
    measures with dropout on): twice the mean over the two batches here, and the model in train mode."""
    mean = _trainer(tmp_path / "m").compute_fisher()
    trainer = _trainer(tmp_path / "s", fisher_reduction="sum", fisher_mode="train")
    modes = []
    trainer.model.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    total = trainer.compute_fisher()
    assert modes and all(modes)  # measured in train mode (the tiny model has no dropout: same gradients)
    for s, m in zip(total, mean):
        torch.testing.assert_close(s, 2 * m, rtol=1e-5, atol=1e-12)
    with pytest.raises(LisaError, match="fisher_reduction='max'"):
        _args(tmp_path, fisher_reduction="max")


def test_lora_a_has_fisher_only_under_a_continued_adapter(tmp_path):
    """At a fresh LoRA, lora_B = 0, so no gradient reaches lora_A and its Fisher is exactly 0 (the pull
    then acts on lora_B alone); the continued alignment LoRA (B trained, non-zero) gives lora_A a Fisher."""
    from lisa_align.config import LoraSettings
    from lisa_align.models.lora import attach_lora

    def fisher_of_lora_a(model):
        trainer = EWCTrainer(model=model, args=_args(tmp_path, fisher_reduction="sum", fisher_mode="train"),
                             train_dataset=_data(8, 10, 1), fisher_dataset=_data(8, 25, 2), data_collator=_collate)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return [f for n, f in zip(names, trainer.compute_fisher()) if "lora_A" in n]

    lora = LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    fresh = attach_lora(_model(), lora)
    assert all(float(f.abs().max()) == 0.0 for f in fisher_of_lora_a(fresh))
    continued = attach_lora(_model(), lora)
    with torch.no_grad():
        for n, p in continued.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))  # as an alignment LoRA after training
    assert all(float(f.abs().max()) > 0 for f in fisher_of_lora_a(continued))


def test_ewc_under_fsdp_is_refused_in_one_line(tmp_path, monkeypatch):
    """accelerate runs no FSDP on the CPU, so EWC on sharded parameters has never run here: refused."""
    from transformers import Trainer

    def fsdp_accelerator(self):
        Trainer.create_accelerator_and_postprocess(self)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(EWCTrainer, "create_accelerator_and_postprocess", fsdp_accelerator)
    with pytest.raises(LisaError, match="EWC does not support FSDP") as err:
        _trainer(tmp_path)
    assert "\n" not in str(err.value)


def _restore_sharded(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group: w0/Fisher restored into DTensor shards (Shard(0)) from each
    rank's saved local shard, as BaseTrainer._save_checkpoint writes them under FSDP2."""
    import os

    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from lisa_align.training.callbacks import local_shard
    from lisa_align.training.state import restore_like

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        g = torch.Generator().manual_seed(0)
        params = [distribute_tensor(torch.randn(6, 3, generator=g), mesh, [Shard(0)]) for _ in range(2)]
        saved_full = [torch.randn(6, 3, generator=g) for _ in range(2)]  # the same on every rank
        saved = {f"fisher.{i}": local_shard(distribute_tensor(t, mesh, [Shard(0)])).clone()
                 for i, t in enumerate(saved_full)}
        restored = restore_like(params, saved, "fisher")
        ok = all(type(r) is type(p) and r.placements == p.placements and torch.equal(r.full_tensor(), t)
                 for r, p, t in zip(restored, params, saved_full))
        torch.save(ok, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_restore_fills_each_ranks_shard_of_a_dtensor(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free port for the group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_restore_sharded, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)] == [True, True]


def test_restore_of_another_shape_is_one_line():
    from lisa_align.training.state import restore_like

    params = [torch.zeros(4, 2)]
    assert torch.equal(restore_like(params, {"reference.0": torch.ones(4, 2)}, "reference")[0], torch.ones(4, 2))
    with pytest.raises(LisaError, match=r"shape \(2, 2\) for reference.0, this run's shard has shape \(4, 2\)"):
        restore_like(params, {"reference.0": torch.ones(2, 2)}, "reference")
    with pytest.raises(LisaError, match="holds none for fisher.0"):
        restore_like(params, {}, "fisher")
