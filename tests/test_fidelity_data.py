"""Data fidelity to the Lisa reference (git-disl/Lisa): the HS prompt protocols of the paper and its peers,
``sample: first`` (the first rows of each source), Vlguard's ``mode: replace`` and the opt-in overlap removal.

The BeaverTails-like files here hold placeholder text only: unsafe answers are "Sure, here is how to ..."
with no content."""

from __future__ import annotations

import json
import random

import pytest

from lisa_align.config import config_to_dict, load_config, validate_config
from lisa_align.data.hs_protocols import HS_PRESETS, hs_prompt_spec
from lisa_align.data.mixing import dedup_prompts, harmful_count, mix_harmful
from lisa_align.data.sources import SourceSpec, load_rows
from lisa_align.defenses.vlguard import Vlguard
from lisa_align.errors import LisaError
from lisa_align.pipeline import load_run_data

ROWS = 1600


def _prompt(i: int) -> str:
    """Row 1, 51, 101, ... repeats the prompt of the row before it (BeaverTails pairs a prompt with several
    responses)."""
    return f"placeholder question {i - 1 if i % 50 == 1 else i}"


def _is_safe(i: int) -> bool:
    return i % 3 == 0


def _beavertails_rows() -> list[dict]:
    rows = []
    for i in range(ROWS):
        safe = _is_safe(i)
        rows.append({"prompt": _prompt(i),
                     "response": "I cannot help with that." if safe else f"Sure, here is how to do step {i} ...",
                     "category": {"animal_abuse": False, "violence,aiding_and_abetting,incitement": not safe},
                     "is_safe": safe})
    return rows


@pytest.fixture
def beavertails(tmp_path):
    """A local JSONL file in BeaverTails' schema (prompt, response, category, is_safe)."""
    path = tmp_path / "beavertails_30k_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _beavertails_rows()))
    return str(path)


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"task row {i}", "input": "", "output": "ok"}) + "\n"
                            for i in range(200)))
    return str(path)


def _unsafe_indices() -> list[int]:
    return [i for i in range(ROWS) if not _is_safe(i)]


# ---------------------------------------------------------------------------------------------
# HS prompt protocols
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol, expected", [
    ("lisa", list(range(1000))),  # the first 1000 rows, unfiltered (safe responses included)
    ("booster", _unsafe_indices()[:1000]),  # the first 1000 with is_safe false
    ("vaccine", _unsafe_indices()[:500]),  # the first 500 with is_safe false
    ("custom", list(range(ROWS))),  # eval.harmful as written: every row
])
def test_hs_protocols_select_the_reference_rows(beavertails, protocol, expected):
    cfg = load_config(None, [f"eval.hs_protocol={protocol}", f"eval.harmful={{source: '{beavertails}'}}"])
    rows = load_rows(cfg.eval.harmful)
    assert [r["instruction"] for r in rows] == [_prompt(i) for i in expected]
    assert (cfg.eval.harmful.source, cfg.eval.harmful.sample) == (beavertails, "first")
    assert validate_config(config_to_dict(cfg)) == cfg  # config.yaml holds the rows really used


def test_hs_protocol_defaults_and_the_preset_table():
    cfg = load_config(None, [])
    e = cfg.eval
    assert (e.hs_protocol, e.dedup_prompts, e.drop_overlap) == ("lisa", False, False)
    assert (e.harmful.source, e.harmful.split, e.harmful.filter, e.harmful.n, e.harmful.sample) == (
        "PKU-Alignment/BeaverTails", "30k_test", None, 1000, "first")
    assert {k: tuple(v) for k, v in HS_PRESETS.items()} == {
        "lisa": (None, 1000, "first"), "booster": ("unsafe", 1000, "first"), "vaccine": ("unsafe", 500, "first")}
    vaccine = load_config(None, ["eval.hs_protocol=vaccine"]).eval.harmful
    assert (vaccine.split, vaccine.filter, vaccine.n) == ("30k_test", "unsafe", 500)
    # the source and split come from eval.harmful; the protocol decides filter, n and sample
    other = load_config(None, ["eval.hs_protocol=booster", "eval.harmful.split=30k_train"]).eval.harmful
    assert (other.split, other.filter, other.n) == ("30k_train", "unsafe", 1000)


