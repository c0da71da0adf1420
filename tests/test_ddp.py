"""Lisa under `accelerate launch --num_processes 2` (CPU, gloo) equals one process with the same
global batch: the same schedule and switches on every rank, each rank its own share of both the
user and the alignment batches, and the same final weights and anchor (max abs diff <= 1e-5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(cmd: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
           "ACCELERATE_CONFIG_FILE": str(tmp_path / "no-accelerate-config.yaml")}  # ignore a user's default config
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    one, two = tmp / "one", tmp / "two"
    _run([sys.executable, str(WORKER), str(one), "--grad-accum", "2"], tmp)
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29571",
          str(WORKER), str(two), "--grad-accum", "1"], tmp)
    return one, two


def _info(path: Path) -> dict:
    return json.loads(path.read_text())


def test_two_processes_train_the_same_weights_as_one(runs):
    one, two = runs
    for name in ("final.safetensors", "anchor.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        assert set(a) == set(b) and any("lora_B" in k for k in a)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5, name
    final = load_file(one / "final.safetensors")
    assert all(float(v.abs().sum()) > 0 for k, v in final.items() if "lora_B" in k)  # it trained


def test_every_rank_has_the_same_lisa_state(runs):
    one, two = runs
    ref, r0, r1 = _info(one / "rank0.json"), _info(two / "rank0.json"), _info(two / "rank1.json")
    assert (ref["world_size"], r0["world_size"], r1["world_size"]) == (1, 2, 2)
    assert ref["max_steps"] == r0["max_steps"] == r1["max_steps"] == 9
    assert ref["switch_steps"] == r0["switch_steps"] == r1["switch_steps"] == [1, 3, 4, 6, 7]
    assert ref["states"] == r0["states"] == r1["states"]
    assert r0["drift"] == r1["drift"] and r0["drift"] == pytest.approx(ref["drift"], abs=1e-5)


def test_user_and_alignment_batches_are_sharded_per_rank(runs):
    one, two = runs
    ref, r0, r1 = _info(one / "rank0.json"), _info(two / "rank0.json"), _info(two / "rank1.json")
    for step in map(str, range(ref["max_steps"])):
        rows0 = Counter(map(tuple, r0["trained"][step]))
        rows1 = Counter(map(tuple, r1["trained"][step]))
        assert sum(rows0.values()) == sum(rows1.values()) == 4  # each rank: one batch of 4
        assert rows0 + rows1 == Counter(map(tuple, ref["trained"][step])), step  # together: the global batch
    # each rank's alignment steps draw from the alignment rows, its fine-tuning steps from the user rows
    for info in (r0, r1):
        by_state = {"alignment": set(), "finetune": set()}
        for step, rows in info["trained"].items():
            by_state[info["states"][int(step)]].update(map(tuple, rows))
        assert by_state["alignment"] and by_state["finetune"]
        assert not by_state["alignment"] & by_state["finetune"]


def test_lisa_run_under_accelerate_launch_equals_one_process(tmp_path, micro):
    """The whole pipeline, unchanged, on 2 processes: every process trains, the main one saves and
    evaluates once; the weights equal a 1-process run with the same global batch."""
    import yaml

    cache = tmp_path / "cache"
    paths = {}
    for name, ga in (("one", 2), ("two", 1)):
        cfg = micro(name=name, use_cpu=True, **{
            "finetune.methods": ["sft", "lisa", "ewc"], "eval.models": ["methods"], "align.batch_size": 4,
            "align.grad_accum": ga, "finetune.batch_size": 2, "finetune.grad_accum": ga,
            # a LoRA alignment: ewc (the reference's) fine-tunes that LoRA itself (finetune.adapter: continue)
            "align.lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}})
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))
    env_cache = {"LISA_ALIGN_CACHE": str(cache)}
    os.environ.update(env_cache)
    try:
        _run([sys.executable, "-m", "lisa_align.cli", "run", str(paths["one"])], tmp_path)
        _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              "29572", "-m", "lisa_align.cli", "run", str(paths["two"])], tmp_path)
    finally:
        os.environ.pop("LISA_ALIGN_CACHE")
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    for key, weights in (("sft", "model"), ("lisa", "model"), ("ewc", "adapter_model")):
        a = load_file(one / "finetune" / key / "adapter" / f"{weights}.safetensors")
        b = load_file(two / "finetune" / key / "adapter" / f"{weights}.safetensors")
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5, key
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert s1 == s2 and set(s2) == {"sft", "lisa", "ewc"}
    sw1, sw2 = (json.loads((r / "finetune" / "lisa" / "lisa_switches.json").read_text()) for r in (one, two))
    assert [x["lisa/step"] for x in sw1] == [x["lisa/step"] for x in sw2] != []
    events = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    done = [e["stage"] for e in events if e.get("event") == "stage_done"]
    assert done.count("finetune lisa") == 1 and done.count("evaluate sft") == 1  # written by one process


@pytest.mark.parametrize("name, kind", [("ddp.yaml", "MULTI_GPU"), ("fsdp2.yaml", "FSDP"),
                                        ("deepspeed-zero2.yaml", "DEEPSPEED")])
def test_shipped_accelerate_configs_load(name, kind):
    """accelerate's own loader reads each shipped launcher config (no unknown or misspelt keys)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(WORKER.parents[1] / "configs" / "accelerate" / name))
    assert cfg.distributed_type == kind
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 2
