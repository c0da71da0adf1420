"""Grid sweeps: expand ``key=v1,v2`` axes into runs (run in sequence by ``pipeline.run_sweep``) or a Slurm array.

Axis keys are dotted config paths, or the short names ``method``, ``p``, ``n``, ``rho``, ``k1``,
``k2``, ``seed``. A value is a scalar, or, for a config path, a mapping (a defense entry such as
``align.method: {name: t_vaccine, sampled_layers: 1}``, or a section such as ``finetune.lora``). An
axis whose key is not a config path (``variant``, ``defense``) is a *bundle* axis: each value is a
mapping ``{label: NAME, <config path>: value, ...}`` whose paths are set together (``{label: sft}``
sets nothing). Every run is a normal ``lisa run`` with its own run folder under the sweep's folder
(``<output_dir>/<name>/<axis>=<value>,...``: a scalar as written, a bundle by its label, a mapping
by its ``label``, else its name and settings, :func:`value_part`). Locally, runs that share the
seed, the model, the alignment settings and the data the alignment defense reads share one aligned
model (``_aligned/<hash>``, :func:`aligned_key`), and finished runs are skipped. With ``--launcher
slurm`` the sweep writes one config per run, one alignment job per aligned model that several runs
share (``lisa run CONFIG --stage align``), an sbatch array of every run that starts after those jobs
(``--dependency=afterok``), so no two tasks train the same alignment, and ``submit.sh``; resources come
from the config's ``slurm`` section. ``--submit`` submits them and prints every job id
(:func:`write_slurm`, :func:`submit`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel

from lisa_align.config import RunConfig, apply_overrides, config_to_dict, read_config_file, validate_config
from lisa_align.defenses import DEFENSES
from lisa_align.errors import LisaError
from lisa_align.io import atomic_write_text, atomic_write_yaml
from lisa_align.rundir import SHARED_ALIGNED_DIR

ALIASES = {"method": "finetune.methods", "p": "data.p", "n": "data.n", "rho": "finetune.lisa.rho",
           "k1": "finetune.lisa.k1", "k2": "finetune.lisa.k2", "seed": "seed"}


# A bundle label, or a mapping value's label: one safe run-folder name part.
LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_READABLE = re.compile(r"[A-Za-z0-9_.+=-]+")  # a mapping value's name-k=v part, when it is this short and plain
_READABLE_MAX = 40


def parse_grid(items: list[str]) -> list[tuple[str, list]]:
    """``key=v1,v2`` (plain scalars), or ``key=[v1, {name: x, s: 1}]`` (a YAML flow list: mappings too)."""
    axes = []
    for item in items:
        if "=" not in item:
            raise LisaError(f"grid axis '{item}' must look like key=v1,v2 (e.g. p=0,0.1,0.2)")
        key, values = item.split("=", 1)
        key = key.strip()
        try:
            if values.strip().startswith("["):
                vals = yaml.safe_load(values)
                if not isinstance(vals, list):
                    raise yaml.YAMLError("not a list")
            else:
                vals = [yaml.safe_load(v) for v in values.split(",") if v.strip() != ""]
        except yaml.YAMLError:
            raise LisaError(f"grid axis '{key}': values are plain scalars separated by commas (got '{values}'), "
                            f"or a YAML list: {key}='[sft, {{name: t_vaccine, sampled_layers: 1}}]'; a bundle "
                            "axis: variant='[{label: a, align.method: booster, finetune.adapter: continue}, "
                            "...]'") from None
        if not vals:
            raise LisaError(f"grid axis '{key}' has no values")
        axes.append((key, vals))
    return axes


def is_config_path(key: str) -> bool:
    """A grid axis that sets one config path (a short name, a dotted path or a top-level key); any
    other axis is a bundle axis."""
    return key in ALIASES or "." in key or key in RunConfig.model_fields


def _unknown_part(dotted: str) -> str | None:
    """The first part of a dotted config path that names no setting, else None (below a defense entry,
    a list or a mapping of free keys, config validation judges)."""
    model: type[BaseModel] | None = RunConfig
    for part in dotted.split("."):
        if model is None:
            return None
        field = model.model_fields.get(part)
        if field is None:
            return part
        ann = field.annotation
        kinds = [t for t in (ann, *getattr(ann, "__args__", ())) if t is not type(None)]
        models = [t for t in kinds if isinstance(t, type) and issubclass(t, BaseModel)]
        # a section, or an optional one (lora: null); not a union of defense entries (align.method)
        model = models[0] if len(models) == 1 and len(kinds) <= 2 else None
    return None


def _scalar_text(v) -> str | None:
    return None if isinstance(v, (dict, list)) or v is None else str(v)


def value_part(key: str, val) -> str:
    """The run-folder name part of an axis value: a scalar as written; a mapping by its ``label``,
    else its ``name`` plus its settings, ``name-k=v-k2=v2`` (sorted) when short and plain, else
    ``name-<8 hex of the settings' hash>``."""
    if not isinstance(val, dict):
        return str(val)
    if val.get("label") is not None:
        return str(val["label"])
    settings = {k: v for k, v in val.items() if k not in ("name", "label")}
    name = val.get("name")
    texts = [_scalar_text(v) for _, v in sorted(settings.items())]
    readable = "-".join(f"{k}={t}" for (k, _), t in zip(sorted(settings.items()), texts))
    prefix = str(name) if name is not None else key.split(".")[-1]
    if not settings:
        return prefix
    if all(t is not None for t in texts) and len(readable) <= _READABLE_MAX and _READABLE.fullmatch(readable):
        return f"{prefix}-{readable}"
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{prefix}-{digest}"


