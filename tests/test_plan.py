"""lisa plan: the resolved config and the plan (stages, rows, T, switch steps, scheduler), no training."""

from __future__ import annotations

from pathlib import Path

import pytest

from lisa_align.cli import main
from lisa_align.config import load_config
from lisa_align.plan import make_plan, plan_summary

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


def test_the_papers_main_setting(capsys):
    assert main(["plan", str(ROOT / "configs" / "paper" / "llama2-7b-sst2.yaml")]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and "name: llama2-7b-sst2-p0.1" in out
    lisa = next(line for line in out.splitlines() if line.startswith("stage finetune lisa:"))
    assert "5000 rows, T = 20000 optimizer steps, scheduler constant, warm-up 0 steps" in lisa
    assert "K1/K2=100/900, rho=1.0; K1/K2 in steps 100/900; proximal term from step 2001" in lisa
    i = out.splitlines().index(lisa)
    assert out.splitlines()[i + 1].startswith("  39 switches at steps 100, 1000, 1100, 2000, 2100,")
    assert "stage align (sft): 10000 rows, T = 60000 optimizer steps, scheduler cosine, warm-up 6000 steps" in out
    assert "rows user: 5000 rows: 4500 benign" in out and "500 harmful (p=0.1)" in out


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_every_paper_config_plans_offline(path, capsys):
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "stage finetune" in out


def test_switches_and_rows_follow_the_defense():
    cfg = load_config(None, ["data.n=100", "finetune.batch_size=10", "finetune.epochs=2",
                             'finetune.methods=[sft, {name: vlguard, alignment_rows: 50, mode: append}, '
                             '{name: lisa, k1: 2, k2: 8}]'])
    plan = plan_summary(make_plan(cfg))
    assert plan["finetune sft"]["total_steps"] == 20 and plan["finetune sft"]["switches"] == []
    assert plan["finetune vlguard"]["rows"] == 150 and plan["finetune vlguard"]["total_steps"] == 30
    assert plan["finetune lisa"]["switches"] == [2, 10, 12]
    two = plan_summary(make_plan(cfg, processes=2))
    assert two["finetune sft"]["total_steps"] == 10  # the global batch doubles


def _fidelity_rows() -> list[tuple[str, str]]:
    """(setting, paper value) of each row of the README's Fidelity table whose setting is a config path."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("## Fidelity", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[3].startswith("`") and cells[3].count("`") == 2 and cells[4].startswith("`"):
            rows.append((cells[3].strip("`"), cells[4].split("`")[1]))
    return rows


def _at(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


# Paper configs of another paper's protocol: the Fidelity rows they set otherwise, stated in their header.
OTHER_PROTOCOL = {"booster-sst2-poison-ratio.yaml": {"eval.hs_protocol": "booster"}}


def test_the_fidelity_table_holds_for_every_paper_config():
    import yaml

    rows = _fidelity_rows()
    assert len(rows) >= 6, rows  # the table is there and its settings are config paths
    for path in PAPER:
        cfg = load_config(path)
        other = OTHER_PROTOCOL.get(path.name, {})
        for setting, value in rows:
            assert _at(cfg, setting) == other.get(setting, yaml.safe_load(value)), (path.name, setting)


def test_k1_k2_as_a_ratio_over_a_cycle_of_epochs(micro):
    """finetune.lisa.cycle_epochs: K1:K2 is a ratio and a cycle lasts that many epochs, resolved to steps
    (the demo's 6/57 is the paper's 1:9 over one 63-step epoch); the plan and the trainer agree."""
    import json

    from lisa_align.config import validate_config
    from lisa_align.defenses.lisa import steps_of_cycle
    from lisa_align.pipeline import Pipeline

    assert steps_of_cycle(1, 9, 1.0, 63) == (6, 57) and steps_of_cycle(100, 900, None, 1000) == (100, 900)
    assert steps_of_cycle(1, 9, 0.5, 4) == (1, 1) and steps_of_cycle(0, 1, 1.0, 10) == (0, 10)
    # micro: 24 rows, batch 4 -> 6 steps an epoch; 1:2 over one epoch -> K1/K2 = 2/4, the micro's own steps
    cfg = validate_config(micro(**{"finetune.methods": ["lisa"], "finetune.lisa": {"k1": 1, "k2": 2, "cycle_epochs": 1.0},
                                   "eval.models": []}))
    assert plan_summary(make_plan(cfg))["finetune lisa"]["switches"] == [2, 6, 8]
    Pipeline(cfg, echo=lambda *_: None).run()
    switches = json.loads((cfg.run_dir / "finetune" / "lisa" / "lisa_switches.json").read_text())
    assert [s["lisa/step"] for s in switches] == [2, 6, 8]
