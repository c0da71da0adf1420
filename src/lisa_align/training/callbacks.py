"""Trainer callbacks: structured logs (one JSON object per line) for every logged event."""

from __future__ import annotations

import time

from transformers import TrainerCallback

from lisa_align.io import append_jsonl


class JsonlLogCallback(TrainerCallback):
    """Appends each ``on_log`` record (loss, lr, Lisa switch records, ...) to a ``log.jsonl``."""

    def __init__(self, path, **extra):
        self.path = path
        self.extra = extra
        self.t0 = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_jsonl(self.path, {**self.extra, "step": state.global_step, "time": round(time.time() - self.t0, 3), **logs})
