"""One Lisa fine-tune on a micro model, run by tests/test_ddp.py under `accelerate launch` (2 CPU
processes, gloo) and as one process with the same global batch (gradient accumulation).

    python tests/ddp_worker.py OUT_DIR --grad-accum 2            # 1 process, global batch 2 x 4
    accelerate launch --multi_gpu --num_processes 2 tests/ddp_worker.py OUT_DIR --grad-accum 1

Rank 0 writes OUT_DIR/final.safetensors (the trainable weights), OUT_DIR/anchor.safetensors and
OUT_DIR/lisa.json (switch steps, states); every rank writes OUT_DIR/rank<r>.json (its schedule,
switch log and the row indices it trained on, per step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--method", choices=["lisa", "sft"], default="lisa")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    from safetensors.torch import save_file
    from transformers import set_seed

    from lisa_align.config import LoraSettings, StageSettings
    from lisa_align.data.formats import format_rows
    from lisa_align.data.synthetic import generate
    from lisa_align.defenses import SFT, Lisa
    from lisa_align.models.tiny import build_tokenizer
    from lisa_align.training.run import train_stage

    from conftest import tiny_llama  # sys.path[0] is this script's folder, tests/

    set_seed(0)
    tok = build_tokenizer(0)
    model = tiny_llama(len(tok), seed=None, hidden_size=32, intermediate_size=64, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    user = format_rows(list(generate("sst2", "train", seed=0, size=64))[:24], "sst2", "sst2")
    align = format_rows([r for r in generate("beavertails", "30k_train", seed=0, size=80) if r["is_safe"]][:16],
                        "beavertails", "beavertails")
    stage = StageSettings(lr=1e-2, epochs=3, batch_size=4, grad_accum=args.grad_accum, scheduler="linear",
                          warmup_ratio=0.0, weight_decay=0.0, logging_steps=1, loss_reduction="example",
                          lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    lisa = Lisa(k1=1, k2=2, rho=5.0, proximal_warmup_ratio=0.0) if args.method == "lisa" else None
    out = Path(args.out)
    trained = {}

    from lisa_align.training import base as base_mod
    from lisa_align.training import lisa as lisa_mod

    base = lisa_mod.LisaTrainer if lisa else base_mod.BaseTrainer
    orig_step = base.training_step

    def recording_step(self, model, inputs, *a, **k):  # which rows each rank trains on, per step
        mask = inputs["attention_mask"].bool()
        rows = [ids[m].tolist() for ids, m in zip(inputs["input_ids"], mask)]
        trained.setdefault(self.state.global_step, []).extend(rows)
        return orig_step(self, model, inputs, *a, **k)

    base.training_step = recording_step
    model, trainer = train_stage(model, tok, user, stage, out / "trainer", seed=0, max_length=128,
                                 defense=lisa or SFT(), data={"alignment": align}, use_cpu=True, resume=False,
                                 save_checkpoints=False)
    rank = trainer.args.process_index
    info = {"world_size": trainer.args.world_size, "max_steps": trainer.state.max_steps, "trained": trained}
    if lisa:
        info["switch_steps"] = [r["lisa/step"] for r in trainer.switch_log]
        info["states"] = [trainer.schedule.state(s) for s in range(trainer.state.max_steps)]
        info["drift"] = [r["lisa/drift"] for r in trainer.switch_log]
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    if rank == 0:
        params = {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}
        save_file(params, str(out / "final.safetensors"))
        if lisa:
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            save_file({n: a.contiguous() for n, a in zip(names, trainer.anchor)}, str(out / "anchor.safetensors"))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
