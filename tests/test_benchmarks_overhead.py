"""benchmarks/overhead.py on a micro Llama for a few steps: the JSON line, the anchor is exactly one copy
of the trainable weights (LoRA and full), and Lisa's extra peak memory is that copy, not two: the CPU
meter counts live tensor bytes, the same every run, and fails a Lisa that holds a second copy."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
KEYS = ["lora_time_ratio", "full_time_ratio", "lora_extra_mem_bytes", "lora_trainable_bytes"]


@pytest.fixture(scope="module")
def overhead():
    import sys

    spec = importlib.util.spec_from_file_location("overhead_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)
    for name in [n for n in sys.modules if n.startswith("overhead_")]:  # its parts, imported from benchmarks/
        sys.modules.pop(name)
    if str(SCRIPT.parent) in sys.path:
        sys.path.remove(str(SCRIPT.parent))


@pytest.fixture(scope="module")
def result(overhead):
    from contextlib import redirect_stdout
    from io import StringIO

    out = StringIO()
    with redirect_stdout(out):
        rc = overhead.main(["--model-size", "micro", "--no-tiny", "--steps", "3", "--warmup", "1", "--threads", "0"])
    assert rc == 0
    return out.getvalue()


def test_last_line_is_the_json_with_the_keys_first(result):
    lines = result.strip().splitlines()
    summary = json.loads(lines[-1])
    assert list(summary)[:4] == KEYS
    for key in ("lora_time_ratio", "full_time_ratio"):
        assert math.isfinite(summary[key]) and summary[key] > 0
    assert summary["config"] == "micro" and summary["lora_measured_steps"] == summary["full_measured_steps"] == 3
    assert any(line.startswith("micro") and "lora" in line for line in lines)  # the table


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_anchor_is_exactly_one_copy_of_the_trainable_weights(result, mode):
    summary = json.loads(result.strip().splitlines()[-1])
    row = next(r for r in summary["rows"] if r["mode"] == mode)
    assert row["anchor_bytes"] == row["trainable_bytes"] == summary[f"{mode}_trainable_bytes"] > 0
    assert summary[f"{mode}_anchor_bytes"] == row["anchor_bytes"]
    assert row["mem_child_anchor_bytes"] == row["anchor_bytes"]  # the memory child's Lisa held the same
    if mode == "lora":
        assert row["trainable_params"] < row["params"]
    else:
        assert row["trainable_params"] == row["params"]
    # Lisa's extra peak is one copy of the trainable weights, not two (the CPU meter always counts tensors)
    extra = summary[f"{mode}_extra_mem_bytes"]
    assert row["mem_meter"] == summary["mem_meter"] and row["mem_meter"].startswith("peak live tensor bytes")
    assert row["anchor_bytes"] <= extra < 2 * row["anchor_bytes"]
    # every measured step of both methods was timed, and the parts were attributed
    assert row["measured_steps"] == 3 and row["switch_steps_measured"]
    a = row["attribution_ms"]
    assert a["proximal_ms"] > 0 and a["switch_ms"] > 0 and a["switch_calls"] == 3


def test_lisa_schedule_puts_switches_after_the_warmup(overhead):
    from lisa_align.training.schedule import BiStateSchedule

    for warmup, measured in ((2, 30), (2, 10), (5, 40), (1, 3)):
        total = warmup + measured
        k1, k2 = overhead.lisa_k(total, warmup)
        sched = BiStateSchedule(k1, k2, total)
        states = set(sched.states[warmup:])
        assert states == {"alignment", "finetune"}
        assert any(s >= warmup for s in sched.switch_steps())


def test_tensor_meter_counts_new_storages_until_freed(overhead):
    import torch
    from overhead_memory import LiveTensorMeter

    x = torch.ones(1000)  # made before: not counted, nor are its views or in-place changes
    with LiveTensorMeter() as meter:
        x.view(10, 100).add_(1)
        a = x * 2  # 4000 bytes
        b = a[10:].clone()  # 3960 bytes
        assert meter.current == 7960
        del a
        v = b.view(-1)
        del b
        assert meter.current == 3960  # the view keeps b's storage
        del v
        assert meter.current == 0
        c = torch.empty(0)
        torch.add(x, 1, out=c)  # resized to 4000 bytes by an out= op
        assert meter.current == 4000
    assert meter.peak == 7960


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_memory_claim_fails_for_a_lisa_holding_two_copies(overhead, mode):
    """The same measurement as the children's, in this process: repeatable to the byte, one copy for
    Lisa, and a mutant Lisa that keeps a second copy of the trainable weights is caught."""
    from overhead_memory import memory_spec
    from overhead_models import training_api

    spec = next(s for s in overhead.build_specs(overhead.parse_args(
        ["--model-size", "micro", "--no-tiny", "--steps", "3", "--warmup", "1"])) if s.mode == mode)
    spec = memory_spec(spec)
    lisa_cls = training_api()[2]

    class TwoCopies(lisa_cls):
        def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
            if not hasattr(self, "spare"):
                self.spare = [p.detach().clone() for p in self.model.parameters() if p.requires_grad]
            return super().training_step(model, inputs, num_items_in_batch, **kwargs)

    sft = overhead.measure_memory(spec, "sft")["peak_bytes"]
    lisa = overhead.measure_memory(spec, "lisa")
    anchor = lisa["anchor_bytes"]
    assert overhead.measure_memory(spec, "lisa")["peak_bytes"] == lisa["peak_bytes"]  # deterministic
    assert anchor > 0 and anchor <= lisa["peak_bytes"] - sft < 2 * anchor
    mutant = overhead.measure_memory(spec, "lisa", classes={"lisa": TwoCopies})["peak_bytes"] - sft
    assert mutant >= 2 * anchor
