"""Bad inputs give one-line LisaErrors that name the file/field and say what to do.

The same inputs through the CLI (`lisa run <config>`) exit with status 2 and print exactly one line,
``lisa: error: ...``, to stderr, during config/data validation: no model is built or trained.
"""

from __future__ import annotations

import copy
import json
import math

import datasets
import pytest
import yaml

from lisa_align.cli import main, preset_path
from lisa_align.config import load_config, validate_config
from lisa_align.data.mixing import mix_harmful
from lisa_align.data.sources import SourceSpec, load_rows
from lisa_align.errors import LisaError


def check(err: LisaError | pytest.ExceptionInfo, *parts: str) -> str:
    """The message is one line and contains every part (case-insensitive)."""
    msg = str(err.value if isinstance(err, pytest.ExceptionInfo) else err)
    assert "\n" not in msg and msg.strip() == msg and msg, repr(msg)
    for part in parts:
        assert part.lower() in msg.lower(), f"{part!r} not in {msg!r}"
    return msg


def load(path, **kw):
    return load_rows(SourceSpec(source=str(path), **kw))


# ---------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------
def test_missing_dataset_file(tmp_path):
    with pytest.raises(LisaError) as e:
        load(tmp_path / "nope.jsonl")
    check(e, "not found", str(tmp_path / "nope.jsonl"), "check the path")


def test_missing_relative_dataset_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LisaError) as e:
        load("data/train.jsonl")
    check(e, "not found", "data/train.jsonl")


def test_row_without_output_names_row_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": ""}\n', encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load(path)
    check(e, str(path), "row 2", "'output'", "add 'output'")


def test_row_without_instruction_names_row_and_field(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"},
                                {"input": "x", "output": "y"}]), encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load(path)
    check(e, str(path), "row 3", "'instruction'")


def test_row_with_empty_output(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "   "}\n', encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load(path)
    check(e, str(path), "row 2", "'output'", "empty", "fill it in or remove the row")


def test_row_with_non_string_output(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": 3}\n', encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load(path)
    check(e, "row 1", "'output'", "must be str", "int")


def test_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n', encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load(path)
    check(e, str(path), "line 3", "not valid JSON", "fix that line")


def test_jsonl_line_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n["x"]\n', encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load(path)
    check(e, "line 2", "list", "JSON object")


def test_malformed_json(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",}\n]', encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load(path)
    check(e, str(path), "not valid JSON", "line 3", "fix the file")


def test_json_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"rows": []}', encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load(path)
    check(e, str(path), "JSON list of objects", ".jsonl")


def test_csv_without_needed_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question_text,reply\nhi,hello\n", encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load(path)
    check(e, str(path), "question_text", "'instruction'/'output'", "format:")
    with pytest.raises(LisaError) as e:
        load(path, format="alpaca")
    check(e, str(path), "row 1", "'instruction'", "present: question_text, reply")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("instruction,output\nnaïve,ok\n".encode("latin-1"))
    with pytest.raises(LisaError) as e:
        load(path)
    check(e, str(path), "not UTF-8", "re-save the file as UTF-8")


@pytest.mark.parametrize("name,text", [("e.jsonl", ""), ("e2.jsonl", "\n\n"), ("e.json", "[]"),
                                       ("e.csv", "instruction,output\n")])
def test_empty_dataset(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load(path)
    check(e, str(path), "empty")


def test_filter_leaves_no_rows(tmp_path):
    path = tmp_path / "bt.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r", "category": {}, "is_safe": True}) + "\n",
                    encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load(path, filter="unsafe")
    check(e, str(path), "no rows", "filter unsafe")


