"""Runs that never race (lisa_align.locks): concurrent `lisa run` processes that share a tiny-base cache
and an aligned model (align.output_dir) build each once, the others wait and reuse it; a second run on a
run folder in use fails at once naming the holder; a lock left by a SIGKILLed holder is taken over.

The processes are synchronised through files, not sleeps: a hooked `lisa run` (HOOK) stops inside a lock
(before training the tiny base, before aligning, or right after an alignment checkpoint) until the test
lets it go, and the test waits for the other run's "waiting for" line before it does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT = 240  # seconds for any one wait: generous (2 busy cores), never reached when things work

# `python -c HOOK SYNC_DIR POINTS CONFIG`: `lisa run CONFIG` that holds at each of POINTS (comma-separated:
# base, align, kill-align), writing SYNC_DIR/<point>.holding and going on once SYNC_DIR/<point>.go exists;
# at kill-align (after alignment checkpoint-1 was saved) it then kills itself with SIGKILL.
HOOK = r"""
import os, signal, sys, time
from pathlib import Path
sync, points, config = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]

def hold(point):
    (sync / f"{point}.holding").write_text(str(os.getpid()))
    deadline = time.time() + 300
    while not (sync / f"{point}.go").exists():
        if time.time() > deadline:
            sys.exit(f"hook: never let go at {point}")
        time.sleep(0.02)

import lisa_align.pipeline as P
import lisa_align.training.tiny_base as T
from lisa_align.training.base import BaseTrainer

def holding(train, point, tag):
    def wrapped(*a, **k):
        if point in points and k.get("log_tag", "train") == tag:
            hold(point)
        return train(*a, **k)
    return wrapped

T.train_stage = holding(T.train_stage, "base", "train")
P.train_stage = holding(P.train_stage, "align", "align")
save = BaseTrainer._save_checkpoint

def save_then_die(self, model, trial):
    save(self, model, trial)
    if "kill-align" in points and str(self.args.output_dir).endswith(".trainer") and self.state.global_step == 1:
        hold("kill-align")
        os.kill(os.getpid(), signal.SIGKILL)

