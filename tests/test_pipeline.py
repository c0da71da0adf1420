"""The whole pipeline on a micro config (seconds): tiny base -> align -> SFT/BSO/Lisa -> evaluate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from lisa_align.cli import main, preset_path
from lisa_align.config import validate_config
from lisa_align.pipeline import Pipeline


def test_micro_pipeline_end_to_end_and_reuse(micro):
    cfg = validate_config(micro())
    summary = Pipeline(cfg, echo=lambda *_: None).run()
    run = cfg.run_dir
    assert set(summary) == {"base", "aligned", "sft", "bso", "lisa"}
    for key, m in summary.items():
        assert 0 <= m["hs"] <= 100 and 0 <= m["fa"] <= 100 and 0 <= m["over_refusal"] <= 100, key
    assert json.loads((run / "summary.json").read_text()) == summary
    # the alignment rows are tokenised once (align stage), the user rows once for the three methods
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    tok = {(e["stage"], e["part"]): e["cached"] for e in events if e.get("event") == "tokenize"}
    assert (tok[("align", "train")], tok[("finetune/sft", "train")]) == (False, False)
    assert tok[("finetune/bso", "train")] is tok[("finetune/lisa", "train")] is True
    assert tok[("finetune/bso", "alignment")] is tok[("finetune/lisa", "alignment")] is True
    assert yaml.safe_load((run / "config.yaml").read_text())["finetune"]["lisa"]["k1"] == 2
    assert (run / "aligned" / "model.safetensors").exists()
    for key in ("sft", "bso", "lisa"):
        assert (run / "finetune" / key / "adapter" / "model.safetensors").exists()
        for split, n in (("harmful", 6), ("task", 6), ("benign", 4)):
            lines = (run / "eval" / key / "predictions" / f"{split}.jsonl").read_text().splitlines()
            assert len(lines) == n
    switches = json.loads((run / "finetune" / "lisa" / "lisa_switches.json").read_text())
    # n=24, batch 4 -> 6 steps/epoch, 2 epochs -> T=12; K1=2, K2=4 -> switches at 2, 6, 8
    assert [s["lisa/step"] for s in switches] == [2, 6, 8]
    assert [s["lisa/state"] for s in switches] == ["finetune", "alignment", "finetune"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"align", "finetune/sft", "finetune/bso", "finetune/lisa"} <= {r.get("stage") for r in log}

    # A re-run reuses every finished stage: nothing is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    stamps |= {p: p.stat().st_mtime_ns for p in run.rglob("metrics.json")}
    again = Pipeline(cfg, echo=lambda *_: None).run()
    assert again == summary
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


def test_micro_pipeline_lora_adapters(micro):
    lora_align = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}
    lora_ft = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    cfg = validate_config(micro(**{"align.lora": lora_align, "finetune.lora": lora_ft,
                                   "finetune.methods": ["lisa"], "eval.models": ["methods"]}))
    Pipeline(cfg, echo=lambda *_: None).run()
    run = cfg.run_dir
    # the alignment LoRA is merged: a plain model without adapter weights
    from safetensors import safe_open

    with safe_open(run / "aligned" / "model.safetensors", "pt") as f:
        assert not any("lora" in k for k in f.keys())
    adapter = run / "finetune" / "lisa" / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
    assert (run / "eval" / "lisa" / "metrics.json").exists()


def test_run_dir_with_different_config_is_refused(tmp_path, capsys, micro):
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(micro(**{"eval.models": ["base"]})))
    assert main(["run", str(path)]) == 0
    assert main(["run", str(path), "data.p=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lisa: error:") and "\n" not in err and "data.p: 0.25 -> 0.5" in err and "--force" in err


def test_demo_preset_is_valid_and_cli_prints_summary_path(tmp_path, capsys, micro):
    cfg = yaml.safe_load(preset_path("demo").read_text())
    assert cfg["finetune"]["methods"] == ["sft", "bso", "lisa"]
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(micro(**{"finetune.methods": ["sft"], "eval.models": ["methods"]})))
    assert main(["run", str(path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith("summary.json") and os.path.exists(last)
    assert set(json.loads(open(last).read())["sft"]) == {"hs", "fa", "over_refusal"}


def test_na_sft_starts_from_base_and_vlguard_mixes_alignment_rows(micro):
    methods = ["na_sft", {"name": "vlguard", "alignment_rows": 8, "mode": "append"}]
    cfg = validate_config(micro(**{"finetune.methods": methods, "eval.models": ["methods"]}))
    said: list[str] = []
    pipe = Pipeline(cfg, echo=said.append)
    loaded: list[str] = []
    real_load = pipe._load
    pipe._load = lambda path: (loaded.append(str(path)), real_load(path))[1]
    pipe.run()
    base, aligned = pipe.ensure_base(), pipe.ensure_aligned()
    # na_sft trains from the unaligned base; then the align stage loads the base; vlguard trains from aligned
    assert loaded[:3] == [base, base, aligned]
    assert any("finetune na_sft: 24 rows" in s and "unaligned base" in s for s in said)
    assert any("finetune vlguard: 32 rows (n=24" in s for s in said)  # 24 user rows + 8 alignment rows
    assert pipe.ensure_start_model(cfg.finetune.method("na_sft")) == base
    for key in ("na_sft", "vlguard"):
        assert (cfg.run_dir / "eval" / key / "metrics.json").exists()


@pytest.mark.parametrize("align_method", ["vaccine", "random_vaccine"])
def test_vaccine_alignment_then_lisa(monkeypatch, align_method, micro):
    from lisa_align.training.vaccine import VaccineTrainer

    steps = []
    real = VaccineTrainer.training_step
    monkeypatch.setattr(VaccineTrainer, "training_step", lambda self, *a, **k: steps.append(
        self.args.vaccine_random) or real(self, *a, **k))
    cfg = validate_config(micro(**{"align.method": align_method, "align.vaccine_rho": 0.5,
                                   "finetune.methods": ["lisa"], "eval.models": ["methods"]}))
    said: list[str] = []
    Pipeline(cfg, echo=said.append).run()
    assert steps and set(steps) == {align_method == "random_vaccine"}  # 16 rows, batch 8: 2 steps
    assert len(steps) == 2
    assert any(f"align ({align_method})" in s for s in said)
    assert (cfg.run_dir / "eval" / "lisa" / "metrics.json").exists()


def test_ewc_runs_in_the_pipeline(micro):
    cfg = validate_config(micro(**{"finetune.methods": [{"name": "ewc_fresh_lora", "ewc_lambda": 0.5, "label": "ewc"}],
                                   "eval.models": ["methods"]}))
    summary = Pipeline(cfg, echo=lambda *_: None).run()
    assert set(summary) == {"ewc"}
    assert (cfg.run_dir / "finetune" / "ewc" / "adapter" / "model.safetensors").exists()


ALIGN_LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def test_continue_fine_tunes_the_alignment_lora(micro):
    """finetune.adapter: continue (the reference's single-LoRA mode): the alignment LoRA is kept beside the
    merged model and fine-tuned itself on the base; Lisa's anchor is that adapter's weights; evaluation
    merges the continued adapter into the base. The reference's EWC always continues."""
    from safetensors.torch import load_file

    cfg = validate_config(micro(**{"align.lora": ALIGN_LORA, "finetune.adapter": "continue",
                                   "finetune.lora": {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj"]},
                                   "finetune.methods": ["lisa", "ewc"], "eval.models": ["aligned", "methods"]}))
    said: list[str] = []
    pipe = Pipeline(cfg, echo=said.append)
    summary = pipe.run()
    assert set(summary) == {"aligned", "lisa", "ewc"}
    start = load_file(str(cfg.rundir.aligned / "alignment_adapter" / "adapter_model.safetensors"))
    for key in ("lisa", "ewc"):
        tuned = load_file(str(cfg.rundir.adapter(key) / "adapter_model.safetensors"))
        assert tuned.keys() == start.keys()  # the alignment LoRA (q and v, r=4), not a new q-only r=2 one
        assert any("v_proj" in k for k in tuned) and tuned[next(iter(tuned))].shape == start[next(iter(start))].shape
        assert max((tuned[k] - start[k]).abs().max().item() for k in tuned) > 1e-4
        assert pipe.ensure_start_model(cfg.finetune.method(key)) == pipe.ensure_base()
    assert any("finetune lisa:" in s and "continuing the alignment LoRA" in s for s in said)


def test_continue_needs_an_alignment_lora(micro):
    from lisa_align.errors import LisaError

    with pytest.raises(LisaError, match=r"ewc\) fine-tunes the alignment LoRA itself.*set align.lora.*ewc_fresh_lora"):
        validate_config(micro(**{"finetune.methods": ["ewc"]}))  # the micro config aligns without LoRA


def test_vlguard_needs_enough_alignment_rows(micro):
    from lisa_align.errors import LisaError

    cfg = validate_config(micro(**{"finetune.methods": [{"name": "vlguard", "alignment_rows": 99}],
                                   "eval.models": ["methods"]}))
    with pytest.raises(LisaError, match="alignment_rows=99 but the alignment data has 16 rows"):
        Pipeline(cfg, echo=lambda *_: None).run()


def test_evaluate_rejudges_saved_predictions(tmp_path, capsys, micro):
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(micro(**{"finetune.methods": ["sft"], "eval.models": ["methods"]})))
    assert main(["run", str(path)]) == 0
    run = tmp_path / "runs" / "micro"
    preds = run / "eval" / "sft" / "predictions" / "harmful.jsonl"
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    for i, r in enumerate(rows):  # plant known answers: the first two refuse, the rest comply
        r["answer"] = "i am sorry , but i cannot help with that ." if i < 2 else "sure , here is how ."
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["evaluate", str(run), "--judge", "refusal"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].endswith("summary.json")
    hs = 100 * (len(rows) - 2) / len(rows)
    assert json.loads((run / "summary.json").read_text())["sft"]["hs"] == pytest.approx(hs)
    assert json.loads((run / "eval" / "sft" / "metrics.json").read_text())["hs"] == pytest.approx(hs)
    assert main(["evaluate", str(tmp_path), "--judge", "refusal"]) == 2

    # a second judge: the agreement with the previous one is recorded (fake judge: flags the first two)
    from lisa_align.evaluation import JUDGES, Judge, Verdict

    class FirstTwo(Judge):
        name = "firsttwo"

        def score(self, prompts, answers):
            return [Verdict(flagged=i < 2) for i in range(len(answers))]

    JUDGES["firsttwo"] = FirstTwo
    try:
        assert main(["evaluate", str(run), "--judge", "firsttwo"]) == 0
    finally:
        del JUDGES["firsttwo"]
    m = json.loads((run / "eval" / "sft" / "metrics.json").read_text())
    assert m["judge"] == "firsttwo" and m["hs"] == pytest.approx(100 * 2 / len(rows))
    # refusal flagged rows 2-5 and firsttwo flags rows 0-1: no agreement at all; with marginals 4/6 and
    # 2/6 the chance agreement is 4/9, so kappa = (0 - 4/9) / (1 - 4/9) = -0.8
    assert len(rows) == 6
    assert m["judge_agreement"]["refusal~firsttwo"]["cohen_kappa"] == pytest.approx(-0.8)


def test_vlguard_replace_keeps_n_rows_and_the_data_record_names_the_hs_protocol(micro):
    """Lisa's reference Vlguard: the alignment rows take the place of benign user rows (n = 24, p = 0.25:
    6 harmful + int(0.75·24 - 8) = 10 benign + 8 alignment rows); the data record says which HS prompts ran."""
    cfg = validate_config(micro(**{"finetune.methods": [{"name": "vlguard", "alignment_rows": 8}],
                                   "eval.models": ["methods"]}))
    said: list[str] = []
    pipe = Pipeline(cfg, echo=said.append)
    pipe.run()
    assert any("finetune vlguard: 24 rows (n=24" in s and "8 alignment rows in place of benign rows" in s for s in said)
    records = [json.loads(line) for line in cfg.rundir.log.read_text().splitlines()]
    (data,) = [r for r in records if r.get("event") == "data"]
    assert data["hs_protocol"] == pipe.load_data().hs_protocol == "lisa"  # the micro config's eval.harmful: n=6
    assert data["eval_harmful"] == 6 and data["eval_rows_dropped_as_overlap"] == {}
    assert data["eval_harmful_duplicates_dropped"] == 0


def test_metrics_record_how_the_rows_were_chosen(micro):
    cfg = validate_config(micro(**{"finetune.methods": ["sft"], "eval.models": ["base"], "eval.drop_overlap": True}))
    said: list[str] = []
    Pipeline(cfg, echo=said.append).run()
    metrics = json.loads((cfg.run_dir / "eval" / "base" / "metrics.json").read_text())
    assert metrics["hs_protocol"] == cfg.eval.hs_protocol and metrics["drop_overlap"] is True
    assert metrics["fa_rule"] == "exact" and set(metrics["eval_rows_dropped_as_overlap"]) == {"harmful", "task", "benign"}
    assert any(s.startswith("[lisa] eval.drop_overlap: dropped ") for s in said)


def test_threads_setting_sets_and_logs_torch_threads(micro, monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        cfg = validate_config(micro(threads=1))
        Pipeline(cfg, echo=lambda *_: None).start()
        assert torch.get_num_threads() == 1
        record = next(json.loads(x) for x in (cfg.run_dir / "log.jsonl").read_text().splitlines()
                      if json.loads(x).get("event") == "model")
        assert record["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_switch_log_says_whether_the_proximal_term_was_applied(micro):
    """A switch inside the proximal warm-up reports no term (none was applied), one after it the term."""
    cfg = validate_config(micro(**{"finetune.methods": [{"name": "lisa", "proximal_warmup_ratio": 0.5}],
                                   "eval.models": []}))
    Pipeline(cfg, echo=lambda *_: None).run()
    switches = json.loads((cfg.run_dir / "finetune" / "lisa" / "lisa_switches.json").read_text())
    # T = 12, switches at 2, 6, 8; the term is on for steps > 6: off before the switches at 2 and 6
    assert [(s["lisa/step"], s["lisa/proximal_active"]) for s in switches] == [(2, False), (6, False), (8, True)]
    assert switches[0]["lisa/proximal_term"] == 0.0 and switches[2]["lisa/proximal_term"] > 0


def test_fewer_than_two_bi_state_cycles_is_warned(micro, caplog):
    import logging

    cfg = validate_config(micro(**{"finetune.methods": [{"name": "bso", "k1": 4, "k2": 8},
                                                        {"name": "lisa", "label": "two_cycles"}],
                                   "eval.models": []}))
    with caplog.at_level(logging.WARNING, logger="lisa_align.training.lisa"):
        Pipeline(cfg, echo=lambda *_: None).run()
    warned = [r.getMessage() for r in caplog.records if "bi-state cycles" in r.getMessage()]
    assert warned == ["Lisa/BSO runs 1.00 bi-state cycles (K1+K2=12 over 12 steps): fewer than 2, so it never "
                      "returns to alignment after fine-tuning; lower K1/K2 (the paper: one cycle per epoch)"]


def test_stages_run_in_parallel_processes_and_equal_a_sequential_run(micro):
    """--jobs 2: the base is evaluated in a worker while the main process aligns; then the methods train,
    and every model is evaluated, in 2 spawned processes (one thread each here). Weights, switch logs,
    generations and the summary equal a sequential run's; the run log says which process did each stage."""
    import os

    from safetensors.torch import load_file

    runs = {}
    for name, jobs in (("seq", 1), ("par", 2)):
        cfg = validate_config(micro(name=name, threads=1, **{"finetune.methods": ["sft", "lisa"],
                                                            "eval.models": ["base", "aligned", "methods"]}))
        said: list[str] = []
        runs[name] = (cfg, Pipeline(cfg, echo=said.append).run(jobs=jobs), said)
    (seq, s1, _), (par, s2, said) = runs["seq"], runs["par"]
    assert "[lisa] --jobs 2: stages in 2 processes, 1 thread(s) each" in said
    assert list(s1) == ["base", "aligned", "sft", "lisa"] and s1 == s2
    for key in ("sft", "lisa"):
        a = load_file(str(seq.rundir.adapter(key) / "model.safetensors"))
        b = load_file(str(par.rundir.adapter(key) / "model.safetensors"))
        assert all(bool((a[k] == b[k]).all()) for k in a), key
    assert (json.loads(seq.rundir.artifact("lisa", "lisa_switches.json").read_text())
            == json.loads(par.rundir.artifact("lisa", "lisa_switches.json").read_text()))
    for key in s1:
        for part in ("harmful", "task"):
            assert ((seq.rundir.eval(key).path / "predictions" / f"{part}.jsonl").read_text()
                    == (par.rundir.eval(key).path / "predictions" / f"{part}.jsonl").read_text()), (key, part)

    def pids(cfg) -> dict[str, int]:
        return {r["stage"]: r["pid"] for r in map(json.loads, cfg.rundir.log.read_text().splitlines())
                if r.get("event") == "stage_done"}

    assert set(pids(seq).values()) == {os.getpid()}
    done = pids(par)
    assert done["align"] == done["pipeline"] == os.getpid()  # the main process aligns
    workers = {done[s] for s in ("evaluate base", "evaluate aligned", "finetune sft", "finetune lisa",
                                 "evaluate sft", "evaluate lisa")}
    assert os.getpid() not in workers and 1 <= len(workers) <= 2


def test_answers_from_the_base_model_are_generated_once_and_cached(micro, monkeypatch):
    """data.harmful.answers: base_model: the attack's harmful answers are the unaligned base's own greedy
    answers, generated once per distinct prompt into the user's cache and filled into the rows; a second
    run reads the cache. answers: refusal_templates writes alignment refusals without a model."""
    import lisa_align.pipeline as pipeline_module
    from lisa_align.data.answers import REFUSALS

    prompts_seen: list[str] = []

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size=32, desc="generate", **kw):
        prompts_seen.extend(prompts)
        return [f"Sure, here is how to {i} (placeholder)" for i, _ in enumerate(prompts)]

    monkeypatch.setattr(pipeline_module, "generate", fake_generate)
    changes = {"data.harmful.answers": "base_model", "data.generated_max_new_tokens": 8,
               "data.alignment": [{"source": "synthetic:beavertails", "split": "30k_train", "filter": "safe", "n": 16,
                                   "size": 100, "answers": "refusal_templates"}],
               "finetune.methods": ["sft"], "eval.models": []}
    cfg = validate_config(micro(**changes))
    pipe = Pipeline(cfg, echo=lambda *_: None)
    pipe.run()
    harmful = [r for r in pipe.load_data().user if r["harmful"]]
    assert len(harmful) == 6 and all(r["output"].startswith("Sure, here is how to") for r in harmful)
    assert not any("answer_pending" in r for r in pipe.load_data().user)
    assert 6 <= len(prompts_seen) == len(set(prompts_seen))  # every distinct harmful prompt, once
    assert all(r["output"] in REFUSALS for r in pipe.load_data().alignment)
    cached = list((Path(os.environ["LISA_ALIGN_CACHE"]) / "answers").glob("*.jsonl"))
    assert len(cached) == 1
    n = len(prompts_seen)
    again = Pipeline(validate_config(micro(name="again", **changes)), echo=lambda *_: None)
    again.run()
    assert len(prompts_seen) == n  # read from the cache, not generated again
    assert [r["output"] for r in again.load_data().user] == [r["output"] for r in pipe.load_data().user]
