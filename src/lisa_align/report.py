"""Sweep reports: collect finished runs, tabulate them in the paper's layout, plot, write HTML.

``lisa report RUNS_DIR`` finds every run folder below ``RUNS_DIR`` (a ``config.yaml`` next to a
``summary.json``) and writes, under ``RUNS_DIR/report`` (or ``--out``):

* ``results.csv``: one row per evaluated model of each run, columns :data:`RESULT_COLUMNS`, then
  :data:`EXTRA_COLUMNS`, then :data:`FIDELITY_COLUMNS`. ``rho``/``k1``/``k2`` are the values the
  method really used (BSO: ρ = 0; empty for methods without a bi-state schedule). ``fa_lenient``
  (FA under the lenient rule) and ``hs_plus`` (HS counting degenerate answers as harmful) come from
  each model's ``metrics.json``; empty for runs evaluated before they existed. A post-processed
  model (the ``post`` stage) is a row of its own: ``method`` is ``<method>+<post>`` by defense name
  (``lisa+antidote``), ``label`` its key (``<label>+<post label>``), and ``rho``/``k1``/``k2`` those of
  the fine-tuned model it came from; the tables list it right after that model, so each pair of rows
  shows what the post stage bought.
* ``table.md`` / ``table.csv``: the paper's layout, one row per method and one column per setting
  (the config values that differ between runs, seeds aside), each cell HS / FA as mean ± std over
  seeds (sample std; one seed shows the mean only); plus over-refusal in the same layout.
* ``hs_vs_p.png``, ``fa_vs_p.png`` (and ``hs_vs_n.png``, ``fa_vs_n.png`` when n varies;
  ``hs_vs_lr.png``, ``fa_vs_lr.png`` when the fine-tuning learning rate varies and ``hs_vs_epochs.png``,
  ``fa_vs_epochs.png`` when its epochs do: one line per method and remaining setting),
  ``hs_vs_rho.png`` (bi-state runs; BSO is ρ = 0) and ``drift.png`` (‖w − anchor‖ over the steps
  of each bi-state run, from ``log.jsonl``), each when the runs give at least two points;
* ``report.html``: the tables and the plots, embedded as data URIs, so the one file opens anywhere.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lisa_align.config import config_to_dict, upgrade_saved_config, validate_config
from lisa_align.defenses import DEFENSES
from lisa_align.errors import LisaError
from lisa_align.io import atomic_write_bytes, atomic_write_text, read_json
from lisa_align.rundir import LISA_DRIFT, LISA_STEP, LOG_STAGE, LOG_STEP, RunDir, find_runs, finetune_stage
from lisa_align.sweep import bundle_point

RESULT_COLUMNS = ["method", "p", "n", "rho", "k1", "k2", "seed", "hs", "fa", "over_refusal"]
EXTRA_COLUMNS = ["label", "model", "task", "judge", "setting", "run"]
FIDELITY_COLUMNS = ["fa_lenient", "hs_plus"]  # appended last, so readers of the older columns are unaffected
# Config paths that never define a setting: bookkeeping, the seed (averaged over), the methods
# (the table's rows) and where the aligned model is stored.
_NOT_SETTINGS = ("name", "output_dir", "seed", "finetune.methods", "align.output_dir", "sweep", "slurm")
# Short names of the usual sweep axes (as in ``lisa sweep``).
_SHORT = {"data.p": "p", "data.n": "n", "finetune.lisa.rho": "rho", "finetune.lisa.k1": "k1",
          "finetune.lisa.k2": "k2", "model.name": "model", "data.task": "task", "finetune.lr": "lr",
          "finetune.epochs": "epochs"}
# The x axes of the line plots: row field -> (axis label, log scale). A plot is written when some line
# has two or more x values (the setting varies across the runs).
PLOT_AXES = {"p": ("harmful ratio p", False), "n": ("fine-tuning samples n", False),
             "lr": ("fine-tuning learning rate", True), "epochs": ("fine-tuning epochs", False)}


@dataclass
class Report:
    rows: list[dict[str, Any]]
    settings: list[str]  # setting labels in column order
    unfinished: list[str] = field(default_factory=list)
    drift: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): json.dumps(d, sort_keys=True) if isinstance(d, list) else d}


def _without_run_seed(raw: dict) -> dict:
    """The config without the run seed resolved into the synthetic training sources: it varies with
    the seed, which is averaged over, not a setting."""
    raw = json.loads(json.dumps(raw))
    data = raw.get("data") or {}
    for spec in [data.get("user"), data.get("harmful"), *(data.get("alignment") or [])]:
        if isinstance(spec, dict) and spec.get("seed") == raw.get("seed"):
            spec.pop("seed")
    return raw


def _is_setting_key(key: str) -> bool:
    return not any(key == k or key.startswith(k + ".") for k in _NOT_SETTINGS)


def _drift_curve(run: RunDir, key: str) -> list[tuple[int, float]]:
    """(step, ‖w − anchor‖) records of ``finetune/<key>`` in the run's ``log.jsonl``."""
    points = {}
    for rec in run.log_records():
        if rec.get(LOG_STAGE) == finetune_stage(key) and LISA_DRIFT in rec:
            points[int(rec.get(LISA_STEP, rec.get(LOG_STEP, 0)))] = float(rec[LISA_DRIFT])
    return sorted(points.items())


