"""lisa report: results.csv, the paper-layout table (mean ± std over seeds), PNG plots, report.html."""

from __future__ import annotations

import base64
import csv
import json
import re

import pytest

from lisa_align.cli import main
from lisa_align.config import config_to_dict, validate_config
from lisa_align.errors import LisaError
from lisa_align.io import atomic_write_json, atomic_write_yaml
from lisa_align.report import (
    EXTRA_COLUMNS,
    FIDELITY_COLUMNS,
    RESULT_COLUMNS,
    collect,
    markdown,
    plot_lines,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(root, micro, *, method, p, seed, hs, fa, over_refusal=0.0, rho=1.0, drift=None, finished=True,
             changes=None):
    """A run folder as `lisa sweep` leaves it: resolved config.yaml, summary.json, metrics, log.jsonl.
    ``changes``: further dotted config values (e.g. ``{"finetune.lr": 1e-4}``), also in the run's name."""
    changes = changes or {}
    name = ",".join([f"method={method}", f"p={p}", *(f"{k}={v}" for k, v in changes.items()), f"seed={seed}"])
    cfg = micro(name=name, seed=seed, **{"data.p": p, "finetune.methods": [method],
                                         "finetune.lisa.rho": rho, "eval.models": ["methods"], **changes})
    cfg["output_dir"] = str(root.parent)
    cfg["align"]["output_dir"] = str(root / "_aligned" / f"seed{seed}")
    run = root / name
    atomic_write_yaml(run / "config.yaml", config_to_dict(validate_config(cfg)))
    if finished:
        atomic_write_json(run / "summary.json", {method: {"hs": hs, "fa": fa, "over_refusal": over_refusal}})
        atomic_write_json(run / "eval" / method / "metrics.json", {"hs": hs, "fa": fa, "judge": "refusal",
                                                                  "fa_lenient": fa + 1, "hs_plus": hs + 0.5})
    lines = [json.dumps({"stage": f"finetune/{method}", "step": s, "loss": 1.0, "lisa/drift": d})
             for s, d in (drift or [])]
    (run / "log.jsonl").write_text("\n".join(lines) + ("\n{\"stage\": \"finetune/" if lines else ""))  # torn tail
    return run


@pytest.fixture
def runs(tmp_path, micro):
    root = tmp_path / "runs" / "table3"
    for seed, (s, b, lisa) in enumerate([(100, 50, 10), (80, 70, 20)]):
        for p in (0.0, 0.1):
            fake_run(root, micro, method="sft", p=p, seed=seed, hs=s - (20 if p == 0 else 0), fa=95 + seed)
            fake_run(root, micro, method="bso", p=p, seed=seed, hs=b, fa=94, drift=[(2, 0.5), (10, 2.0)])
            fake_run(root, micro, method="lisa", p=p, seed=seed, hs=lisa, fa=93, over_refusal=5.0 * seed,
                     drift=[(2, 0.5), (10, 0.7), (20, 0.4)])
    fake_run(root, micro, method="lisa", p=0.2, seed=0, hs=0, fa=0, finished=False)
    return root


def test_results_csv_has_one_row_per_model_with_the_used_method_settings(runs):
    out, _ = write_report(runs)
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
        f.seek(0)
        header = next(csv.reader(f))
    assert header[:len(RESULT_COLUMNS)] == ["method", "p", "n", "rho", "k1", "k2", "seed", "hs", "fa", "over_refusal"]
    assert header == RESULT_COLUMNS + EXTRA_COLUMNS + ["fa_lenient", "hs_plus"]  # appended last
    assert FIDELITY_COLUMNS == ["fa_lenient", "hs_plus"]
    assert len(rows) == 12  # 3 methods x 2 p x 2 seeds; the unfinished run is left out
    by = {(r["method"], r["p"], r["seed"]): r for r in rows}
    assert by[("bso", "0.1", "1")]["rho"] == "0.0"  # BSO is rho = 0 whatever the config's rho
    assert (by[("lisa", "0.1", "1")]["rho"], by[("lisa", "0.1", "1")]["k1"], by[("lisa", "0.1", "1")]["k2"]) == \
        ("1.0", "2", "4")
    assert by[("sft", "0.1", "0")]["rho"] == by[("sft", "0.1", "0")]["k1"] == ""  # no bi-state schedule
    assert by[("lisa", "0.1", "1")]["hs"] == "20" and by[("lisa", "0.1", "1")]["n"] == "24"
    assert by[("sft", "0.0", "0")]["judge"] == "refusal"
    # from each model's metrics.json (summary.json holds hs / fa / over_refusal only)
    assert (by[("lisa", "0.1", "1")]["fa_lenient"], by[("lisa", "0.1", "1")]["hs_plus"]) == ("94", "20.5")


def test_paper_table_is_mean_and_sample_std_over_seeds(runs):
    report = collect(runs)
    assert report.settings == ["p=0.0", "p=0.1"]  # seed is averaged over, not a setting
    assert report.unfinished == ["method=lisa,p=0.2,seed=0"]
    md = markdown(report)
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| method"))
    assert header == "| method | p=0.0 | p=0.1 |"
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0] for r in rows[:3]] == ["| sft", "| bso", "| lisa"]
    # sft at p=0.1: HS 100 and 80 -> 90 ± 14.1 (sample std); FA 95 and 96 -> 95.5 ± 0.7
    assert "| sft | 70.0±14.1 / 95.5±0.7 | 90.0±14.1 / 95.5±0.7 |" in lines
    assert "| lisa | 15.0±7.1 / 93.0±0.0 | 15.0±7.1 / 93.0±0.0 |" in lines
    assert "| lisa | 2.5±3.5 | 2.5±3.5 |" in lines  # over-refusal table
    assert "Unfinished runs" in md and "method=lisa,p=0.2,seed=0" in md