def test_hs_protocol_with_a_written_eval_harmful(beavertails):
    # a smaller n: the protocol's first n prompts (a quick run)
    cfg = load_config(None, ["eval.hs_protocol=booster", f"eval.harmful={{source: '{beavertails}', n: 10}}"])
    assert [r["instruction"] for r in load_rows(cfg.eval.harmful)] == [_prompt(i) for i in _unsafe_indices()[:10]]
    # values that agree are fine; values that disagree are refused in one line
    load_config(None, ["eval.hs_protocol=vaccine", f"eval.harmful={{source: '{beavertails}', filter: unsafe, n: 500}}"])
    for protocol, written, fragment in (
            ("vaccine", "n: 1000", "harmful.n=1000 but hs_protocol 'vaccine' takes the first 500 rows"),
            ("lisa", "filter: unsafe", "harmful.filter=unsafe but hs_protocol 'lisa' takes the first 1000 rows, "
                                       "unfiltered"),
            ("booster", "sample: random", "harmful.sample=random but hs_protocol 'booster'"),
            ("lisa", "n: null", "harmful.n=None")):
        with pytest.raises(LisaError) as e:
            load_config(None, [f"eval.hs_protocol={protocol}", f"eval.harmful={{source: '{beavertails}', {written}}}"])
        assert fragment in str(e.value) and "hs_protocol: custom" in str(e.value) and "\n" not in str(e.value)
    # custom: exactly as written
    cfg = load_config(None, ["eval.hs_protocol=custom", f"eval.harmful={{source: '{beavertails}', filter: safe, n: 3}}"])
    assert [r["instruction"] for r in load_rows(cfg.eval.harmful)] == [_prompt(i) for i in (0, 3, 6)]
    with pytest.raises(LisaError, match="eval.hs_protocol"):
        load_config(None, ["eval.hs_protocol=beavertails"])


def test_hs_prompt_spec_keeps_the_protocol_fields_unwritten():
    spec = SourceSpec(source="PKU-Alignment/BeaverTails", split="30k_test", n=1000)
    lisa = hs_prompt_spec("lisa", spec)  # the default eval.harmful: nothing written by the config
    assert lisa.model_fields_set == {"source", "split"}
    assert hs_prompt_spec("vaccine", lisa).n == 500
    assert hs_prompt_spec("custom", spec) is spec


def _run_config(beavertails, task_file, **changes) -> dict:
    raw = {"seed": 3,
           "data": {"n": 100, "p": 0.1, "user": {"source": task_file}, "harmful": {"source": beavertails,
                                                                                  "filter": "unsafe"},
                    "alignment": []},
           "eval": {"harmful": {"source": beavertails}, "task": {"source": "synthetic:sst2", "split": "validation",
                                                                 "n": 10, "seed": 7}}}
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


def test_dedup_prompts_keeps_the_first_row_of_each_prompt(beavertails, task_file):
    rows = load_rows(SourceSpec(source=beavertails, n=1000))
    kept, dropped = dedup_prompts(rows)
    assert dropped == 20 and len(kept) == 980  # rows 1, 51, ..., 951 repeat the row before
    assert kept == [r for i, r in enumerate(rows) if i % 50 != 1]
    data = load_run_data(validate_config(_run_config(beavertails, task_file, **{"eval.dedup_prompts": True})))
    assert [r["instruction"] for r in data.eval_harmful] == [r["instruction"] for r in kept]
    assert data.dropped_duplicates == 20 and data.hs_protocol == "lisa"
    plain = load_run_data(validate_config(_run_config(beavertails, task_file)))
    assert len(plain.eval_harmful) == 1000 and plain.dropped_duplicates == 0


# ---------------------------------------------------------------------------------------------
# sample: first | random
# ---------------------------------------------------------------------------------------------
BENIGN = [{"instruction": f"b{i}", "input": "", "output": "ok"} for i in range(6000)]
HARMFUL = [{"instruction": f"h{i}", "input": "", "output": "Sure, here is how to ..."} for i in range(1000)]


def test_sample_first_takes_the_first_rows(task_file):
    spec = SourceSpec(source=task_file, n=7)
    full = load_rows(SourceSpec(source=task_file))
    assert spec.sample == "first" and load_rows(spec) == full[:7]
    picked = load_rows(spec.model_copy(update={"sample": "random", "seed": 5}))
    assert len(picked) == 7 and picked != full[:7] and all(r in full for r in picked)
    assert picked == sorted(picked, key=full.index)  # in source order
    assert picked == load_rows(spec.model_copy(update={"sample": "random", "seed": 5}))  # seeded
    assert picked != load_rows(spec.model_copy(update={"sample": "random", "seed": 6}))
    assert load_rows(SourceSpec(source=task_file, skip=3, n=2)) == full[3:5]  # after skip


