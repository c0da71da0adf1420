"""The defense contract: every registered defense, run by the pipeline on the micro config,

- trains (its stage's weights move away from the model it starts from),
- writes its artifacts (the adapter or aligned model, and the files it declares),
- ends a run killed after a mid-stage checkpoint and resumed with the same weights as a straight run,
- and reports its bad settings with one line (``lisa run`` exits 2, naming the setting).

Adding a defense adds one entry to ``CONTRACT``; a registered defense without one fails
``test_every_registered_defense_has_a_contract_entry``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lisa_align.cli import main
from lisa_align.config import validate_config
from lisa_align.defenses import DEFENSES
from lisa_align.pipeline import Pipeline
from lisa_align.rundir import EVENT_RESUME
from lisa_align.training.base import BaseTrainer


@dataclass
class Case:
    settings: dict = field(default_factory=dict)  # the defense's entry (beside its name)
    bad: dict = field(default_factory=dict)  # settings that must be refused ...
    error: str = ""  # ... with this fragment in the one-line error
    changes: dict = field(default_factory=dict)  # micro config changes the defense needs


# The reference's EWC continues the alignment LoRA (finetune.adapter: continue), so its run aligns with one.
ALIGNMENT_LORA = {"align.lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
# Lisa (rho=20) and EWC (lambda=1e6) are set strong enough that a resume which lost their checkpointed
# state (the anchor; w0 and the Fisher) ends measurably elsewhere: the resume check would fail.
CONTRACT = {
    "na_sft": Case(bad={"k1": 3}, error="'k1' is not a setting of na_sft"),
    "sft": Case(bad={"rho": 1.0}, error="'rho' is not a setting of sft"),
    "ewc": Case({"ewc_lambda": 1e6}, bad={"ewc_lambda": -1}, error="ewc_lambda", changes=ALIGNMENT_LORA),
    "ewc_fresh_lora": Case({"ewc_lambda": 1e6}, bad={"ewc_lambda": -1}, error="ewc_lambda"),
    "vlguard": Case({"alignment_rows": 8}, bad={"alignment_rows": 99},
                    error="alignment_rows=99 but the alignment data has 16 rows"),
    "bso": Case(bad={"rho": 1.0}, error="bso is Lisa with rho=0"),
    "lisa": Case({"rho": 20.0}, bad={"rho": -1.0}, error="rho=-1.0 must be a finite number >= 0"),
    "vaccine": Case({"rho": 0.5}, bad={"rho": -1.0}, error="rho"),
    "random_vaccine": Case({"rho": 0.5}, bad={"rho": float("nan")}, error="rho"),
    "repnoise": Case({"alpha": 1.0, "beta": 1.0}, bad={"beta": -1.0}, error="beta"),
    "t_vaccine": Case({"rho": 0.5, "sampled_layers": 1, "resample_every": 2, "measure_every": 3, "harmful_rows": 16},
                      bad={"sampled_layers": 0}, error="sampled_layers",
                      changes={"model.tiny.num_layers": 2, "align.epochs": 2}),
    "booster": Case({"lamb": 20.0, "alpha": 0.5}, bad={"lamb": -1.0}, error="lamb"),
    # post-fine-tuning defenses run on one fine-tuned model (sft): Antidote on the micro's full fine-tune (its
    # q/k/v mode), SafeLoRA on a LoRA fine-tune, projecting its least similar layer
    "antidote": Case({"calibration_rows": 8}, bad={"dense_ratio": 1.5}, error="dense_ratio"),
    "safelora": Case({"select": "number", "num_proj_layers": 1}, bad={"threshold": 2.0}, error="threshold",
                     changes={"finetune.lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                                "target_modules": ["q_proj", "v_proj"]}}),
}


class Killed(Exception):
    """Stands for a process killed right after a checkpoint was written."""


def test_every_registered_defense_has_a_contract_entry():
    assert set(CONTRACT) == set(DEFENSES)


def _stage(name: str) -> str:
    """The stage the contract runs a defense in (fine-tuning when it can run there)."""
    return "finetune" if "finetune" in DEFENSES[name].stages else DEFENSES[name].stages[0]


def _config(micro, name: str, settings: dict, run: str = "micro", **changes) -> dict:
    entry = {"name": name, **settings}
    if _stage(name) == "finetune":
        changes = {"finetune.methods": [entry], **changes}
    elif _stage(name) == "post":  # applied to one fine-tuned model
        changes = {"finetune.methods": ["sft"], "post": [entry], **changes}
    else:
        changes = {"align.method": entry, "finetune.methods": [], **changes}
    return micro(**{"name": run, "eval.models": [], **changes})


def _weights(path) -> dict[str, torch.Tensor]:
    """A model's weights, or an adapter's (a LoRA fine-tune, or the alignment LoRA it continues)."""
    path = Path(path)
    return load_file(str(path / ("model.safetensors" if (path / "model.safetensors").is_file()
                                 else "adapter_model.safetensors")))


def _output(cfg, name: str):
    if _stage(name) == "post":
        return cfg.rundir.post_adapter(cfg.post[0].post_key(cfg.finetune.methods[0].key))
    return cfg.rundir.adapter(cfg.finetune.methods[0].key) if _stage(name) == "finetune" else cfg.rundir.aligned


def _post_contract(micro, name: str, case: Case, monkeypatch) -> None:
    """A post defense changes the fine-tuned weights, writes its record, and a run killed while writing
    its result leaves no post folder behind and ends, re-run, with the straight run's weights."""
    import lisa_align.pipeline as pipeline_module
    from lisa_align.rundir import POST_RECORD

    straight = validate_config(_config(micro, name, case.settings, run="straight", **case.changes))
    Pipeline(straight, echo=lambda *_: None).run()
    key = straight.post[0].post_key(straight.finetune.methods[0].key)
    after = _weights(_output(straight, name))
    before = _weights(straight.rundir.adapter(straight.finetune.methods[0].key))
    assert after.keys() == before.keys()
    assert max((after[k].float() - before[k].float()).abs().max().item() for k in after) > 1e-6, "nothing changed"
    assert straight.rundir.post_record(key).is_file()

    killed = validate_config(_config(micro, name, case.settings, run="killed", **case.changes))
    real_write = pipeline_module.atomic_write_json

    def write_then_die(path, obj, *args, **kwargs):
        if Path(path).name == POST_RECORD:  # the model is written already, the record not yet
            raise Killed
        return real_write(path, obj, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "atomic_write_json", write_then_die)
    with pytest.raises(Killed):
        Pipeline(killed, echo=lambda *_: None).run()
    assert not killed.rundir.post(key).exists()
    assert not list(killed.rundir.post(key).parent.glob("*")), "a half-written post folder was left behind"
    monkeypatch.setattr(pipeline_module, "atomic_write_json", real_write)
    Pipeline(killed, echo=lambda *_: None).run()
    again = _weights(_output(killed, name))
    assert after.keys() == again.keys()
    assert max((after[k] - again[k]).abs().max().item() for k in after) <= 1e-6


