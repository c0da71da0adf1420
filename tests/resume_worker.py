"""`lisa run CONFIG` that kills itself (SIGKILL, no cleanup) right after the Trainer saved checkpoint
STEP of the fine-tuning stage of METHOD; run by tests/test_resume.py.

    python tests/resume_worker.py CONFIG [METHOD STEP]
"""

from __future__ import annotations

import os
import signal
import sys

import torch


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    from lisa_align.cli import main as lisa_main
    from lisa_align.training.base import BaseTrainer

    if len(argv) == 3:
        method, step = argv[1], int(argv[2])
        save = BaseTrainer._save_checkpoint

        def save_then_die(self, model, trial):
            save(self, model, trial)
            if self.state.global_step == step and self.args.output_dir.endswith(f"finetune/{method}/trainer"):
                os.kill(os.getpid(), signal.SIGKILL)

        BaseTrainer._save_checkpoint = save_then_die
    return lisa_main(["run", argv[0]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