def _bundle_paths(val: dict) -> list[str]:
    return [ALIASES.get(k, k) for k in val if k != "label"]


def check_axes(axes: list[tuple[str, list]]) -> None:
    """One-line LisaErrors for a grid that cannot name or configure its runs: a bundle value that is
    not a labelled mapping, a duplicate folder name part, an unknown config path, two axes that set
    the same path."""
    owners: dict[str, str] = {}  # config path -> the axis that sets it
    for key, vals in axes:
        if not isinstance(vals, list) or not vals:
            raise LisaError(f"grid axis '{key}': give a non-empty list of values")
        if is_config_path(key):
            paths = [ALIASES.get(key, key)]
        else:
            paths = []
            for val in vals:
                shown = json.dumps(val, sort_keys=True, default=str)
                if not isinstance(val, dict) or not isinstance(val.get("label"), str):
                    raise LisaError(f"grid axis '{key}' is a bundle axis ('{key}' is no config path), so each value "
                                    f"is a mapping with a label and config paths, e.g. {{label: booster, "
                                    f"align.method: booster, finetune.adapter: continue}}; got {shown}")
                if not LABEL.fullmatch(val["label"]):
                    raise LisaError(f"grid axis '{key}' value {shown}: label '{val['label']}' must be letters, "
                                    "digits and _ . + - (it names the run folders)")
                for path in _bundle_paths(val):
                    bad = _unknown_part(path)
                    if bad is not None:
                        raise LisaError(f"grid axis '{key}' value '{val['label']}': unknown config path '{path}' "
                                        f"(no setting '{bad}')")
                    paths.append(path)
        if is_config_path(key):
            bad = _unknown_part(paths[0])
            if bad is not None:
                raise LisaError(f"grid axis '{key}': unknown config path '{paths[0]}' (no setting '{bad}')")
            for val in vals:
                if isinstance(val, dict) and val.get("label") is not None and not LABEL.fullmatch(str(val["label"])):
                    raise LisaError(f"grid axis '{key}' value {json.dumps(val, sort_keys=True, default=str)}: label "
                                    f"'{val['label']}' must be letters, digits and _ . + - (it names the run folders)")
        seen: dict[str, object] = {}
        for val in vals:
            part = value_part(key, val)
            if part in seen:
                what = "label" if not is_config_path(key) else "run-folder name part"
                raise LisaError(f"grid axis '{key}': two values have the {what} '{part}' "
                                f"({json.dumps(seen[part], default=str)} and {json.dumps(val, default=str)}); "
                                "give each a distinct label")
            seen[part] = val
        for path in dict.fromkeys(paths):
            for other, owner in owners.items():
                if owner != key and (path == other or path.startswith(other + ".") or other.startswith(path + ".")):
                    raise LisaError(f"grid axes '{owner}' and '{key}' both set '{min(path, other, key=len)}': "
                                    "a run gets one value; drop it from one of them")
            owners.setdefault(path, key)


def _overrides(key: str, val) -> list[str]:
    if not is_config_path(key):  # a bundle: its paths, in the order written
        return [_override(k, v) for k, v in val.items() if k != "label"]
    return [_override(key, val)]


def _override(key: str, val) -> str:
    if key == "method" and not isinstance(val, list):  # method=sft: that one fine-tuning method
        val = [val]
    return f"{ALIASES.get(key, key)}={json.dumps(val)}"