def test_table_csv_numbers(runs):
    out, _ = write_report(runs)
    rows = list(csv.DictReader((out / "table.csv").open()))
    r = next(r for r in rows if r["method"] == "bso" and r["setting"] == "p=0.1")
    assert (r["seeds"], float(r["hs_mean"]), round(float(r["hs_std"]), 3), float(r["fa_mean"])) == \
        ("2", 60.0, 14.142, 94.0)


def test_plots_and_self_contained_html(runs):
    out, _ = write_report(runs)
    for name in ("hs_vs_p.png", "fa_vs_p.png", "hs_vs_rho.png", "drift.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
    assert not (out / "hs_vs_n.png").exists()  # n does not vary: one point is no plot
    page = (out / "report.html").read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert {name for name, _ in images} == {"hs_vs_p.png", "fa_vs_p.png", "hs_vs_rho.png", "drift.png"}
    for name, data in images:
        assert base64.b64decode(data) == (out / name).read_bytes()
    assert "<td>90.0±14.1 / 95.5±0.7</td>" in page
    assert page.lstrip().startswith("<!doctype html>") and page.rstrip().endswith("</html>")


def test_drift_curve_comes_from_the_log_and_survives_a_torn_last_line(runs):
    report = collect(runs)
    assert report.drift["lisa (p=0.1, seed 1)"] == [(2, 0.5), (10, 0.7), (20, 0.4)]
    assert set(k.split(" ")[0] for k in report.drift) == {"bso", "lisa"}  # SFT has no anchor


def test_report_cli_and_errors(runs, tmp_path, capsys):
    assert main(["report", str(runs), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "| lisa | 15.0±7.1 / 93.0±0.0 |" in out and str(tmp_path / "rep" / "report.html") in out
    assert (tmp_path / "rep" / "report.html").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "runs folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(LisaError, match="no finished runs"):
        collect(tmp_path / "empty")


def test_report_on_a_real_micro_sweep(tmp_path, monkeypatch, capsys, micro):
    import yaml

    monkeypatch.setenv("LISA_ALIGN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(micro(**{"eval.models": ["methods"]})))
    assert main(["sweep", str(path), "--grid", "method=sft,bso,lisa", "p=0,0.25"]) == 0
    root = tmp_path / "runs" / "micro"
    assert main(["report", str(root)]) == 0
    report = collect(root)
    assert sorted((r["method"], r["p"]) for r in report.rows) == sorted(
        (m, p) for m in ("sft", "bso", "lisa") for p in (0.0, 0.25))
    assert all(r["hs_plus"] is not None and r["fa_lenient"] is not None for r in report.rows)  # a real evaluation
    # Lisa's loss records carry the drift, so the curve has more points than the switches
    lisa = report.drift["lisa (p=0.25, seed 0)"]
    switches = json.loads((root / "method=lisa,p=0.25" / "finetune" / "lisa" / "lisa_switches.json").read_text())
    assert len(lisa) > len(switches) > 0
    assert (root / "report" / "drift.png").read_bytes().startswith(PNG_MAGIC)


def _images(out):
    page = (out / "report.html").read_text()
    return {name: base64.b64decode(data) for name, data in
            re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)}


def test_hs_and_fa_against_the_fine_tuning_learning_rate(tmp_path, micro):
    """lr varies (epochs, p do not): hs_vs_lr.png and fa_vs_lr.png, one line per method, y the mean over
    seeds at each lr; no epochs or p plots."""
    root = tmp_path / "runs" / "lr"
    hs = {("sft", 1e-4): (60, 80), ("sft", 1e-3): (90, 100), ("lisa", 1e-4): (0, 10), ("lisa", 1e-3): (20, 40)}
    for (method, lr), per_seed in hs.items():
        for seed, h in enumerate(per_seed):
            fake_run(root, micro, method=method, p=0.1, seed=seed, hs=h, fa=90 + seed + (lr > 5e-4),
                     changes={"finetune.lr": lr})
    out, report = write_report(root)
    assert report.settings == ["lr=0.0001", "lr=0.001"]
    lines = plot_lines(report, "lr", "hs")
    assert list(lines) == ["lisa", "sft"]
    assert lines["sft"] == [(1e-4, 70.0, pytest.approx(14.1421, abs=1e-4)), (1e-3, 95.0, pytest.approx(7.0711, abs=1e-4))]
    assert lines["lisa"] == [(1e-4, 5.0, pytest.approx(7.0711, abs=1e-4)), (1e-3, 30.0, pytest.approx(14.1421, abs=1e-4))]
    fa = plot_lines(report, "lr", "fa")
    assert [(x, y) for x, y, _ in fa["sft"]] == [(1e-4, 90.5), (1e-3, 91.5)]
    for name in ("hs_vs_lr.png", "fa_vs_lr.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
    for name in ("hs_vs_epochs.png", "fa_vs_epochs.png", "hs_vs_p.png"):
        assert not (out / name).exists(), name  # one value: no plot
    images = _images(out)
    assert set(images) == {"hs_vs_lr.png", "fa_vs_lr.png"}
    assert images["hs_vs_lr.png"] == (out / "hs_vs_lr.png").read_bytes()
    with open(out / "results.csv", newline="") as f:
        assert next(csv.reader(f)) == RESULT_COLUMNS + EXTRA_COLUMNS + FIDELITY_COLUMNS  # unchanged columns


def test_hs_and_fa_against_the_fine_tuning_epochs_and_lr_together(tmp_path, micro):
    """lr and epochs both vary: each plot has a line per method and value of the other setting."""
    root = tmp_path / "runs" / "robustness"
    for method, base in (("sft", 50), ("lisa", 0)):
        for lr in (1e-4, 1e-2):
            for epochs in (1, 2, 4):
                fake_run(root, micro, method=method, p=0.1, seed=0, hs=base + 10 * epochs + (5 if lr > 1e-3 else 0),
                         fa=80 + epochs, changes={"finetune.lr": lr, "finetune.epochs": epochs})
    out, report = write_report(root)
    ep = plot_lines(report, "epochs", "hs")
    assert set(ep) == {f"{m} (lr={lr})" for m in ("sft", "lisa") for lr in (0.0001, 0.01)}
    assert ep["sft (lr=0.01)"] == [(1.0, 65.0, 0.0), (2.0, 75.0, 0.0), (4.0, 95.0, 0.0)]
    assert ep["lisa (lr=0.0001)"] == [(1.0, 10.0, 0.0), (2.0, 20.0, 0.0), (4.0, 40.0, 0.0)]
    by_lr = plot_lines(report, "lr", "hs")
    assert by_lr["sft (epochs=2.0)"] == [(1e-4, 70.0, 0.0), (1e-2, 75.0, 0.0)]
    assert [(x, y) for x, y, _ in plot_lines(report, "epochs", "fa")["lisa (lr=0.01)"]] == [(1.0, 81.0), (2.0, 82.0),
                                                                                           (4.0, 84.0)]
    names = {"hs_vs_lr.png", "fa_vs_lr.png", "hs_vs_epochs.png", "fa_vs_epochs.png"}
    for name in names:
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name
    assert set(_images(out)) == names


def test_bundle_axis_runs_are_labelled_by_their_bundle(tmp_path, micro):
    """Runs of a sweep's bundle axis (``variant: [{label: ..., <paths>: ...}]``) get the label as their
    setting, not the list of config values the bundle set."""
    root = tmp_path / "runs" / "bundles"
    grid = {"variant": [{"label": "plain"}, {"label": "strong", "finetune.lr": 0.01, "finetune.epochs": 3}]}
    for label, changes, hs in (("plain", {}, 90.0), ("strong", {"finetune.lr": 0.01, "finetune.epochs": 3}, 40.0)):
        cfg = micro(name=f"variant={label}", **{"finetune.methods": ["sft"], "eval.models": ["methods"],
                                                "sweep": {"grid": grid}, **changes})
        cfg["output_dir"] = str(root.parent)
        run = root / f"variant={label}"
        atomic_write_yaml(run / "config.yaml", config_to_dict(validate_config(cfg)))
        atomic_write_json(run / "summary.json", {"sft": {"hs": hs, "fa": 90.0, "over_refusal": 0.0}})
        atomic_write_json(run / "eval" / "sft" / "metrics.json", {"hs": hs, "fa": 90.0, "judge": "refusal"})
        (run / "log.jsonl").write_text("")
    rep = collect(root)
    assert sorted(r["setting"] for r in rep.rows) == ["variant=plain", "variant=strong"]
    assert {r["setting"]: r["hs"] for r in rep.rows} == {"variant=plain": 90.0, "variant=strong": 40.0}
