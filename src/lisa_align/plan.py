"""``lisa plan CONFIG``: what a run would do, without training or downloading anything.

It prints the resolved config (YAML) and the plan: each stage with its rows per source, its number
of optimizer steps T, its scheduler and warm-up steps, and for each bi-state method the switch
steps, then the post-fine-tuning stage (each ``post`` defense on each fine-tuned model, with the key
it is evaluated under). Row counts come from the config (a source's ``n``, the user set's n and p); with
``--load-data`` the sources are read (offline for local and synthetic sources, or from the HF cache)
and the counts are the real ones. Researchers check a setting with it before spending GPU hours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from lisa_align.config import RunConfig, StageSettings, config_to_dict
from lisa_align.data.mixing import harmful_count
from lisa_align.data.sources import SourceSpec
from lisa_align.defenses import Defense
from lisa_align.defenses.lisa import steps_of_cycle
from lisa_align.training.sampler import steps_per_epoch
from lisa_align.training.schedule import BiStateSchedule

SHOWN_SWITCHES = 8  # switch steps printed before "..."


@dataclass
class StagePlan:
    """One training stage (the alignment, or one fine-tuning method)."""

    name: str
    rows: int | None
    total_steps: int | None
    scheduler: str
    warmup_steps: int | None
    switches: list[int] = field(default_factory=list)
    details: str = ""


@dataclass
class PostPlan:
    """One post-processed model: a post defense applied to a fine-tuned model, evaluated as ``key``."""

    key: str
    of: str  # the fine-tuned model's key
    defense: str
    details: str = ""


@dataclass
class Plan:
    rows: dict[str, str]  # data role -> "N rows from SOURCE" (or how many will be taken)
    stages: list[StagePlan]
    post: list[PostPlan] = field(default_factory=list)


def _spec_rows(spec: SourceSpec) -> int | None:
    return spec.n


def _count(spec: SourceSpec) -> str:
    n = _spec_rows(spec)
    what = f"{spec.describe()}" + (f", {spec.filter}" if spec.filter else "")
    return f"{n} rows of {what}" if n is not None else f"all rows of {what}"


def stage_steps(stage: StageSettings, rows: int | None, processes: int) -> int | None:
    """The Trainer's optimizer steps for ``rows`` rows: ``max_steps`` if set, else epochs x steps per epoch."""
    if stage.max_steps > 0:
        return stage.max_steps
    if rows is None:
        return None
    return math.ceil(stage.epochs * steps_per_epoch(rows, stage.batch_size, stage.grad_accum, processes))


def warmup_steps(stage: StageSettings, total: int | None) -> int | None:
    """Warm-up steps of the stage's scheduler (``constant`` has none: it ignores the ratio)."""
    if stage.scheduler == "constant":
        return 0
    return None if total is None else math.ceil(total * stage.warmup_ratio)


def _placeholder_rows(n: int | None, harmful: int = 0) -> list[dict] | None:
    """Stand-in rows for counting what a defense trains on (no data is read)."""
    if n is None:
        return None
    return [{"harmful": i < harmful} for i in range(n)]


def _training_rows(defense: Defense, rows: list[dict] | None, data: dict[str, list[dict] | None]) -> int | None:
    if rows is None or any(data.get(role) is None for role in defense.needs):
        return None
    return len(defense.training_rows(rows, {k: v for k, v in data.items() if v is not None}))