@pytest.mark.parametrize("n, p", [(5000, 0.1), (1000, 0.3), (700, 0.1), (3, 0.5)])
def test_mixing_first_takes_the_first_harmful_and_benign_rows(n, p):
    rows = mix_harmful(BENIGN, HARMFUL, n=n, p=p, seed=0, benign_sample="first", harmful_sample="first")
    k = harmful_count(n, p)
    assert rows == [dict(r, harmful=True) for r in HARMFUL[:k]] + [dict(r, harmful=False) for r in BENIGN[: n - k]]
    assert rows == mix_harmful(BENIGN, HARMFUL, n=n, p=p, seed=9, benign_sample="first", harmful_sample="first")


def test_mixing_counts_equal_the_references_int_for_the_papers_configurations():
    """The reference counts int(p·n) harmful and int((1-p)·n) benign rows; round(p·n) and n - round(p·n)
    are the same for every (n, p) of the paper, so the count rule needs no setting."""
    paper = [(5000, p) for p in (0.0, 0.05, 0.1, 0.2, 0.3)] + [(n, 0.1) for n in (700, 1000, 2000, 3000, 4000, 5000)]
    for n, p in paper:
        assert harmful_count(n, p) == int(p * n) and n - harmful_count(n, p) == int((1 - p) * n), (n, p)


def test_mixing_random_is_todays_seeded_sample():
    rows = mix_harmful(BENIGN, HARMFUL, n=200, p=0.1, seed=4)
    rng = random.Random(4)
    expected = [dict(r, harmful=True) for r in rng.sample(HARMFUL, 20)]
    expected += [dict(r, harmful=False) for r in rng.sample(BENIGN, 180)]
    rng.shuffle(expected)
    assert rows == expected


def test_config_sources_default_to_first_and_the_demo_keeps_random():
    from lisa_align.cli import preset_path

    cfg = load_config(None, [])
    assert cfg.data.user.sample == cfg.data.harmful.sample == "first"
    assert all(s.sample == "first" for s in cfg.data.alignment)
    demo = load_config(preset_path("demo"))
    assert demo.data.user.sample == demo.data.harmful.sample == "random"
    assert (demo.eval.hs_protocol, demo.eval.drop_overlap, demo.eval.dedup_prompts) == ("custom", True, False)


def test_run_data_user_set_is_the_first_rows_of_each_source(beavertails, task_file):
    data = load_run_data(validate_config(_run_config(beavertails, task_file)))
    unsafe = _unsafe_indices()
    assert [r["instruction"] for r in data.user] == (
        [_prompt(i) for i in unsafe[:10]] + [f"task row {i}" for i in range(90)])
    assert [r["harmful"] for r in data.user] == [True] * 10 + [False] * 90
    swept = load_run_data(validate_config(_run_config(beavertails, task_file, seed=4)))
    assert swept.user == data.user  # the first rows do not depend on the seed
    rand = load_run_data(validate_config(_run_config(beavertails, task_file, **{"data.user.sample": "random",
                                                                                "data.harmful.sample": "random"})))
    assert sorted(r["instruction"] for r in rand.user) != sorted(r["instruction"] for r in data.user)


# ---------------------------------------------------------------------------------------------
# Vlguard: replace (Lisa's reference) | append (the Vaccine repo)
# ---------------------------------------------------------------------------------------------
GUIDE = [{"instruction": f"a{i}", "input": "", "output": "I cannot help with that."} for i in range(1000)]


def _user(n: int, p: float) -> list[dict]:
    return mix_harmful(BENIGN, HARMFUL, n=n, p=p, seed=0, benign_sample="first", harmful_sample="first")


def test_vlguard_replace_keeps_n_rows_with_the_references_counts():
    n, p, guide = 5000, 0.1, 1000
    rows = Vlguard(alignment_rows=guide).training_rows(_user(n, p), {"alignment": GUIDE})
    assert Vlguard().mode == "replace" and len(rows) == n
    harmful = [r for r in rows if r["harmful"]]
    benign = [r for r in rows if not r["harmful"] and r["instruction"].startswith("b")]
    added = [r for r in rows if r["instruction"].startswith("a")]
    assert (len(benign), len(harmful), len(added)) == (3500, 500, 1000)
    assert len(benign) == int((1 - p) * n - guide)  # the reference's normal_num
    assert benign == [dict(r, harmful=False) for r in BENIGN[:3500]]  # the first benign rows
    assert harmful == [dict(r, harmful=True) for r in HARMFUL[:500]]
    assert added == [dict(r, harmful=False) for r in GUIDE]