# Beyond one run per defense: Lisa fine-tuning the alignment LoRA itself (finetune.adapter: continue), whose
# anchor is that adapter's weights.
VARIANTS = {"lisa+continue": ("lisa", Case({"rho": 20.0}, changes={**ALIGNMENT_LORA, "finetune.adapter": "continue"}))}
RUNS = {**{name: (name, case) for name, case in CONTRACT.items()}, **VARIANTS}


@pytest.mark.parametrize("run", list(RUNS))
def test_trains_writes_its_artifacts_and_resumes_exactly(micro, run, monkeypatch):
    name, case = RUNS[run]
    if _stage(name) == "post":
        return _post_contract(micro, name, case, monkeypatch)
    straight = validate_config(_config(micro, name, case.settings, run="straight", **case.changes))
    pipe = Pipeline(straight, echo=lambda *_: None)
    pipe.run()
    out = _output(straight, name)
    trained = _weights(out)
    method = straight.finetune.methods[0] if _stage(name) == "finetune" else None
    if method is not None and pipe.continues_alignment(method):
        start = pipe.ensure_alignment_adapter()  # the LoRA it continues
    else:
        start = pipe.ensure_start_model(method) if method is not None else pipe.ensure_base()
    before = _weights(start)
    moved = max((trained[k].float() - before[k].float()).abs().max().item() for k in trained if k in before)
    assert moved > 1e-4, "the defense did not train"
    if _stage(name) == "finetune":
        method = straight.finetune.resolved()[0]
        for artifact in DEFENSES[name].artifacts:
            assert straight.rundir.artifact(method.key, artifact).is_file(), artifact
        assert straight.rundir.trainer(method.key).is_dir()

    # the same run, killed right after its first checkpoint, then re-run
    killed = validate_config(_config(micro, name, case.settings, run="killed", **case.changes))
    saves, real_save = [], BaseTrainer._save_checkpoint
    kill_at = 1  # fine-tuning: step 3 of 12, between the Lisa switches at 2 and 6 (its anchor is not the weights)

    stage_dir = str(killed.rundir.trainer(killed.finetune.methods[0].key) if _stage(name) == "finetune"
                    else killed.rundir.path / ".aligned.trainer")

    def save_then_die(self, model, trial):
        real_save(self, model, trial)
        if self.args.output_dir == stage_dir:  # the defense's own stage (not the alignment before it)
            saves.append(self.state.global_step)
            if len(saves) == kill_at:
                raise Killed

    monkeypatch.setattr(BaseTrainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        Pipeline(killed, echo=lambda *_: None).run()
    assert not _output(killed, name).exists()
    monkeypatch.setattr(BaseTrainer, "_save_checkpoint", real_save)
    Pipeline(killed, echo=lambda *_: None).run()
    resumed = [r for r in killed.rundir.log_records() if r.get("event") == EVENT_RESUME]
    assert [(r["stage"], r["checkpoint"]) for r in resumed] == [(
        f"finetune/{killed.finetune.methods[0].key}" if _stage(name) == "finetune" else "align",
        f"{stage_dir}/checkpoint-{saves[-1]}")]
    again = _weights(_output(killed, name))
    assert trained.keys() == again.keys()
    assert max((trained[k] - again[k]).abs().max().item() for k in trained) <= 1e-6


@pytest.mark.parametrize("name", list(CONTRACT))
def test_bad_settings_are_one_line(micro, name, tmp_path, capsys):
    case = CONTRACT[name]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_config(micro, name, {**case.settings, **case.bad}, **case.changes)))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lisa: error: "), err
    assert case.error in err
