"""The post-fine-tuning stage: config, run folder, evaluation keys, reuse, report and plan."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from lisa_align.config import validate_config
from lisa_align.errors import LisaError
from lisa_align.pipeline import Pipeline
from lisa_align.plan import format_plan, make_plan
from lisa_align.report import write_report
from lisa_align.rundir import EVENT_POST


def _quiet(cfg):
    return Pipeline(cfg, echo=lambda *_: None)


def test_a_run_evaluates_each_method_and_its_post_processed_model_and_reuses_them(micro, monkeypatch):
    cfg = validate_config(micro(**{"finetune.methods": ["sft", "lisa"], "eval.models": ["aligned", "methods"],
                                   "post": [{"name": "antidote", "calibration_rows": 10}]}))
    summary = _quiet(cfg).run()
    assert list(summary) == ["aligned", "sft", "sft+antidote", "lisa", "lisa+antidote"]  # Lisa + Antidote composes
    for method in ("sft", "lisa"):
        key = f"{method}+antidote"
        record = json.loads(cfg.rundir.post_record(key).read_text())
        assert record["calibration_rows"] == 10 and record["mode"] == "full" and record["pruned"] > 0
        post = load_file(str(cfg.rundir.post_adapter(key) / "model.safetensors"))
        tuned = load_file(str(cfg.rundir.adapter(method) / "model.safetensors"))
        for name, w in post.items():  # only zeros were written, and only into q/k/v
            changed = w != tuned[name]
            assert torch.all(w[changed] == 0)
            assert not changed.any() or name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj")
        assert cfg.rundir.eval(key).metrics.is_file()
    events = [r for r in cfg.rundir.log_records() if r.get("event") == EVENT_POST]
    assert [r["stage"] for r in events] == ["post/sft+antidote", "post/lisa+antidote"]

    # a re-run reuses every post-processed model (and its evaluation)
    import lisa_align.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "load_class", lambda path: pytest.fail(f"ran {path} again"))
    assert _quiet(cfg).run() == summary
    assert len([r for r in cfg.rundir.log_records() if r.get("event") == EVENT_POST]) == 2

    out, _ = write_report(cfg.rundir.path)
    rows = {r["label"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert rows["lisa+antidote"]["method"] == "lisa+antidote" and rows["lisa"]["method"] == "lisa"
    assert rows["lisa+antidote"]["rho"] == rows["lisa"]["rho"] != ""  # the settings of the model it came from
    assert rows["sft+antidote"]["method"] == "sft+antidote" and rows["sft"]["rho"] == ""
    table = (out / "table.md").read_text()
    assert table.index("| sft |") < table.index("| sft+antidote |") < table.index("| lisa |")


def test_eval_models_may_name_a_post_processed_model(micro):
    cfg = validate_config(micro(**{"finetune.methods": ["sft"], "eval.models": ["sft+antidote"],
                                   "post": ["antidote"]}))
    assert Pipeline(cfg).model_keys() == ["sft+antidote"]
    with pytest.raises(LisaError, match=r"unknown model 'sft\+safelora'"):
        validate_config(micro(**{"finetune.methods": ["sft"], "eval.models": ["sft+safelora"], "post": ["antidote"]}))


def test_the_plan_shows_the_post_stage(micro):
    cfg = validate_config(micro(**{"finetune.methods": ["sft", "bso"], "post": ["antidote", "safelora"],
                                   "finetune.lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                                     "target_modules": ["q_proj", "v_proj"]}}))
    text = format_plan(cfg, make_plan(cfg))
    for key in ("sft+antidote", "sft+safelora", "bso+antidote", "bso+safelora"):
        assert f"post {key}: " in text
    assert "dense_ratio=0.1, 2000 calibration rows" in text and "projecting cosine <= 0.5" in text


@pytest.mark.parametrize("post, changes, error", [
    ([{"name": "antidote", "dense_ratio": -0.1}], {}, "post.0.antidote.dense_ratio"),
    ([{"name": "safelora", "threshold": 1.5}], {}, "post.0.safelora.threshold"),
    ([{"name": "safelora", "num_proj_layers": 0}], {}, "num_proj_layers"),
    (["antidote", "antidote"], {}, "two post defenses share the key 'antidote'"),
    (["safelora"], {}, "safelora acts on LoRA adapters, but method 'sft' is a full fine-tune"),
    (["safelora"], {"align.enabled": False, "finetune.lora": {"r": 4}}, "needs an alignment to project onto"),
    (["sft"], {}, "unknown post defense 'sft'"),
    ([{"name": "antidote", "rho": 1}], {}, "'rho' is not a setting of antidote"),
])
def test_bad_post_settings_are_one_line(micro, post, changes, error):
    with pytest.raises(LisaError) as e:
        validate_config(micro(**{"finetune.methods": ["sft"], "post": post, **changes}))
    assert error in str(e.value) and "\n" not in str(e.value)


def test_too_few_harmful_rows_for_the_calibration_is_one_line(micro):
    cfg = validate_config(micro(**{"finetune.methods": ["sft"], "eval.models": [], "post": ["antidote"]}))
    with pytest.raises(LisaError, match="calibration_rows=2000 but the harmful data has"):
        _quiet(cfg).run()
    assert not cfg.rundir.post("sft+antidote").exists()