def bundle_point(raw: dict) -> tuple[dict[str, str], list[str]]:
    """Of a run config a sweep planned: {bundle axis: label} read from its name (``variant=booster,p=0.1``),
    and the config paths those bundle values set (from the config's ``sweep.grid``; none for a grid
    given on the command line), so that a report can label the run by the bundle, not by those paths."""
    name = str(raw.get("name") or "")
    grid = (raw.get("sweep") or {}).get("grid") or {}
    labels: dict[str, str] = {}
    paths: list[str] = []
    for m in re.finditer(r"(?:^|,)([^,=]+)=([A-Za-z0-9_][A-Za-z0-9_.+-]*)(?=,|$)", name):
        axis, label = m.group(1), m.group(2)
        if is_config_path(axis):
            continue
        labels[axis] = label
        for val in grid.get(axis) or []:
            if isinstance(val, dict) and val.get("label") == label:
                paths += _bundle_paths(val)
    return labels, list(dict.fromkeys(paths))


def expand(axes: list[tuple[str, list]]) -> list[tuple[str, list[str]]]:
    """(run name, overrides) for every combination of the axes."""
    check_axes(axes)
    runs = []
    for combo in itertools.product(*[vals for _, vals in axes]):
        name = ",".join(f"{key}={value_part(key, val)}" for (key, _), val in zip(axes, combo))
        overrides = [o for (key, _), val in zip(axes, combo) for o in _overrides(key, val)]
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
    try:
        check_axes(axes)
    except LisaError as e:
        raise LisaError(f"{p}: {e}") from None
    runs = []
    for combo, (name, overrides) in zip(itertools.product(*[vals for _, vals in axes]), expand(axes)):
        raw = apply_overrides(json.loads(json.dumps(base)), overrides + [f"output_dir={root}", f"name={name}"])
        try:
            cfg = config_to_dict(validate_config(raw, f"{p} [{name}]"))
        except LisaError:
            _blame_value(base, p, axes, combo)
            raise
        if share_aligned and cfg["align"]["enabled"] and not cfg["align"].get("output_dir"):
            cfg["align"]["output_dir"] = str(root / SHARED_ALIGNED_DIR / aligned_key(cfg))
        runs.append(cfg)
    return root, runs


def _blame_value(base: dict, p: Path, axes: list[tuple[str, list]], combo: tuple) -> None:
    """When a run's config fails validation: the one-line error of the first mapping (or bundle) value
    that fails on the sweep's config alone, naming its axis and value; else nothing (the run's own
    error, which names every axis value, stands)."""
    for (key, _), val in zip(axes, combo):
        if not isinstance(val, dict):
            continue
        raw = apply_overrides(json.loads(json.dumps(base)), _overrides(key, val))
        validate_config(raw, f"{p}: grid axis '{key}' value '{value_part(key, val)}'")


ARRAY_SCRIPT = "sweep.sbatch"
SUBMIT_SCRIPT = "submit.sh"
ALIGN_PREFIX = "align-"


@dataclass
class SlurmPlan:
    """The scripts of a Slurm sweep: one alignment job per aligned model that several runs share
    (``align``: (script, the runs that share it)), then the array of every run (``array``), which
    waits for those jobs; ``submit`` submits them in that order."""

    root: Path
    array: Path
    submit: Path
    runs: int
    align: list[tuple[Path, list[str]]] = field(default_factory=list)


def shared_alignments(runs: list[dict]) -> dict[str, list[dict]]:
    """{aligned model folder: the runs that use it} for the folders two or more runs share and that
    hold no aligned model yet: each needs one alignment before those runs start. A run with
    ``align.enabled: false`` or an aligned model of its own aligns (if at all) in its own task."""
    groups: dict[str, list[dict]] = {}
    for raw in runs:
        a = raw.get("align") or {}
        if a.get("enabled") and a.get("output_dir"):
            groups.setdefault(str(Path(a["output_dir"]).resolve()), []).append(raw)
    return {d: rs for d, rs in groups.items() if len(rs) > 1 and not (Path(d) / "config.json").exists()}


def _header(root: Path, raw: dict, job: str, output: str, extra: list[str] = ()) -> list[str]:
    s = validate_config(raw).slurm
    lines = ["#!/bin/bash", f"#SBATCH --job-name=lisa-{root.name}{job}", *extra, f"#SBATCH --gres=gpu:{s.gpus}",
             f"#SBATCH --cpus-per-task={s.cpus}", f"#SBATCH --mem={s.mem}", f"#SBATCH --time={s.time}",
             f"#SBATCH --output={root.resolve()}/{output}"]
    return lines + ([f"#SBATCH --partition={s.partition}"] if s.partition else [])