def test_filter_on_rows_without_is_safe(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load(path, filter="safe")
    check(e, str(path), "is_safe", "remove the filter")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load(path)
    check(e, str(path), "'.txt'", ".json, .jsonl or .csv")


def test_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(LisaError) as e:
        load(tmp_path)
    check(e, str(tmp_path), "not a saved dataset", "save_to_disk")


def test_unknown_synthetic_source():
    with pytest.raises(LisaError) as e:
        load_rows(SourceSpec(source="synthetic:beavertail", split="30k_train"))
    check(e, "synthetic:beavertail", "synthetic:beavertails")


def test_hf_load_failure_is_one_line(monkeypatch):
    def fail(*a, **k):
        raise FileNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub\nmore details\nand more")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(LisaError) as e:
        load_rows(SourceSpec(source="nobody/nothing"))
    msg = check(e, "nobody/nothing", "doesn't exist", "use a local file")
    assert "more details" not in msg


# ---------------------------------------------------------------------------------------------
# n and p
# ---------------------------------------------------------------------------------------------
BENIGN = [{"instruction": f"b{i}", "input": "", "output": "ok"} for i in range(50)]
HARMFUL = [{"instruction": f"h{i}", "input": "", "output": "sure"} for i in range(8)]


@pytest.mark.parametrize("p", [1.5, -0.1, math.nan, math.inf])
def test_p_outside_unit_interval(p):
    with pytest.raises(LisaError) as e:
        mix_harmful(BENIGN, HARMFUL, n=10, p=p, seed=0)
    check(e, f"p={p}", "[0, 1]", "data.p")
    with pytest.raises(LisaError) as e:
        validate_config({"data": {"p": p}}, "cfg.yaml")
    check(e, "cfg.yaml", "data.p", "[0, 1]")


@pytest.mark.parametrize("n", [0, -3])
def test_n_not_positive(n):
    with pytest.raises(LisaError) as e:
        mix_harmful(BENIGN, HARMFUL, n=n, p=0.1, seed=0)
    check(e, f"n={n}", "positive", "data.n")
    with pytest.raises(LisaError) as e:
        validate_config({"data": {"n": n}}, "cfg.yaml")
    check(e, "cfg.yaml", "data.n", "> 0")
    with pytest.raises(LisaError) as e:
        load_rows(SourceSpec(source="synthetic:sst2", size=20, n=n))
    check(e, "synthetic:sst2", f"n={n}", "positive")


def test_n_larger_than_source():
    with pytest.raises(LisaError) as e:
        load_rows(SourceSpec(source="synthetic:sst2", split="validation", n=900))
    check(e, "synthetic:sst2 [validation]", "n=900", "872 available", "lower n")
    with pytest.raises(LisaError) as e:
        load_rows(SourceSpec(source="synthetic:beavertails", split="30k_train", filter="safe", size=100, n=99))
    check(e, "synthetic:beavertails [30k_train]", "n=99", "after filter safe")


def test_n_larger_than_data_in_mixing():
    with pytest.raises(LisaError) as e:
        mix_harmful(BENIGN, HARMFUL, n=100, p=0.1, seed=0, benign_name="my.jsonl", harmful_name="bt.jsonl")
    check(e, "bt.jsonl has 8 rows", "n=100", "needs 10 harmful rows", "lower n")
    with pytest.raises(LisaError) as e:
        mix_harmful(BENIGN, HARMFUL, n=60, p=0.1, seed=0, benign_name="my.jsonl", harmful_name="bt.jsonl")
    check(e, "my.jsonl has 50 rows", "n=60", "needs 54 benign rows", "lower n")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lisa,parts", [
    ({"k1": 0, "k2": 0}, ["finetune.lisa", "K1 = K2 = 0", "set K1 > 0 or K2 > 0"]),
    ({"k1": -1}, ["finetune.lisa", "K1=-1", ">= 0"]),
    ({"k2": -5}, ["finetune.lisa", "K2=-5", ">= 0"]),
    ({"rho": -0.5}, ["finetune.lisa", "rho=-0.5", ">= 0"]),
    ({"rho": math.nan}, ["finetune.lisa", "rho=nan", "finite"]),
    ({"rho": math.inf}, ["finetune.lisa", "rho=inf", "finite"]),
    ({"proximal_warmup_ratio": 2}, ["finetune.lisa", "proximal_warmup_ratio=2", "[0, 1]"]),
])
def test_bad_lisa_settings(lisa, parts):
    with pytest.raises(LisaError) as e:
        validate_config({"finetune": {"lisa": lisa}}, "cfg.yaml")
    check(e, "cfg.yaml", *parts)


def test_unknown_method_suggests_closest():
    with pytest.raises(LisaError) as e:
        validate_config({"finetune": {"methods": ["sft", "lisaa"]}}, "cfg.yaml")
    check(e, "cfg.yaml", "finetune.methods", "unknown method 'lisaa'", "sft, bso, lisa", "did you mean 'lisa'")


@pytest.mark.parametrize("raw,key,guess", [
    ({"dta": {}}, "dta", "data"),
    ({"finetune": {"lisa": {"rhoo": 1}}}, "finetune.lisa.rhoo", "rho"),
    ({"data": {"harmfull": {}}}, "data.harmfull", "harmful"),
    ({"data": {"user": {"sorce": "x"}}}, "data.user.sorce", "source"),
    ({"align": {"lora": {"target_module": ["q_proj"]}}}, "align.lora.target_module", "target_modules"),
])
def test_unknown_yaml_key_suggests_closest(tmp_path, raw, key, guess):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load_config(path)
    check(e, str(path), f"unknown key '{key}'", f"did you mean '{guess}'")


