"""benchmarks/overhead.py on a micro Llama for a few steps: the JSON line, the anchor is exactly one copy
of the trainable weights (LoRA and full), and Lisa's extra peak memory is that copy, not two."""

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
    # Lisa's extra peak is one copy of the trainable weights, not two (exact with the tensor meter)
    extra = summary[f"{mode}_extra_mem_bytes"]
    if "profiler" in row["mem_meter"]:
        assert row["anchor_bytes"] <= extra < 2 * row["anchor_bytes"]
    # every measured step of both methods was timed, and the parts were attributed
    assert row["measured_steps"] == 3 and row["switch_steps_measured"]
    assert row["attribution_ms"]["proximal_ms"] > 0


def test_lisa_schedule_puts_switches_after_the_warmup(overhead):
    from lisa_align.training.schedule import BiStateSchedule

    for warmup, measured in ((2, 30), (2, 10), (5, 40), (1, 3)):
        total = warmup + measured
        k1, k2 = overhead.lisa_k(total, warmup)
        sched = BiStateSchedule(k1, k2, total)
        states = set(sched.states[warmup:])
        assert states == {"alignment", "finetune"}
        assert any(s >= warmup for s in sched.switch_steps())
