"""Kill and resume: a `lisa run` killed with SIGKILL right after a mid-run checkpoint (for Lisa,
between two switches) and run again resumes from that checkpoint and ends with the same weights as
an uninterrupted run (max abs diff <= 1e-6, CPU determinism on); finished stages are not redone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("resume_worker.py")


def _run(tmp_path: Path, config: Path, *kill: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "LISA_ALIGN_CACHE": str(tmp_path / "cache"), "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(WORKER), str(config), *kill], env=env, capture_output=True,
                          text=True, timeout=600)


def _config(micro_config, tmp_path: Path, name: str) -> Path:
    cfg = micro_config(tmp_path, name=name, use_cpu=True,
                       **{"finetune.methods": ["sft", "lisa"], "eval.models": ["methods"]})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro_config):
    tmp = tmp_path_factory.mktemp("resume")
    ref = _run(tmp, _config(micro_config, tmp, "straight"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    cfg = _config(micro_config, tmp, "killed")
    first = _run(tmp, cfg, "sft", "6")  # killed in SFT, after checkpoint-6 of 12 steps
    second = _run(tmp, cfg, "lisa", "3")  # resumes SFT; killed in Lisa after checkpoint-3 (switches at 2, 6, 8)
    third = _run(tmp, cfg)  # resumes Lisa, evaluates
    return tmp / "runs", (first, second, third)


def _weights(run: Path, method: str) -> dict[str, torch.Tensor]:
    return load_file(run / "finetune" / method / "adapter" / "model.safetensors")


def test_the_kills_happened_where_intended(runs):
    root, (first, second, third) = runs
    assert first.returncode == -signal.SIGKILL and second.returncode == -signal.SIGKILL
    assert third.returncode == 0, third.stderr[-3000:]
    events = [json.loads(x) for x in (root / "killed" / "log.jsonl").read_text().splitlines() if x.strip()]
    resumed = [(e["stage"], Path(e["checkpoint"]).name) for e in events if e.get("event") == "resume"]
    assert resumed == [("finetune/sft", "checkpoint-6"), ("finetune/lisa", "checkpoint-3")]
    aligned = [e for e in events if e.get("event") == "stage_done" and e["stage"] == "align"]
    assert len(aligned) == 1  # the finished align stage was not redone


@pytest.mark.parametrize("method", ["sft", "lisa"])
def test_resumed_weights_equal_the_uninterrupted_run(runs, method):
    root, _ = runs
    a, b = _weights(root / "straight", method), _weights(root / "killed", method)
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_lisa_state_survives_the_kill(runs):
    root, _ = runs
    ref = json.loads((root / "straight" / "finetune" / "lisa" / "lisa_switches.json").read_text())
    got = json.loads((root / "killed" / "finetune" / "lisa" / "lisa_switches.json").read_text())
    assert [r["lisa/step"] for r in got] == [r["lisa/step"] for r in ref] == [2, 6, 8]
    # the drift at switch 6 is measured against the anchor of step 2, restored from the checkpoint
    assert [r["lisa/drift"] for r in got] == pytest.approx([r["lisa/drift"] for r in ref], abs=1e-6)
    assert json.loads((root / "killed" / "summary.json").read_text()) == \
        json.loads((root / "straight" / "summary.json").read_text())


def test_a_killed_evaluation_resumes_from_the_answers_it_appended(tmp_path):
    """Answers are appended per batch; a re-run generates only the missing ones, and the final files
    equal an uninterrupted evaluation's. A stale partial file (other prompts) is not trusted."""
    from lisa_align.evaluation.evaluate import evaluate_model, partial_path
    from lisa_align.evaluation.judges import RefusalJudge

    rows = [{"instruction": f"request number {i} " + "x " * (i % 5), "category": "self_harm"} for i in range(10)]
    seen: list[list[str]] = []

    class Dies(Exception):
        pass

    def generator(prompts, *, max_new_tokens, desc, die_after=None):
        seen.append(list(prompts))
        if die_after is not None and len(seen) > die_after:
            raise Dies
        return ["sorry" if "1" in p.split("Instruction:")[1] else "sure" for p in prompts]

    straight = evaluate_model(None, None, out_dir=tmp_path / "a", judge=RefusalJudge(), harmful_rows=rows,
                              batch_size=3, generator=generator)
    assert len(seen) == 4  # 10 prompts in batches of 3
    seen.clear()
    with pytest.raises(Dies):  # killed while generating the third batch
        evaluate_model(None, None, out_dir=tmp_path / "b", judge=RefusalJudge(), harmful_rows=rows, batch_size=3,
                       generator=lambda p, **k: generator(p, **k, die_after=2))
    part = partial_path(tmp_path / "b" / "predictions", "harmful")
    assert len(part.read_text().splitlines()) == 6 and not (tmp_path / "b" / "metrics.json").exists()
    with part.open("a") as f:
        f.write('{"i": 9, "prompt": "torn')  # a kill mid-write leaves a torn last line
    seen.clear()
    resumed = evaluate_model(None, None, out_dir=tmp_path / "b", judge=RefusalJudge(), harmful_rows=rows,
                             batch_size=3, generator=generator)
    assert sum(len(s) for s in seen) == 4  # only the 4 missing answers were generated
    assert resumed == straight
    for name in ("harmful.jsonl",):
        assert (tmp_path / "b" / "predictions" / name).read_text() == (tmp_path / "a" / "predictions" / name).read_text()
    assert not part.exists()  # folded into the final file
    # a partial file of other prompts is ignored
    part.write_text(json.dumps({"i": 0, "prompt": "another prompt", "max_new_tokens": 512, "answer": "sure"}) + "\n")
    seen.clear()
    evaluate_model(None, None, out_dir=tmp_path / "b", judge=RefusalJudge(), harmful_rows=rows, batch_size=3,
                   generator=generator)
    assert sum(len(s) for s in seen) == 10