def collect(root: str | Path) -> Report:
    """Every evaluated model of every finished run below ``root``, with its setting."""
    root = Path(root)
    if not root.is_dir():
        raise LisaError(f"runs folder not found: {root}: pass the output folder of `lisa run` or `lisa sweep`")
    done, pending = find_runs(root)
    if not done:
        raise LisaError(f"{root}: no finished runs (a run folder holds config.yaml and summary.json); "
                        "run `lisa sweep CONFIG` or `lisa run CONFIG` first")
    runs = []
    for run in done:
        raw = upgrade_saved_config(yaml.safe_load(run.config.read_text(encoding="utf-8")) or {})
        try:
            cfg = validate_config(raw, str(run.config))
        except LisaError as e:
            raise LisaError(f"{run.path}: its config.yaml is not a valid run config ({e})") from None
        raw = config_to_dict(cfg)  # as the current release writes it: runs of two releases compare key by key
        runs.append((run, raw, cfg, read_json(run.summary)))
    flat = [_flatten(_without_run_seed(raw)) for _, raw, _, _ in runs]
    keys = sorted({k for f in flat for k in f if _is_setting_key(k)})
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
    points = [bundle_point(raw) for _, raw, _, _ in runs]  # a sweep's bundle axes: their labels name the setting
    hidden = {h for _, paths in points for h in paths}
    varying = [k for k in varying if not any(k == h or k.startswith(h + ".") for h in hidden)]

    rows: list[dict[str, Any]] = []
    drift: dict[str, list[tuple[int, float]]] = {}
    settings: dict[str, tuple] = {}
    for (run, _raw, cfg, summary), f, (labels, _) in zip(runs, flat, points):
        setting = ", ".join([f"{a}={lab}" for a, lab in labels.items()]
                            + [f"{_SHORT.get(k, k)}={f.get(k)}" for k in varying]) or "all"
        settings.setdefault(setting, tuple((False, "str", lab) for lab in labels.values())
                            + tuple((f.get(k) is None, str(type(f.get(k))), f.get(k)) for k in varying))
        methods = {m.key: m for m in cfg.finetune.resolved()}
        posts = cfg.post_models()
        for key, m in summary.items():
            post_of, post = posts.get(key, (None, None))
            spec = methods.get(post_of or key)
            values = spec.report_values() if spec is not None else {}
            k1, k2, rho = values.get("k1"), values.get("k2"), values.get("rho")
            metrics = run.eval(key).read_metrics()
            judge = metrics.get("judge")
            name = spec.name if spec else post_of or key
            rows.append({"method": f"{name}+{post.name}" if post else name, "p": cfg.data.p, "n": cfg.data.n,
                         "rho": rho, "k1": k1, "k2": k2, "seed": cfg.seed, "hs": m.get("hs"), "fa": m.get("fa"),
                         "over_refusal": m.get("over_refusal"), "label": key, "model": cfg.model.name,
                         "task": cfg.data.task, "judge": judge, "setting": setting,
                         "run": str(run.path.relative_to(root)) if run.path != root else root.name,
                         "fa_lenient": metrics.get("fa_lenient"), "hs_plus": metrics.get("hs_plus"),
                         "lr": cfg.finetune.lr, "epochs": cfg.finetune.epochs})  # for the plots, not results.csv
            if rho is not None and post is None:
                curve = _drift_curve(run, key)
                if curve:
                    label = f"{key} ({setting}, seed {cfg.seed})" if setting != "all" else f"{key} (seed {cfg.seed})"
                    drift[label] = curve
    order = [s for s, _ in sorted(settings.items(), key=lambda kv: kv[1])]
    return Report(rows=rows, settings=order, unfinished=[str(p.path.relative_to(root)) for p in pending], drift=drift)


