"""lisa sweep: grid expansion, a shared aligned model, skipping finished runs, the Slurm array."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lisa_align.cli import main
from lisa_align.errors import LisaError
from lisa_align.sweep import bundle_point, expand, parse_grid, plan, value_part


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
    with pytest.raises(LisaError, match="plain scalars"):
        parse_grid(["method={name: lisa, k1: 10}"])


@pytest.fixture
def config(tmp_path, monkeypatch, micro):
    monkeypatch.setenv("LISA_ALIGN_CACHE", str(tmp_path / "cache"))
    cfg = micro(**{"eval.models": ["methods"]})
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
    # a finished run of another config is never passed off as this sweep's result
    assert main(["sweep", str(config), "--grid", "method=sft", "p=0", "--set", "finetune.lr=0.002"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "finetune.lr: 0.001 -> 0.002" in err


def test_slurm_array_script(config, capsys):
    assert main(["sweep", str(config), "--grid", "p=0,0.1,0.2", "--launcher", "slurm",
                 "--set", "slurm.gpus=2", "--set", "slurm.time=02:00:00"]) == 0  # repeated --set adds up
    out = capsys.readouterr().out
    root = config.parent / "runs" / "micro"
    script = (root / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --gres=gpu:2" in script
    assert "#SBATCH --time=02:00:00" in script and "#SBATCH --mem=64G" in script
    assert 'run "${CONFIGS[$SLURM_ARRAY_TASK_ID]}"' in script
    cfgs = sorted((root / "configs").glob("*.yaml"))
    assert len(cfgs) == 3
    assert {yaml.safe_load(c.read_text())["data"]["p"] for c in cfgs} == {0, 0.1, 0.2}
    # the three runs share one aligned model, trained by one alignment job before the array starts
    aligned = {yaml.safe_load(c.read_text())["align"]["output_dir"] for c in cfgs}
    assert len(aligned) == 1 and Path(aligned.pop()).parent == root / "_aligned"
    (align,) = root.glob("align-*.sbatch")
    assert "#SBATCH --gres=gpu:2" in align.read_text() and "--stage align" in align.read_text()
    assert f"alignment job first: {align}" in out and f"submit with: bash {root / 'submit.sh'}" in out
    assert not (root / "p=0").exists()  # nothing ran


FAKE_SBATCH = """#!{python}
import json, os, sys
log = os.environ["FAKE_SBATCH_LOG"]
calls = open(log).read().splitlines() if os.path.exists(log) else []
script = sys.argv[-1]  # the script is a file argument, never stdin
with open(log, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "script": open(script).read()}}) + "\\n")
print(f"Submitted batch job {{101 + len(calls)}}")
"""


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """A fake ``sbatch`` on PATH that records its arguments (and the script) in a log and prints
    ``Submitted batch job 101``, 102, ...; the fixture returns a reader of that log."""
    import os
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(FAKE_SBATCH.format(python=sys.executable))
    sbatch.chmod(0o755)
    log = tmp_path / "sbatch.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_LOG", str(log))

    def calls() -> list[dict]:
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return calls
    return calls


def test_slurm_submits_one_alignment_job_per_shared_model_then_the_array_after_them(config, capsys, fake_sbatch):
    import subprocess

    grid = ["--grid", "p=0,0.1", "seed=0,1", "--launcher", "slurm"]
    assert main(["sweep", str(config), *grid, "--submit"]) == 0
    out = capsys.readouterr().out
    root = (config.parent / "runs" / "micro").resolve()
    calls = fake_sbatch()
    # two seeds: two aligned models, each shared by two runs: two alignment jobs first, then the array
    assert len(calls) == 3
    (a1,), (a2,) = calls[0]["argv"], calls[1]["argv"]
    assert {Path(a1).name, Path(a2).name} == {p.name for p in root.glob("align-*.sbatch")}
    assert calls[2]["argv"] == ["--dependency=afterok:101:102", str(root / "sweep.sbatch")]
    assert "#SBATCH --array=0-3" in calls[2]["script"]
    for call in calls[:2]:
        key = Path(call["argv"][0]).stem.removeprefix("align-")
        cmd = call["script"].strip().splitlines()[-1]
        assert cmd.endswith("--stage align") and " run " in cmd
        run_cfg = yaml.safe_load(Path(cmd.split()[-3]).read_text())  # the config of one run of that model
        assert run_cfg["align"]["output_dir"] == str(config.parent / "runs" / "micro" / "_aligned" / key)
    assert "alignment job 101:" in out and "alignment job 102:" in out
    assert "array job 103:" in out and "(4 runs, after 101:102)" in out
    # without --submit: submit.sh makes the same calls
    subprocess.run(["bash", str(root / "submit.sh")], check=True, capture_output=True)
    assert [c["argv"] for c in fake_sbatch()] == [c["argv"] for c in calls]


@pytest.mark.parametrize("grid", [["seed=0,1", "--set", "align.enabled=false"],  # no alignment
                                  ["seed=0,1"]])  # one run per aligned model: it aligns in its own task
def test_slurm_needs_no_alignment_job_for_an_unshared_alignment(config, capsys, fake_sbatch, grid):
    assert main(["sweep", str(config), "--grid", *grid, "--launcher", "slurm", "--submit"]) == 0
    root = (config.parent / "runs" / "micro").resolve()
    assert [c["argv"] for c in fake_sbatch()] == [[str(root / "sweep.sbatch")]]
    assert "array job 101:" in capsys.readouterr().out and not list(root.glob("align-*.sbatch"))


def test_an_alignment_job_aligns_only_and_a_rerun_needs_it_no_more(config, capsys):
    args = ["sweep", str(config), "--grid", "p=0,0.25", "--launcher", "slurm"]
    assert main(args) == 0
    root = config.parent / "runs" / "micro"
    (align,) = root.glob("align-*.sbatch")
    run_cfg = align.read_text().strip().splitlines()[-1].split()[-3]
    capsys.readouterr()
    assert main(["run", run_cfg, "--stage", "align"]) == 0
    aligned = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert aligned.parent == root / "_aligned" and (aligned / "config.json").is_file()
    assert not (root / "p=0" / "finetune").exists() and not (root / "p=0" / "summary.json").exists()
    assert main(args) == 0  # the aligned model is there: the array alone, with no dependency
    assert not list(root.glob("align-*.sbatch")) and "--dependency" not in (root / "submit.sh").read_text()


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


def _with_grid(config, grid):
    raw = yaml.safe_load(config.read_text())
    raw["sweep"] = {"grid": grid}
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def test_mapping_axis_values_name_their_run_folders(config):
    long = {"name": "t_vaccine", "sampled_layers": 1, "resample_every": 10, "measure_every": 50, "harmful_rows": 8}
    _with_grid(config, {"align.method": ["sft", {"name": "vaccine", "rho": 0.5},
                                         {"name": "vaccine", "rho": 5, "label": "vac5"}, long]})
    root, runs = plan(str(config), [])
    digest = value_part("align.method", long).split("-")[1]
    assert len(digest) == 8 and digest == value_part("align.method", dict(reversed(list(long.items())))).split("-")[1]
    assert [r["name"] for r in runs] == ["align.method=sft", "align.method=vaccine-rho=0.5", "align.method=vac5",
                                         f"align.method=t_vaccine-{digest}"]
    assert [r["align"]["method"].get("rho") for r in runs] == [None, 0.5, 5, 3.0]
    assert runs[2]["align"]["method"]["label"] == "vac5" and runs[3]["align"]["method"]["sampled_layers"] == 1
    assert len({r["align"]["output_dir"] for r in runs}) == 4
    # the same values on the command line: a YAML flow list
    _, cli = plan(str(config), ["align.method=[sft, {name: vaccine, rho: 0.5}]", "seed=0,1"])
    assert [r["name"] for r in cli] == ["align.method=sft,seed=0", "align.method=sft,seed=1",
                                        "align.method=vaccine-rho=0.5,seed=0", "align.method=vaccine-rho=0.5,seed=1"]
    assert value_part("finetune.lora", {"r": 4, "alpha": 8}) == "lora-alpha=8-r=4"
    assert value_part("finetune.lora", {"r": 4, "target_modules": ["q_proj"]}).startswith("lora-")  # a list: hashed


def test_a_bundle_axis_applies_all_its_keys_and_shares_the_alignment(config):
    raw = yaml.safe_load(config.read_text())
    raw["align"]["lora"] = {"r": 4}
    config.write_text(yaml.safe_dump(raw))
    _with_grid(config, {"variant": [
        {"label": "base"},
        {"label": "cont", "finetune.adapter": "continue", "method": "sft", "finetune.lr": 0.002},
        {"label": "vac", "align.method": {"name": "vaccine", "rho": 0.5}, "finetune.methods": ["sft"]},
    ], "p": [0, 0.25]})
    root, runs = plan(str(config), [])
    assert [r["name"] for r in runs] == ["variant=base,p=0", "variant=base,p=0.25", "variant=cont,p=0",
                                         "variant=cont,p=0.25", "variant=vac,p=0", "variant=vac,p=0.25"]
    by = {r["name"]: r for r in runs}
    cont = by["variant=cont,p=0.25"]
    assert cont["finetune"]["adapter"] == "continue" and cont["finetune"]["lr"] == 0.002
    assert [m["name"] for m in cont["finetune"]["methods"]] == ["sft"] and cont["data"]["p"] == 0.25
    base = by["variant=base,p=0"]
    assert base["finetune"]["adapter"] == "new" and len(base["finetune"]["methods"]) > 1
    assert by["variant=vac,p=0"]["align"]["method"] == {"name": "vaccine", "label": None, "rho": 0.5}
    # the same alignment: one aligned model for base and cont (they differ in fine-tuning only)
    assert len({by[n]["align"]["output_dir"] for n in by if "vac" not in n}) == 1
    assert len({r["align"]["output_dir"] for r in runs}) == 2
    assert bundle_point(cont) == ({"variant": "cont"}, ["finetune.adapter", "finetune.methods", "finetune.lr"])
    assert bundle_point(by["variant=base,p=0"]) == ({"variant": "base"}, [])
    assert bundle_point({"name": "method=sft,p=0"}) == ({}, [])


@pytest.mark.parametrize("grid, message", [
    ({"variant": [{"align.method": "booster"}]}, "grid axis 'variant' is a bundle axis"),
    ({"variant": ["sft"]}, "grid axis 'variant' is a bundle axis"),
    ({"variant": [{"label": "a"}, {"label": "a", "data.p": 0.5}]}, "grid axis 'variant': two values have the label 'a'"),
    ({"variant": [{"label": "a/b"}]}, "label 'a/b' must be"),
    ({"variant": [{"label": "a", "finetune.adpter": "continue"}]},
     "grid axis 'variant' value 'a': unknown config path 'finetune.adpter'"),
    ({"variant": [{"label": "a", "align.method": {"name": "t_vaccine", "sampled_layer": 1}}]},
     "grid axis 'variant' value 'a'"),
    ({"align.method": ["sft", {"name": "vaccine", "rho": "x"}]}, "grid axis 'align.method' value 'vaccine-rho=x'"),
    ({"align.method": [{"name": "vaccine"}, "vaccine"]}, "two values have the run-folder name part 'vaccine'"),
    ({"variant": [{"label": "a", "data.p": 0.5}], "p": [0, 0.1]}, "grid axes 'variant' and 'p' both set 'data.p'"),
    ({"finetune.lroa.r": [4, 8]}, "unknown config path 'finetune.lroa.r'"),
])
def test_grid_errors_name_the_axis_and_value_in_one_line(config, grid, message, capsys):
    _with_grid(config, grid)
    with pytest.raises(LisaError) as e:
        plan(str(config), [])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert main(["sweep", str(config), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_a_grid_of_plain_values_names_its_runs_as_before(config):
    root, runs = plan(str(config), ["align.method=sft,vaccine", "finetune.lisa.rho=1,10", "method=sft", "seed=0"])
    assert [r["name"] for r in runs][:2] == ["align.method=sft,finetune.lisa.rho=1,method=sft,seed=0",
                                             "align.method=sft,finetune.lisa.rho=10,method=sft,seed=0"]
    with pytest.raises(LisaError, match="plain scalars"):
        parse_grid(["variant=[{label: a"])


REPO = Path(__file__).resolve().parents[1]
FOUR = ["sft", "vlguard", "bso", "lisa"]
TABLE6 = ["na_sft", "sft", "vlguard", "bso", "lisa"]
TABLE2_PAPER = [f"k1-{a}_k2-{1000 - a}" for a in (1000, 900, 700, 500, 300, 100, 0)]
TABLE2_EMBEDDED = [f"k1-{a}_k2-{60 - a}" for a in (60, 54, 42, 30, 18, 6, 0)]
# Every config under configs/paper and configs/embedded: the grid it is planned with (None: its own
# sweep.grid), the number of runs, and the method keys (run folders) its runs fine-tune.
SHIPPED = {
    "configs/paper/llama2-7b-sst2.yaml": (["seed=42"], 1, ["sft", "bso", "lisa"]),  # one run, no sweep.grid
    "configs/paper/table2-k1k2-steps.yaml": (None, 1, TABLE2_PAPER),
    "configs/paper/table3-sst2-poison-ratio.yaml": (None, 4 * 5, FOUR),
    "configs/paper/table4-sample-number.yaml": (None, 6 * 5, ["na_sft", "sft", "ewc", "vlguard", "bso", "lisa"]),
    "configs/paper/table5-models.yaml": (None, 2 * 5, TABLE6),
    "configs/paper/table5-opt.yaml": (None, 5, TABLE6),
    "configs/paper/table6-sst2.yaml": (None, 5, TABLE6),
    "configs/paper/table6-agnews.yaml": (None, 5, TABLE6),
    "configs/paper/table6-gsm8k.yaml": (None, 5, TABLE6),
    "configs/paper/table6-alpacaeval.yaml": (None, 5, TABLE6),
    "configs/paper/table9-rho.yaml": (None, 7, ["lisa"]),
    "configs/paper/booster-sst2-poison-ratio.yaml": (None, 6 * 5, ["sft", "lisa"]),  # variant x p
    "configs/embedded/table2.yaml": (None, 1, TABLE2_EMBEDDED),
    "configs/embedded/table3.yaml": (None, 4 * 3, FOUR),
    "configs/embedded/table4.yaml": (None, 6 * 5, ["na_sft", "sft", "ewc_fresh_lora", "vlguard", "bso", "lisa"]),
    "configs/embedded/table5.yaml": (None, 3 * 5, TABLE6),
    "configs/embedded/table6-sst2.yaml": (None, 5, TABLE6),
    "configs/embedded/table6-agnews.yaml": (None, 5, TABLE6),
    "configs/embedded/table6-gsm8k.yaml": (None, 5, TABLE6),
    "configs/embedded/table6-alpacaeval.yaml": (None, 5, TABLE6),
    "configs/embedded/table9.yaml": (None, 8, ["lisa"]),
    "configs/embedded/defenses.yaml": (None, 6 * 3, ["sft", "lisa"]),  # defense x seed
    "configs/embedded/robustness.yaml": (None, 3 * 3 * 3, ["sft", "lisa"]),  # align.method x lr x epochs
}


def test_every_shipped_config_is_checked():
    found = {str(p.relative_to(REPO)) for d in ("paper", "embedded") for p in (REPO / "configs" / d).glob("*.yaml")}
    assert found == set(SHIPPED)


@pytest.mark.parametrize("path", list(SHIPPED))
def test_shipped_sweep_configs_expand(path):
    grid, n_runs, methods = SHIPPED[path]
    root, runs = plan(str(REPO / path), grid or [])
    assert len(runs) == n_runs
    assert len({r["name"] for r in runs}) == n_runs
    keys = list(dict.fromkeys(m["label"] or m["name"] for r in runs for m in r["finetune"]["methods"]))
    assert keys == methods
    if path.startswith("configs/embedded/"):  # offline: the tiny model and synthetic data only
        assert all(r["model"]["name"] == "tiny" for r in runs)
        for r in runs:
            specs = [r["data"]["user"], r["data"]["harmful"], *r["data"]["alignment"], r["eval"]["harmful"], r["eval"]["task"]]
            assert all(s["source"].startswith("synthetic:") for s in specs)


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.startswith("configs/embedded/")])
def test_embedded_sweep_data_fits_the_synthetic_sources(path, monkeypatch):
    """The largest run of each embedded sweep finds its rows (n within the synthetic sizes, Vlguard's
    1000 alignment rows), and keeps enough evaluation rows after the overlap with training is dropped."""
    from lisa_align.config import validate_config
    from lisa_align.pipeline import load_run_data

    root, runs = plan(str(REPO / path), [])
    raw = max(runs, key=lambda r: r["data"]["n"])
    data = load_run_data(validate_config(raw))
    assert len(data.user) == raw["data"]["n"] and len(data.alignment) >= 1000
    assert len(data.eval_harmful) == 200 and len(data.eval_task) >= 100


def test_shipped_table_grids_hold_the_paper_values():
    def runs(path):
        return plan(str(REPO / path), [])[1]

    for path, cycle in (("configs/paper/table2-k1k2-steps.yaml", 1000), ("configs/embedded/table2.yaml", 60)):
        (run,) = runs(path)
        assert run["finetune"]["lisa"]["rho"] == 0  # BSO
        assert all(m["name"] == "lisa" and m["k1"] + m["k2"] == cycle for m in run["finetune"]["methods"])
    assert [r["data"]["n"] for r in runs("configs/paper/table4-sample-number.yaml")][:5] == [1000, 2000, 3000, 4000, 5000]
    assert [r["finetune"]["lisa"]["rho"] for r in runs("configs/paper/table9-rho.yaml")] == [0, 0.01, 0.1, 0.5, 1, 5, 10]
    t5 = runs("configs/paper/table5-models.yaml") + runs("configs/paper/table5-opt.yaml")
    assert {r["model"]["name"] for r in t5} == {"facebook/opt-2.7b", "meta-llama/Llama-2-7b-hf", "mistralai/Mistral-7B-v0.1"}
    assert all(r["data"]["task"] == "gsm8k" and r["finetune"]["epochs"] == 50 for r in t5)
    assert {r["model"]["tiny"]["num_layers"] for r in runs("configs/embedded/table5.yaml")} == {1, 2, 4}
    for task in ("sst2", "agnews", "gsm8k", "alpacaeval"):
        for r in runs(f"configs/paper/table6-{task}.yaml"):
            assert r["model"]["name"] == "mistralai/Mistral-7B-v0.1"
            assert r["data"]["task"] == task.replace("alpacaeval", "alpaca_eval")
            assert (r["data"]["n"], r["data"]["p"]) == ((700 if task == "alpacaeval" else 5000), 0.1)
            assert r["finetune"]["epochs"] == (50 if task == "gsm8k" else 20)
    (alpaca,) = {json.dumps(r["eval"]) for r in runs("configs/embedded/table6-alpacaeval.yaml")}
    assert json.loads(alpaca)["pairwise_judge_model"] is None  # embedded: generations only


def test_a_sweep_config_with_a_python_tag_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "evil.yaml"
    path.write_text('name: !!python/object/apply:os.system ["echo pwned > ' + str(tmp_path / "pwned") + '"]\n')
    assert main(["sweep", str(path), "--grid", "p=0,0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "!!python/object/apply:os.system" in err and "not allowed" in err
    assert not (tmp_path / "pwned").exists()


def test_sweep_seed_axis_reaches_the_synthetic_training_data(config):
    """A sweep's seed=N run trains on the same synthetic data as `lisa run CONFIG seed=N`: the run seed is
    resolved into the training sources before the run config is written (evaluation sets keep theirs)."""
    from lisa_align.config import load_config, validate_config
    from lisa_align.pipeline import load_run_data

    root, runs = plan(str(config), ["seed=0,1"])
    for raw in runs:
        d = raw["data"]
        assert d["user"]["seed"] == d["harmful"]["seed"] == d["alignment"][0]["seed"] == raw["seed"]
        assert raw["eval"]["harmful"]["seed"] == 7
    swept = load_run_data(validate_config(runs[1]))
    direct = load_run_data(load_config(config, ["seed=1"]))
    assert swept.user == direct.user and swept.alignment == direct.alignment
    assert swept.user != load_run_data(validate_config(runs[0])).user


def test_aligned_key_holds_the_data_the_alignment_defense_reads(monkeypatch):
    from typing import Literal

    from lisa_align.config import config_to_dict, validate_config
    from lisa_align.defenses import DEFENSES, Defense
    from lisa_align.sweep import aligned_key

    def with_harmful(split):
        raw = config_to_dict(validate_config({}))
        raw["data"]["harmful"]["split"] = split
        return raw

    a, b = with_harmful("30k_train"), with_harmful("330k_train")
    assert aligned_key(a) == aligned_key(b)  # sft reads the alignment data only

    class AgainstHarmful(Defense):  # an alignment defense that trains against harmful rows (as Booster does)
        name: Literal["against_harmful"] = "against_harmful"
        stages = ("align",)
        needs = ("harmful",)

    monkeypatch.setitem(DEFENSES, "against_harmful", AgainstHarmful)
    for raw in (a, b):
        raw["align"]["method"] = {"name": "against_harmful", "label": None}
    assert aligned_key(a) != aligned_key(b)


def test_aligned_key_of_an_older_config_is_unchanged():
    """config.yaml of earlier releases spelled the alignment defense as a name plus align.vaccine_rho: the
    same settings give the same key, so a sweep started before an upgrade finds its aligned models."""
    from lisa_align.config import config_to_dict, validate_config
    from lisa_align.sweep import aligned_key

    for method, rho in (("sft", 2.0), ("vaccine", 0.5)):
        new = config_to_dict(validate_config({"align": {"method": {"name": method, **({"rho": rho} if method != "sft" else {})}}}))
        old = {**new, "align": {**{k: v for k, v in new["align"].items() if k != "method"}, "method": method,
                                "vaccine_rho": rho}}
        assert aligned_key(new) == aligned_key(old)