def make_plan(cfg: RunConfig, *, processes: int = 1, data: dict[str, list[dict]] | None = None) -> Plan:
    """The plan of ``cfg`` on ``processes`` data-parallel processes; ``data`` (rows by role: user,
    alignment, harmful, eval_harmful, eval_task, eval_benign) gives real counts instead of the config's."""
    d, e = cfg.data, cfg.eval
    n_harmful = harmful_count(d.n, d.p)
    alignment_n = sum(s.n for s in d.alignment) if all(s.n is not None for s in d.alignment) else None
    if data is None:
        roles = {"user": _placeholder_rows(d.n, n_harmful), "alignment": _placeholder_rows(alignment_n),
                 "harmful": None}
        rows = {"user": f"{d.n} rows: {d.n - n_harmful} benign from {d.user.describe()}, {n_harmful} harmful "
                        f"(p={d.p}) from {_count(d.harmful)}",
                "alignment": "; ".join(_count(s) for s in d.alignment) or "none",
                "eval harmful": _count(e.harmful), "eval task": _count(e.task),
                "eval benign": _count(e.benign) if e.benign else "none"}
    else:
        roles = {k: data.get(k) for k in ("user", "alignment", "harmful")}
        rows = {"user": f"{len(data['user'])} rows ({sum(bool(r.get('harmful')) for r in data['user'])} harmful)",
                "alignment": f"{len(data['alignment'])} rows",
                **{f"eval {k}": f"{len(data.get(f'eval_{k}') or [])} rows" for k in ("harmful", "task", "benign")}}
    stages = []
    if cfg.align.enabled:
        a = cfg.align
        method = a.method.resolve(a)
        n = _training_rows(method, roles["alignment"], roles)
        total = stage_steps(a, n, processes)
        stages.append(StagePlan(f"align ({method.name})", n, total, a.scheduler, warmup_steps(a, total)))
    f = cfg.finetune
    for method in f.resolved():
        n = _training_rows(method, roles["user"], roles)
        total = stage_steps(f, n, processes)
        plan = StagePlan(f"finetune {method.key}", n, total, f.scheduler, warmup_steps(f, total),
                         details=method.describe().lstrip(", "))
        values = method.report_values()
        if total and "k1" in values:
            spe = steps_per_epoch(n, f.batch_size, f.grad_accum, processes)
            k1, k2 = steps_of_cycle(values["k1"], values["k2"], method.training_arguments().get("cycle_epochs"), spe)
            schedule = BiStateSchedule(k1, k2, total)
            plan.details += f"; K1/K2 in steps {k1}/{k2}"
            if k1 and k2 and total / (k1 + k2) < 2:
                plan.details += f" (only {total / (k1 + k2):.2f} cycles: fewer than 2)"
            plan.switches = schedule.switch_steps()
            ratio = method.training_arguments().get("proximal_warmup_ratio", 0.0)
            first = next((s for s in range(total) if schedule.proximal_active(s, ratio)), None)
            if values["rho"] and first is not None:
                plan.details += f"; proximal term from step {first}"
        stages.append(plan)
    post = [PostPlan(key, of, d.name, d.describe().lstrip(", ")) for key, (of, d) in cfg.post_models().items()]
    return Plan(rows=rows, stages=stages, post=post)


def format_plan(cfg: RunConfig, plan: Plan, processes: int = 1) -> str:
    fmt = lambda v: "?" if v is None else f"{v}"  # noqa: E731
    lines = ["# resolved config", yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(), "",
             f"# plan ({processes} process{'es' if processes > 1 else ''}; '?': known once the data is read, "
             "lisa plan --load-data)"]
    lines += [f"rows {role}: {text}" for role, text in plan.rows.items()]
    for s in plan.stages:
        lines.append(f"stage {s.name}: {fmt(s.rows)} rows, T = {fmt(s.total_steps)} optimizer steps, "
                     f"scheduler {s.scheduler}, warm-up {fmt(s.warmup_steps)} steps"
                     + (f"; {s.details}" if s.details else ""))
        if s.switches:
            shown = ", ".join(map(str, s.switches[:SHOWN_SWITCHES]))
            more = ", ..." if len(s.switches) > SHOWN_SWITCHES else ""
            lines.append(f"  {len(s.switches)} switches at steps {shown}{more} (last {s.switches[-1]})")
    for p in plan.post:
        lines.append(f"post {p.key}: {p.defense} on the fine-tuned {p.of} (no training)"
                     + (f"; {p.details}" if p.details else ""))
    lines.append(f"evaluate: {', '.join(cfg.eval.models)} (judge {cfg.eval.judge})"
                 + (f"; methods include {', '.join(p.key for p in plan.post)}" if plan.post else ""))
    return "\n".join(lines)


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The plan as data (tests and tools): stage name -> rows, T, scheduler, warm-up, switches."""
    return {s.name: {"rows": s.rows, "total_steps": s.total_steps, "scheduler": s.scheduler,
                     "warmup_steps": s.warmup_steps, "switches": s.switches} for s in plan.stages}