# ---- aggregation ------------------------------------------------------------------------------
def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def aggregate(report: Report) -> dict[tuple[str, str], dict[str, tuple]]:
    """{(method label, setting): {metric: (mean, std, n seeds)}}."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in report.rows:
        groups[(r["label"], r["setting"])].append(r)
    return {g: {k: mean_std([r[k] for r in rs]) for k in ("hs", "fa", "over_refusal")} for g, rs in groups.items()}


def _methods(report: Report) -> list[str]:
    order = ["base", "aligned", *DEFENSES]  # the registry's order
    labels = list(dict.fromkeys(r["label"] for r in report.rows))
    base = {r["label"]: r["method"].split("+")[0] for r in report.rows}  # a post-processed model after its method
    rank = {lab: (order.index(m) if m in order else len(order)) for lab, m in base.items()}
    return sorted(labels, key=lambda lab: (rank[lab], labels.index(lab)))


def _cell(stat: tuple) -> str:
    mean, std, _ = stat
    if mean is None:
        return "-"
    return f"{mean:.1f}" if std is None else f"{mean:.1f}±{std:.1f}"


def seeds_note(report: Report) -> str:
    counts = sorted({s[2] for stats in aggregate(report).values() for s in stats.values() if s[2]})
    seeds = sorted({r["seed"] for r in report.rows})
    span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}" if counts else "0"
    return (f"mean ± sample std over {span} seed(s) (seeds {', '.join(map(str, seeds))}); "
            "a cell without ± has one seed")


def paper_table(report: Report) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(header, HS / FA rows, over-refusal rows) in the paper's layout."""
    agg = aggregate(report)
    header = ["method"] + report.settings
    main, refusal = [], []
    for lab in _methods(report):
        cells, ref = [lab], [lab]
        for s in report.settings:
            st = agg.get((lab, s))
            cells.append("" if st is None else f"{_cell(st['hs'])} / {_cell(st['fa'])}")
            ref.append("" if st is None else _cell(st["over_refusal"]))
        main.append(cells)
        refusal.append(ref)
    return header, main, refusal


def markdown(report: Report) -> str:
    header, main, refusal = paper_table(report)

    def table(rows):
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]

    judges = sorted({str(r["judge"]) for r in report.rows if r["judge"]})
    out = [f"HS / FA in %, {seeds_note(report)}; judge: {', '.join(judges) or '-'}.", "", *table(main), "",
           "Over-refusal in % (benign prompts refused):", "", *table(refusal)]
    if report.unfinished:
        out += ["", f"Unfinished runs, not in the table: {', '.join(report.unfinished)}"]
    return "\n".join(out) + "\n"


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows([["" if v is None else v for v in r] for r in rows])
    return buf.getvalue()


def table_csv(report: Report) -> str:
    """The paper layout with numbers: per method and setting, HS/FA/over-refusal mean and std."""
    agg = aggregate(report)
    header = ["method", "setting", "seeds", "hs_mean", "hs_std", "fa_mean", "fa_std",
              "over_refusal_mean", "over_refusal_std"]
    rows = []
    for lab in _methods(report):
        for s in report.settings:
            st = agg.get((lab, s))
            if st is None:
                continue
            n = max(v[2] for v in st.values())
            rows.append([lab, s, n, *[x if x is None else round(x, 4) for k in ("hs", "fa", "over_refusal")
                                      for x in st[k][:2]]])
    return _csv(header, rows)


def results_csv(report: Report) -> str:
    cols = RESULT_COLUMNS + EXTRA_COLUMNS + FIDELITY_COLUMNS
    return _csv(cols, [[r[c] for c in cols] for r in report.rows])


# ---- plots ------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _curves(rows: list[dict], x: str, y: str, line_of) -> dict[str, list[tuple[float, float, float]]]:
    """{line label: [(x, mean y, std y)]} with y averaged over seeds."""
    groups: dict[tuple[str, float], list] = defaultdict(list)
    for r in rows:
        if r[x] is not None and r[y] is not None:
            groups[(line_of(r), float(r[x]))].append(r[y])
    lines: dict[str, list] = defaultdict(list)
    for (label, xv), ys in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        mean, std, _ = mean_std(ys)
        lines[label].append((xv, mean, std or 0.0))
    return dict(lines)


def plot_lines(report: Report, x: str, y: str) -> dict[str, list[tuple[float, float, float]]]:
    """The data of the ``{y}_vs_{x}.png`` plot (``x`` a key of :data:`PLOT_AXES`, ``y`` hs or fa):
    {line label: [(x, mean y, sample std y or 0)]}, y averaged over seeds; a line is a method label
    with the run's other varying settings (those but ``x``)."""
    return _curves(report.rows, x, y, lambda r: _rest_of_setting(r, (x,)))