def write_slurm(root: Path, runs: list[dict]) -> SlurmPlan:
    """One config per run (``configs/<run>.yaml``); ``align-<key>.sbatch`` per shared aligned model
    (``lisa run <its first run's config> --stage align``); ``sweep.sbatch``, the array of every run;
    and ``submit.sh``, which submits the alignment jobs, then the array with
    ``--dependency=afterok:<their ids>`` (what ``--submit`` does)."""
    cfg_dir = root / "configs"
    paths = {}
    for raw in runs:
        path = cfg_dir / f"{raw['name']}.yaml"
        atomic_write_yaml(path, raw)
        paths[raw["name"]] = path.resolve()
    lisa = shlex.quote(shutil.which("lisa") or "lisa")
    plan_ = SlurmPlan(root=root, array=root / ARRAY_SCRIPT, submit=root / SUBMIT_SCRIPT, runs=len(runs))
    for folder, group in shared_alignments(runs).items():
        key = Path(folder).name if Path(folder).parent.name == SHARED_ALIGNED_DIR else hashlib.sha256(
            folder.encode()).hexdigest()[:12]
        names = [r["name"] for r in group]
        lines = _header(root, group[0], f"-align-{key}", f"slurm-align-{key}-%j.out")
        lines += ["set -euo pipefail", f"# the aligned model {folder}, shared by {len(names)} runs: "
                  + ", ".join(names), f"exec {lisa} run {shlex.quote(str(paths[names[0]]))} --stage align", ""]
        script = root / f"{ALIGN_PREFIX}{key}.sbatch"
        atomic_write_text(script, "\n".join(lines))
        plan_.align.append((script, names))
    for stale in root.glob(f"{ALIGN_PREFIX}*.sbatch"):  # of an earlier plan of this sweep
        if stale not in {s for s, _ in plan_.align}:
            stale.unlink()
    lines = _header(root, runs[0], "", "slurm-%A_%a.out", [f"#SBATCH --array=0-{len(runs) - 1}"])
    lines += ["set -euo pipefail", "CONFIGS=(", *[f"  {shlex.quote(str(paths[r['name']]))}" for r in runs], ")",
              f'exec {lisa} run "${{CONFIGS[$SLURM_ARRAY_TASK_ID]}}"', ""]
    atomic_write_text(plan_.array, "\n".join(lines))
    sub = ["#!/bin/bash", f"# lisa sweep {root.name}: one job per shared aligned model, then the array of "
           f"{len(runs)} runs after them", "set -euo pipefail"]
    for i, (script, names) in enumerate(plan_.align):
        sub += [f"A{i}=$(sbatch {shlex.quote(str(script.resolve()))} | awk '{{print $NF}}')",
                f'echo "alignment job $A{i}: {script.name} ({len(names)} runs)"']
    after = ":".join(f"${{A{i}}}" for i in range(len(plan_.align)))
    sub += [f"sbatch {f'--dependency=afterok:{after} ' if after else ''}{shlex.quote(str(plan_.array.resolve()))}",
            ""]
    atomic_write_text(plan_.submit, "\n".join(sub))
    return plan_


def describe(p: SlurmPlan) -> list[str]:
    """What a Slurm sweep wrote, and how to submit it."""
    lines = [f"{p.runs} runs; array script {p.array}"]
    for script, names in p.align:
        lines.append(f"alignment job first: {script} (the aligned model of {len(names)} runs)")
    if p.align:
        jobs = "the alignment job" if len(p.align) == 1 else f"the {len(p.align)} alignment jobs"
        lines.append(f"the array starts after {jobs} (--dependency=afterok)")
    lines.append(f"submit with: bash {p.submit}")
    return lines


def _job_id(out: str) -> str:
    m = re.search(r"Submitted batch job (\d+)", out) or re.match(r"\s*(\d+)", out)  # or sbatch --parsable
    if m is None:
        raise LisaError(f"sbatch printed no job id: {out.strip()[:200]!r}")
    return m.group(1)


def submit(p: SlurmPlan, echo=print) -> list[str]:
    """Submit the alignment jobs, then the array after them (``--dependency=afterok:<ids>``); each job
    id is echoed as it is known. The ids, alignment jobs first."""
    if shutil.which("sbatch") is None:
        raise LisaError("sbatch is not on PATH: run this on a Slurm login node, or drop --submit and "
                        f"run `bash {p.submit}` there")
    ids: list[str] = []

    def sbatch(*argv: str) -> str:
        out = subprocess.run(["sbatch", *argv], capture_output=True, text=True)
        if out.returncode != 0:
            done = f" (already submitted: {', '.join(ids)})" if ids else ""
            raise LisaError(f"sbatch failed{done}: {(out.stderr or out.stdout or '?').strip().splitlines()[0][:200]}")
        ids.append(_job_id(out.stdout))
        return ids[-1]

    for script, names in p.align:
        job = sbatch(str(script.resolve()))
        echo(f"alignment job {job}: {script} (the aligned model of {len(names)} runs)")
    after = ":".join(ids)
    job = sbatch(*([f"--dependency=afterok:{after}"] if after else []), str(p.array.resolve()))
    echo(f"array job {job}: {p.array} ({p.runs} runs{f', after {after}' if after else ''})")
    return ids