BaseTrainer._save_checkpoint = save_then_die
from lisa_align.cli import main
sys.exit(main(["run", config]))
"""


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            "LISA_ALIGN_CACHE": str(tmp_path / "cache"),
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def _config(micro_config, tmp_path: Path, name: str, **changes) -> Path:
    cfg = micro_config(tmp_path, name=name, use_cpu=True, **{
        "finetune.methods": ["sft"], "eval.models": ["aligned", "methods"],
        "align.output_dir": str(tmp_path / "shared" / "aligned"), **changes})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(tmp_path: Path, name: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
    """A process whose stdout and stderr go to tmp_path/<name>.out (read while it runs)."""
    out = tmp_path / f"{name}.out"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, *argv], env=_env(tmp_path), stdout=f, stderr=subprocess.STDOUT,
                                cwd=tmp_path)
    return proc, out


def _lisa_run(tmp_path: Path, name: str, config: Path, hold: str | None = None):
    argv = ["-c", HOOK, str(tmp_path / "sync"), hold, str(config)] if hold else \
        ["-m", "lisa_align.cli", "run", str(config)]
    return _start(tmp_path, name, argv)


def _wait_for(what, describe: str, procs=()) -> None:
    """Poll ``what()`` until true; fail early when one of ``procs`` died instead."""
    deadline = time.monotonic() + TIMEOUT
    while not what():
        for proc, out in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{describe}: {out.name} exited ({proc.returncode}):\n{out.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {describe}"
        time.sleep(0.05)


def _let_go(tmp_path: Path, point: str) -> None:
    (tmp_path / "sync" / f"{point}.go").touch()


def _holding(tmp_path: Path, point: str):
    return lambda: (tmp_path / "sync" / f"{point}.holding").exists()


def _says(out: Path, text: str):
    return lambda: text in out.read_text()


def _finish(proc: subprocess.Popen, out: Path) -> str:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{out.name} did not finish:\n{out.read_text()[-3000:]}") from None
    return out.read_text()


def _events(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]


def _stages_done(run: Path) -> list[str]:
    return [e["stage"] for e in _events(run) if e.get("event") == "stage_done"]


def _waits(run: Path) -> list[str]:
    return [e["stage"] for e in _events(run) if e.get("event") == "wait"]


def _left_behind(root: Path) -> list[Path]:
    """Lock files and their .owner side files."""
    return sorted(p for p in root.rglob("*") if p.name.endswith((".lock", ".lock.owner")))


def test_concurrent_runs_build_the_base_and_the_alignment_once(micro_config, tmp_path):
    """Two runs, one fresh tiny-base cache, one shared aligned model: A builds the base and aligns while B
    waits for each and reuses them; a third `lisa run` on A's run folder, meanwhile, fails at once."""
    (tmp_path / "sync").mkdir()
    fresh = {"model.cache_dir": str(tmp_path / "base")}
    cfg_a, cfg_b = (_config(micro_config, tmp_path, n, **fresh) for n in ("a", "b"))
    a = _lisa_run(tmp_path, "a", cfg_a, hold="base,align")
    _wait_for(_holding(tmp_path, "base"), "A to hold the tiny base's lock", [a])
    b = _lisa_run(tmp_path, "b", cfg_b)
    c = _lisa_run(tmp_path, "c", cfg_a)  # A's own run folder, while A runs

    c_out = _finish(*c)
    assert c[0].returncode == 2, c_out
    lines = c_out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lisa: error: "), c_out
    assert f"pid {a[0].pid} on {socket.gethostname()}" in lines[0] and "in use" in lines[0], lines[0]

    _wait_for(_says(b[1], "[lisa] base: waiting for"), "B to wait for the tiny base", [a, b])
    _let_go(tmp_path, "base")
    _wait_for(_holding(tmp_path, "align"), "A to hold the aligned model's lock", [a, b])
    _wait_for(_says(b[1], "[lisa] align: waiting for"), "B to wait for the alignment", [a, b])
    _let_go(tmp_path, "align")
    out_a, out_b = _finish(*a), _finish(*b)
    assert a[0].returncode == 0, out_a[-3000:]
    assert b[0].returncode == 0, out_b[-3000:]

    run_a, run_b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    done_a, done_b = _stages_done(run_a), _stages_done(run_b)
    assert done_a.count("align") == 1 and "align" not in done_b  # aligned once, by A
    assert done_a.count("base (tiny, built and cached)") == 1 and not any(s.startswith("base") for s in done_b)
    assert _waits(run_a) == [] and _waits(run_b) == ["base", "align"]
    wait = next(e for e in _events(run_b) if e.get("event") == "wait" and e["stage"] == "align")
    assert wait["seconds"] > 0 and wait["holder"]["pid"] == a[0].pid
    assert len([p for p in (tmp_path / "base").iterdir() if not p.name.startswith(".")]) == 1  # one base
    summary = lambda run: json.loads((run / "summary.json").read_text())  # noqa: E731
    assert summary(run_a) == summary(run_b) and set(summary(run_a)) == {"aligned", "sft"}
    assert _left_behind(tmp_path) == []  # every lock file (and its .owner) is removed when let go


def test_a_killed_holder_is_taken_over(micro_config, tmp_path):
    """K aligns into the shared folder and is SIGKILLed right after alignment checkpoint-1, while W waits
    for the aligned model's lock: W takes it over at once, resumes K's half-trained work folder from
    that checkpoint and finishes. K's run folder lock (left behind by the kill) does not block a new run."""
    from lisa_align.locks import RunDirLock

    (tmp_path / "sync").mkdir()
    cfg_k, cfg_w = (_config(micro_config, tmp_path, n) for n in ("k", "w"))
    k = _lisa_run(tmp_path, "k", cfg_k, hold="kill-align")
    _wait_for(_holding(tmp_path, "kill-align"), "K to save alignment checkpoint-1", [k])
    w = _lisa_run(tmp_path, "w", cfg_w)
    _wait_for(_says(w[1], "[lisa] align: waiting for"), "W to wait for the alignment", [k, w])
    _let_go(tmp_path, "kill-align")
    _finish(*k)
    assert k[0].returncode == -signal.SIGKILL
    out_w = _finish(*w)
    assert w[0].returncode == 0, out_w[-3000:]

    run_k, run_w = tmp_path / "runs" / "k", tmp_path / "runs" / "w"
    assert _waits(run_w) == ["align"] and _stages_done(run_w).count("align") == 1
    resumed = [(e["stage"], Path(e["checkpoint"]).name) for e in _events(run_w) if e.get("event") == "resume"]
    assert resumed == [("align", "checkpoint-1")]  # K's work folder, continued
    shared = tmp_path / "shared"
    assert (shared / "aligned" / "config.json").is_file() and not (shared / ".aligned.trainer").exists()
    assert (run_w / "summary.json").is_file() and not (run_k / "summary.json").exists()
    assert (run_k / ".lock").exists()  # left by the kill, and free: the kernel let the flock go with K
    with RunDirLock(run_k):
        assert json.loads((run_k / ".lock.owner").read_text())["pid"] == os.getpid()
    assert _left_behind(tmp_path) == []