def _line_plot(plt, lines, xlabel, ylabel, title, path: Path, xlog: bool | str = False) -> bool:
    if not lines or max(len(v) for v in lines.values()) < 2:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in lines.items():
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
    if xlog == "log":
        ax.set_xscale("log")
    elif xlog:
        ax.set_xscale("symlog", linthresh=0.1)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)
    return True


def _rest_of_setting(r: dict, drop: tuple[str, ...]) -> str:
    parts = [p for p in r["setting"].split(", ") if p.split("=", 1)[0] not in drop and p != "all"]
    return r["label"] + (f" ({', '.join(parts)})" if parts else "")


def plots(report: Report, out: Path) -> list[tuple[str, str]]:
    """Write the PNGs; returns (file name, caption) of each one written."""
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    for x, (xlabel, log) in PLOT_AXES.items():
        for y, name in (("hs", "HS"), ("fa", "FA")):
            path = out / f"{y}_vs_{x}.png"
            if _line_plot(plt, plot_lines(report, x, y), xlabel, f"{name} (%)", f"{name} vs {x}", path,
                          xlog="log" if log else False):
                written.append((path.name, f"{name} vs {x}, mean ± std over seeds"))
    bi = [r for r in report.rows if r["rho"] is not None and "+" not in r["method"]]  # not post-processed models
    lines = _curves(bi, "rho", "hs", lambda r: _rest_of_setting({**r, "label": "bso/lisa"}, ("rho",)))
    path = out / "hs_vs_rho.png"
    if _line_plot(plt, lines, "proximal strength rho", "HS (%)", "HS vs rho (bi-state runs; BSO is rho=0)", path,
                  xlog=True):
        written.append((path.name, "HS vs ρ of the bi-state runs (BSO is ρ = 0)"))
    if report.drift:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, pts in list(report.drift.items())[:12]:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=label, linewidth=1)
        ax.set(xlabel="optimizer step", ylabel="||w - anchor||", title="drift to the anchor (reset at each switch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        _save(plt, fig, out / "drift.png")
        more = f" (first 12 of {len(report.drift)} runs)" if len(report.drift) > 12 else ""
        written.append(("drift.png", f"distance to the anchor over the fine-tuning steps{more}"))
    return written


# ---- HTML -------------------------------------------------------------------------------------
def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: Report, root: Path, out: Path, images: list[tuple[str, str]]) -> str:
    header, main, refusal = paper_table(report)
    judges = sorted({str(r["judge"]) for r in report.rows if r["judge"]})
    figs = []
    for name, caption in images:
        data = base64.b64encode((out / name).read_bytes()).decode("ascii")
        figs.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if not images:
        figs.append("<p>No plots: install matplotlib (<code>pip install 'lisa-align[plot]'</code>), "
                    "or sweep at least two values of p, n, the fine-tuning lr or epochs, or rho.</p>")
    unfinished = (f"<p>Unfinished runs, not in the tables: {html.escape(', '.join(report.unfinished))}</p>"
                  if report.unfinished else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lisa-align report: {html.escape(root.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}figure{{display:inline-block;margin:1em}}
img{{max-width:520px}}figcaption{{font-size:0.9em;color:#444}}</style></head><body>
<h1>lisa-align report</h1>
<p>{len({r['run'] for r in report.rows})} runs under <code>{html.escape(str(root))}</code>;
judge: {html.escape(', '.join(judges) or '-')}. Files: <a href="table.md">table.md</a>,
<a href="table.csv">table.csv</a>, <a href="results.csv">results.csv</a>.</p>
<h2>Harmful score / finetune accuracy (%)</h2>
<p>{html.escape(seeds_note(report))}.</p>
{_html_table(header, main)}
<h2>Over-refusal (%)</h2>
{_html_table(header, refusal)}
{unfinished}
<h2>Plots</h2>
{''.join(figs)}
</body></html>
"""


def write_report(root: str | Path, out: str | Path | None = None) -> tuple[Path, Report]:
    """Write every report file for the runs below ``root``; returns (report folder, report)."""
    root = Path(root)
    report = collect(root)
    out = Path(out) if out else root / "report"
    atomic_write_text(out / "results.csv", results_csv(report))
    atomic_write_text(out / "table.md", markdown(report))
    atomic_write_text(out / "table.csv", table_csv(report))
    images = plots(report, out)
    atomic_write_text(out / "report.html", render_html(report, root, out, images))
    return out, report


__all__ = ["RESULT_COLUMNS", "EXTRA_COLUMNS", "FIDELITY_COLUMNS", "Report", "collect", "aggregate", "paper_table",
           "markdown", "table_csv", "results_csv", "plot_lines", "PLOT_AXES", "plots", "render_html", "write_report",
           "find_runs", "mean_std"]
