"""Grid sweeps: expand ``key=v1,v2`` axes into runs (run in sequence by ``pipeline.run_sweep``) or a Slurm array.

Axis keys are dotted config paths, or the short names ``method``, ``p``, ``n``, ``rho``, ``k1``,
``k2``, ``seed``. Every run is a normal ``lisa run`` with its own run folder under the sweep's
folder (``<output_dir>/<name>/<axis values>``). Locally, runs that share the seed, the model, the
alignment settings and the data the alignment defense reads share one aligned model
(``_aligned/<hash>``, :func:`aligned_key`), and finished runs are skipped. With ``--launcher
slurm`` the sweep writes one config per run and an sbatch array script (resources from the config's
``slurm`` section), then submits it or prints the command; array tasks run concurrently, so each
aligns in its own folder.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

from lisa_align.config import apply_overrides, config_to_dict, read_config_file, validate_config
from lisa_align.defenses import DEFENSES
from lisa_align.errors import LisaError
from lisa_align.io import atomic_write_text, atomic_write_yaml
from lisa_align.rundir import SHARED_ALIGNED_DIR

ALIASES = {"method": "finetune.methods", "p": "data.p", "n": "data.n", "rho": "finetune.lisa.rho",
           "k1": "finetune.lisa.k1", "k2": "finetune.lisa.k2", "seed": "seed"}


def parse_grid(items: list[str]) -> list[tuple[str, list]]:
    axes = []
    for item in items:
        if "=" not in item:
            raise LisaError(f"grid axis '{item}' must look like key=v1,v2 (e.g. p=0,0.1,0.2)")
        key, values = item.split("=", 1)
        try:
            vals = [yaml.safe_load(v) for v in values.split(",") if v.strip() != ""]
        except yaml.YAMLError:
            raise LisaError(f"grid axis '{key}': values are plain scalars separated by commas (got '{values}'); "
                            "to vary several method settings together, list labelled methods in "
                            "finetune.methods instead") from None
        if not vals:
            raise LisaError(f"grid axis '{key}' has no values")
        axes.append((key.strip(), vals))
    return axes


def expand(axes: list[tuple[str, list]]) -> list[tuple[str, list[str]]]:
    """(run name, overrides) for every combination of the axes."""
    runs = []
    for combo in itertools.product(*[vals for _, vals in axes]):
        name = ",".join(f"{key}={val}" for (key, _), val in zip(axes, combo))
        overrides = []
        for (key, _), val in zip(axes, combo):
            path = ALIASES.get(key, key)
            overrides.append(f"{path}={json.dumps([val]) if key == 'method' else json.dumps(val)}")
        runs.append((name, overrides))
    return runs


# The config paths of each data role, for the aligned-model key of a defense that reads that role.
ROLE_KEYS = {"alignment": ("data.alignment",), "harmful": ("data.harmful",),
             "user": ("data.user", "data.harmful", "data.n", "data.p")}


def _at(raw: dict, dotted: str):
    node = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def aligned_key(raw: dict) -> str:
    """The key of the aligned model a run would train: runs with the same key share it. It holds the
    seed, the model, the align section, ``data.max_length`` and ``data.alignment``, and the config
    paths of the data roles the alignment defense reads beyond them (``Defense.needs``: harmful rows
    for a defense that trains against them) and of its ``Defense.align_key``."""
    method = _at(raw, "align.method")
    name = method.get("name") if isinstance(method, dict) else method
    defense = DEFENSES.get(str(name))
    paths = ["seed", "model", "align", "data.alignment", "data.max_length"]
    if defense is not None:
        paths += [k for role in defense.needs for k in ROLE_KEYS[role]] + list(defense.align_key)
    part = {k: _at(raw, k) for k in dict.fromkeys(paths)}
    # The keys of earlier releases, unchanged for the same settings (a sweep resumes where it stopped):
    # the data paths under their old names, and sft/vaccine as they were spelled (method + vaccine_rho).
    part["alignment"], part["max_length"] = part.pop("data.alignment"), part.pop("data.max_length")
    align = part.get("align")
    if isinstance(align, dict) and isinstance(align.get("method"), dict) and set(
            k for k, v in align["method"].items() if v is not None) <= {"name", "rho"}:
        part["align"] = {**align, "method": align["method"]["name"], "vaccine_rho": align["method"].get("rho", 2.0)}
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:12]


def plan(config_path: str, grid: list[str], extra: list[str] | None = None, *, share_aligned: bool = True):
    """Resolved run configs (dicts) of a sweep, and the sweep folder."""
    p = Path(config_path)
    base = apply_overrides(read_config_file(p), list(extra or []))
    root_cfg = validate_config(base, str(p))
    root = root_cfg.run_dir
    axes = parse_grid(grid) if grid else list(root_cfg.sweep.grid.items())
    if not axes:
        raise LisaError(f"{p}: no grid: pass --grid key=v1,v2 ... or add sweep: {{grid: {{p: [0, 0.1]}}}} "
                        "to the config")
    runs = []
    for name, overrides in expand(axes):
        raw = apply_overrides(json.loads(json.dumps(base)), overrides + [f"output_dir={root}", f"name={name}"])
        cfg = config_to_dict(validate_config(raw, f"{p} [{name}]"))
        if share_aligned and cfg["align"]["enabled"] and not cfg["align"].get("output_dir"):
            cfg["align"]["output_dir"] = str(root / SHARED_ALIGNED_DIR / aligned_key(cfg))
        runs.append(cfg)
    return root, runs


def write_slurm(root: Path, runs: list[dict]) -> Path:
    cfg_dir = root / "configs"
    paths = []
    for raw in runs:
        path = cfg_dir / f"{raw['name']}.yaml"
        atomic_write_yaml(path, raw)
        paths.append(path.resolve())
    s = validate_config(runs[0]).slurm
    lisa = shutil.which("lisa") or "lisa"
    lines = ["#!/bin/bash", f"#SBATCH --job-name=lisa-{root.name}", f"#SBATCH --array=0-{len(runs) - 1}",
             f"#SBATCH --gres=gpu:{s.gpus}", f"#SBATCH --cpus-per-task={s.cpus}", f"#SBATCH --mem={s.mem}",
             f"#SBATCH --time={s.time}", f"#SBATCH --output={root.resolve()}/slurm-%A_%a.out"]
    if s.partition:
        lines.append(f"#SBATCH --partition={s.partition}")
    lines += ["set -euo pipefail", "CONFIGS=(", *[f"  {shlex.quote(str(p))}" for p in paths], ")",
              f'exec {shlex.quote(lisa)} run "${{CONFIGS[$SLURM_ARRAY_TASK_ID]}}"', ""]
    script = root / "sweep.sbatch"
    atomic_write_text(script, "\n".join(lines))
    return script


def submit(script: Path) -> str:
    if shutil.which("sbatch") is None:
        raise LisaError("sbatch is not on PATH: run this on a Slurm login node, or drop --submit and "
                        f"run `sbatch {script}` there")
    out = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        raise LisaError(f"sbatch failed: {(out.stderr or out.stdout).strip().splitlines()[0][:200]}")
    return out.stdout.strip()