def test_missing_config_file(tmp_path):
    with pytest.raises(LisaError) as e:
        load_config(tmp_path / "nope.yaml")
    check(e, "config file not found", str(tmp_path / "nope.yaml"))


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ndata:\n  p: [0.1\n  n: 5\n", encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load_config(path)
    check(e, str(path), "not valid YAML", "line", "fix the syntax")


def test_yaml_top_level_not_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load_config(path)
    check(e, str(path), "mapping")


def test_wrong_type_names_field():
    with pytest.raises(LisaError) as e:
        validate_config({"data": {"n": "many"}}, "cfg.yaml")
    check(e, "cfg.yaml", "data.n", "integer")


def test_unknown_judge_and_eval_model():
    with pytest.raises(LisaError) as e:
        validate_config({"eval": {"judge": "refusals"}}, "cfg.yaml")
    check(e, "cfg.yaml", "eval.judge", "unknown judge 'refusals'", "did you mean 'refusal'")
    with pytest.raises(LisaError) as e:
        validate_config({"eval": {"models": ["aligned", "methds"]}}, "cfg.yaml")
    check(e, "cfg.yaml", "eval.models", "'methds'", "did you mean 'methods'")


def test_max_length_not_positive_in_config():
    with pytest.raises(LisaError) as e:
        validate_config({"data": {"max_length": 0}}, "cfg.yaml")
    check(e, "cfg.yaml", "data.max_length", "> 0")


# ---------------------------------------------------------------------------------------------
# Models and tokenisation
# ---------------------------------------------------------------------------------------------
def test_model_path_does_not_exist():
    from lisa_align.models.loading import load_model_and_tokenizer

    with pytest.raises(LisaError) as e:
        load_model_and_tokenizer("/nonexistent/x")
    check(e, "'/nonexistent/x'", "does not exist", "save_pretrained")


def test_lora_targets_not_in_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lisa_align.models.lora import LoraSettings, attach_lora

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(LisaError) as e:
        attach_lora(model, LoraSettings(target_modules=["q_proj", "query_key_value", "c_attn"]))
    msg = check(e, "['query_key_value', 'c_attn']", "not in the model",
                "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")
    assert "'q_proj']" not in msg  # present targets are not reported as missing


def test_max_length_shorter_than_prompt():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lisa_align.data.templates import format_prompt, tokenize_example

    row = {"instruction": "say hi", "input": "", "output": "hi"}
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([format_prompt("say hi"), "hi"], trainer=trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    with pytest.raises(LisaError) as e:
        tokenize_example(row, tokenizer, max_length=8)
    check(e, "max_length=8", "shorter than the prompt", "raise data.max_length")


# ---------------------------------------------------------------------------------------------
# Through the CLI: `lisa run <config>` fails before any model is built
# ---------------------------------------------------------------------------------------------
DEMO = yaml.safe_load(preset_path("demo").read_text(encoding="utf-8"))


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Run ``lisa`` and return its one error line; fail if a model would be built or anything cached."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LISA_ALIGN_CACHE", str(cache))
    import lisa_align.models.tiny as tiny

    def no_model(*a, **k):
        raise AssertionError("a model was built: the error must come from config/data validation")

    monkeypatch.setattr(tiny, "build_tiny_base", no_model)

    def run(argv: list[str]) -> str:
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc == 2, (rc, out, err)
        assert out == ""
        assert err.startswith("lisa: error: ") and err.endswith("\n") and err.count("\n") == 1, repr(err)
        assert not cache.exists() or not any(cache.iterdir())
        runs = tmp_path / "runs"
        if runs.exists():  # at most the resolved config.yaml was written; no stage output
            assert {p.name for p in runs.rglob("*") if p.is_file()} <= {"config.yaml"}
        return err.removeprefix("lisa: error: ").rstrip("\n")

    return run


def write_config(tmp_path, edit=None) -> str:
    raw = copy.deepcopy(DEMO)
    raw["output_dir"] = str(tmp_path / "runs")
    if edit is not None:
        edit(raw, tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return str(path)


def _user_file(text: str, name: str = "user.jsonl"):
    def edit(raw, tmp_path):
        (tmp_path / name).write_text(text, encoding="utf-8")
        raw["data"]["user"] = {"source": str(tmp_path / name)}
    return edit


def _set(dotted: str, value):
    def edit(raw, tmp_path):
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    return edit


CLI_CASES = [
    ("missing-file", lambda raw, t: raw["data"].update(user={"source": str(t / "missing.jsonl")}),
     ["not found", "missing.jsonl"]),
    ("row-without-output", _user_file('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n'),
     ["user.jsonl", "row 2", "'output'"]),
    ("malformed-jsonl", _user_file('{"instruction": "a", "output": "b"}\n{"instruction": \n'),
     ["user.jsonl", "line 2", "not valid JSON"]),
    ("csv-columns", _user_file("foo,bar\n1,2\n", "user.csv"), ["user.csv", "'instruction'/'output'"]),
    ("empty-output", _user_file('{"instruction": "a", "output": ""}\n'), ["row 1", "'output'", "empty"]),
    ("p-above-1", _set("data.p", 1.5), ["cfg.yaml", "data.p", "[0, 1]"]),
    ("p-negative", _set("data.p", -0.2), ["cfg.yaml", "data.p", "[0, 1]"]),
    ("n-too-large", _set("data.n", 100000), ["synthetic:beavertails [30k_train] has", "n=100000", "lower n"]),
    ("n-too-large-align-disabled", lambda raw, t: (raw["align"].update(enabled=False), raw["data"].update(n=100000)),
     ["synthetic:beavertails [30k_train] has", "n=100000"]),
    ("alignment-n-too-large", _set("data.alignment.0.n", 99999), ["synthetic:beavertails [30k_train]", "n=99999",
                                                                   "after filter safe"]),
    ("eval-n-too-large", _set("eval.task.n", 5000), ["synthetic:sst2 [validation]", "n=5000", "872"]),
    ("n-zero", _set("data.n", 0), ["cfg.yaml", "data.n", "> 0"]),
    ("n-negative", _set("data.n", -1), ["cfg.yaml", "data.n", "> 0"]),
    ("k1-k2-zero", _set("finetune.lisa", {"k1": 0, "k2": 0, "rho": 1.0}), ["finetune.lisa", "K1 = K2 = 0"]),
    ("k1-negative", _set("finetune.lisa.k1", -1), ["finetune.lisa", "K1=-1"]),
    ("rho-negative", _set("finetune.lisa.rho", -1.0), ["finetune.lisa", "rho=-1.0"]),
    ("rho-nan", _set("finetune.lisa.rho", math.nan), ["finetune.lisa", "rho=nan"]),
    ("method-rho-negative", _set("finetune.methods", ["sft", {"name": "lisa", "rho": -2}]), ["methods.1", "rho=-2"]),
    ("unknown-method", _set("finetune.methods", ["sft", "bos"]), ["unknown method 'bos'", "did you mean 'bso'"]),
    ("unknown-key", _set("data.pp", 0.1), ["cfg.yaml", "unknown key 'data.pp'", "did you mean 'p'"]),
    ("unknown-judge", _set("eval.judge", "beaverdan"), ["eval.judge", "did you mean 'beaverdam'"]),
    ("unknown-eval-model", _set("eval.models", ["base", "lisa2"]), ["eval.models", "'lisa2'"]),
]


@pytest.mark.parametrize("edit,parts", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_run_bad_config(tmp_path, cli, edit, parts):
    msg = cli(["run", write_config(tmp_path, edit)])
    check(LisaError(msg), *parts)


def test_cli_missing_config_file(tmp_path, cli):
    msg = cli(["run", str(tmp_path / "nope.yaml")])
    check(LisaError(msg), "config file not found", "nope.yaml")


@pytest.mark.parametrize("override,parts", [
    ("data.p=2", ["data.p", "[0, 1]"]),
    ("finetune.lisa.rho=-1", ["rho=-1"]),
    ("data.p", ["must look like key.path=value"]),
])
def test_cli_run_bad_override(tmp_path, cli, override, parts):
    msg = cli(["run", write_config(tmp_path), override])
    check(LisaError(msg), *parts)


def test_cli_demo_validates_data_before_building_the_model(tmp_path, cli):
    msg = cli(["demo", "--output-dir", str(tmp_path / "runs"), "data.n=100000"])
    check(LisaError(msg), "synthetic:beavertails [30k_train] has", "n=100000")
    msg = cli(["demo", "--output-dir", str(tmp_path / "runs"), "data.p=-1"])
    check(LisaError(msg), "data.p")