def test_vlguard_replace_on_the_contract_micro_config():
    """n = 24, p = 0.25, alignment_rows = 8: int(0.75·24 - 8) = 10 benign + 6 harmful + 8 alignment rows."""
    rows = Vlguard(alignment_rows=8).training_rows(_user(24, 0.25), {"alignment": GUIDE[:16]})
    assert len(rows) == 24 and sum(r["harmful"] for r in rows) == 6
    assert sum(r["instruction"].startswith("b") for r in rows) == 10


def test_vlguard_replace_with_more_guide_than_benign_rows_keeps_none_as_the_reference():
    """n = 1000, p = 0.1, 1000 guide rows: the reference's normal_num is negative, its loop keeps no benign
    row, and it trains on 100 harmful + 1000 guide rows (paper Table 4's n = 1000 column)."""
    rows = Vlguard(alignment_rows=1000).training_rows(_user(1000, 0.1), {"alignment": GUIDE})
    assert len(rows) == 1100 and sum(r["harmful"] for r in rows) == 100
    assert not any(r["instruction"].startswith("b") for r in rows)
    rows = Vlguard(alignment_rows=900).training_rows(_user(1000, 0.1), {"alignment": GUIDE})
    assert len(rows) == 1000 and sum(r["harmful"] for r in rows) == 100  # no benign user row left
    with pytest.raises(LisaError, match="alignment_rows=1000 but the alignment data has 16 rows"):
        Vlguard(alignment_rows=1000).training_rows(_user(5000, 0.1), {"alignment": GUIDE[:16]})


def test_finetune_defaults_reach_a_bare_method_name():
    """A sweep's grid names methods bare (method=vlguard): finetune.defaults gives them their settings."""
    cfg = load_config(None, ["finetune.defaults={vlguard: {mode: append, alignment_rows: 7}}",
                             "finetune.methods=[vlguard, {name: vlguard, label: v2, mode: replace}]"])
    a, b = cfg.finetune.methods
    assert (a.mode, a.alignment_rows) == ("append", 7) and (b.mode, b.alignment_rows) == ("replace", 7)
    with pytest.raises(LisaError, match="defaults: unknown method 'vlgaurd'.*did you mean 'vlguard'"):
        load_config(None, ["finetune.defaults={vlgaurd: {mode: append}}"])


def test_vlguard_append_adds_the_alignment_rows():
    user = _user(1000, 0.1)
    rows = Vlguard(alignment_rows=1000, mode="append").training_rows(user, {"alignment": GUIDE})
    assert rows == user + [dict(r, harmful=False) for r in GUIDE]
    with pytest.raises(LisaError, match="mode"):
        load_config(None, ['finetune.methods=[{name: vlguard, mode: prepend}]'])


# ---------------------------------------------------------------------------------------------
# eval.drop_overlap
# ---------------------------------------------------------------------------------------------
def test_drop_overlap_is_opt_in_and_counts_what_it_drops(beavertails, task_file):
    keep = load_run_data(validate_config(_run_config(beavertails, task_file)))
    trained = {r["instruction"] for r in keep.user}
    overlapping = [r for r in keep.eval_harmful if r["instruction"] in trained]
    # the user set's 10 harmful prompts; row 0 (safe) asks the prompt of row 1 (unsafe, trained on) too
    assert len(keep.eval_harmful) == 1000 and len(overlapping) == 11
    assert keep.dropped_overlap == {}
    drop = load_run_data(validate_config(_run_config(beavertails, task_file, **{"eval.drop_overlap": True})))
    assert drop.dropped_overlap == {"harmful": 11, "task": 0}
    assert drop.eval_harmful == [r for r in keep.eval_harmful if r["instruction"] not in trained]
    assert drop.eval_task == keep.eval_task


def test_drop_overlap_that_leaves_no_rows_is_one_line(beavertails, task_file):
    raw = _run_config(beavertails, task_file, **{"eval.drop_overlap": True, "eval.hs_protocol": "custom",
                                                 "eval.harmful": {"source": beavertails, "filter": "unsafe",
                                                                  "n": 5}})
    with pytest.raises(LisaError) as e:
        load_run_data(validate_config(raw))
    assert "\n" not in str(e.value) and "eval.drop_overlap: false" in str(e.value)
