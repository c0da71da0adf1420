"""lisa sweep: grid expansion, a shared aligned model, skipping finished runs, the Slurm array."""

from __future__ import annotations

import json

import pytest
import yaml

from lisa_align.cli import main
from lisa_align.errors import LisaError
from lisa_align.sweep import expand, parse_grid, plan
from test_pipeline import micro


def test_grid_expansion_and_aliases():
    axes = parse_grid(["method=sft,lisa", "p=0,0.1", "seed=0,1,2"])
    runs = expand(axes)
    assert len(runs) == 12
    name, overrides = runs[0]
    assert name == "method=sft,p=0,seed=0"
    assert overrides == ['finetune.methods=["sft"]', "data.p=0", "seed=0"]
    assert expand(parse_grid(["finetune.lisa.rho=1,10"]))[1] == ("finetune.lisa.rho=10", ["finetune.lisa.rho=10"])
    with pytest.raises(LisaError, match="key=v1,v2"):
        parse_grid(["p"])


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("LISA_ALIGN_CACHE", str(tmp_path / "cache"))
    cfg = micro(tmp_path, **{"eval.models": ["methods"]})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_plan_shares_the_aligned_model_between_runs_with_the_same_seed(config):
    root, runs = plan(str(config), ["method=sft,lisa", "p=0,0.25", "seed=0,1"])
    assert len(runs) == 8
    aligned = {(r["seed"], r["align"]["output_dir"]) for r in runs}
    assert len({d for _, d in aligned}) == 2  # one per seed
    assert all(d.startswith(str(root / "_aligned")) for _, d in aligned)
    assert {r["data"]["p"] for r in runs} == {0, 0.25}
    assert all(len(r["finetune"]["methods"]) == 1 for r in runs)


def test_local_sweep_runs_aligns_once_and_skips_finished(config, capsys):
    assert main(["sweep", str(config), "--grid", "method=sft,bso", "p=0,0.25"]) == 0
    out = capsys.readouterr().out
    root = config.parent / "runs" / "micro"
    assert out.strip().splitlines()[-1] == str(root)
    assert out.count("[lisa] align (sft): 16 rows") == 1  # four runs, one seed: one alignment
    assert len(list((root / "_aligned").iterdir())) == 1
    for name in ("method=sft,p=0", "method=bso,p=0.25"):
        s = json.loads((root / name / "summary.json").read_text())
        assert set(s) == {name.split(",")[0].split("=")[1]}
    assert main(["sweep", str(config), "--grid", "method=sft,bso", "p=0,0.25"]) == 0
    again = capsys.readouterr().out
    assert again.count("finished, skipped") == 4 and "[lisa] finetune" not in again


def test_slurm_array_script(config, capsys):
    assert main(["sweep", str(config), "--grid", "p=0,0.1,0.2", "--launcher", "slurm",
                 "--set", "slurm.gpus=2", "slurm.time=02:00:00"]) == 0
    out = capsys.readouterr().out
    root = config.parent / "runs" / "micro"
    script = (root / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --gres=gpu:2" in script
    assert "#SBATCH --time=02:00:00" in script and "#SBATCH --mem=64G" in script
    assert 'run "${CONFIGS[$SLURM_ARRAY_TASK_ID]}"' in script
    cfgs = sorted((root / "configs").glob("*.yaml"))
    assert len(cfgs) == 3
    assert {yaml.safe_load(c.read_text())["data"]["p"] for c in cfgs} == {0, 0.1, 0.2}
    assert all(yaml.safe_load(c.read_text())["align"]["output_dir"] is None for c in cfgs)
    assert f"sbatch {root / 'sweep.sbatch'}" in out
    assert not (root / "p=0").exists()  # nothing ran


def test_grid_from_the_config(config):
    raw = yaml.safe_load(config.read_text())
    raw["sweep"] = {"grid": {"method": ["sft", "lisa"], "p": [0, 0.25]}}
    config.write_text(yaml.safe_dump(raw))
    root, runs = plan(str(config), [])
    assert [r["name"] for r in runs] == ["method=sft,p=0", "method=sft,p=0.25", "method=lisa,p=0", "method=lisa,p=0.25"]
    raw.pop("sweep")
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(LisaError, match="no grid"):
        plan(str(config), [])


@pytest.mark.parametrize("path, n_runs", [("configs/embedded/table3.yaml", 12),
                                           ("configs/paper/table3-sst2-poison-ratio.yaml", 20)])
def test_shipped_sweep_configs_expand(path, n_runs):
    from pathlib import Path

    root, runs = plan(str(Path(__file__).resolve().parents[1] / path), [])
    assert len(runs) == n_runs
    assert {r["finetune"]["methods"][0]["name"] for r in runs} == {"sft", "vlguard", "bso", "lisa"}
