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

from conftest import tiny_llama, word_tokenizer


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
    check(e, str(path), "'.txt'", ".json, .jsonl, .csv or a .prompt/.yaml seed set")


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
    check(e, "cfg.yaml", "finetune.methods", "unknown method 'lisaa'", "vlguard, bso, lisa", "did you mean 'lisa'")


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
    from lisa_align.models.lora import LoraSettings, attach_lora

    model = tiny_llama(32)
    with pytest.raises(LisaError) as e:
        attach_lora(model, LoraSettings(target_modules=["q_proj", "query_key_value", "c_attn"]))
    msg = check(e, "['query_key_value', 'c_attn']", "not in the model",
                "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")
    assert "'q_proj']" not in msg  # present targets are not reported as missing


def test_max_length_shorter_than_prompt():
    from lisa_align.data.templates import format_prompt, tokenize_example

    row = {"instruction": "say hi", "input": "", "output": "hi"}
    tokenizer = word_tokenizer(train_on=[format_prompt("say hi"), "hi"], specials=["<unk>", "</s>"], eos_token="</s>")
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
    import lisa_align.pipeline

    def no_model(*a, **k):
        raise AssertionError("a model was built: the error must come from config/data validation")

    monkeypatch.setattr(lisa_align.pipeline, "ensure_tiny_base", no_model)

    def run(argv: list[str]) -> str:
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc == 2, (rc, out, err)
        assert out == ""
        assert err.startswith("lisa: error: ") and err.endswith("\n") and err.count("\n") == 1, repr(err)
        assert not cache.exists() or not any(cache.iterdir())
        runs = tmp_path / "runs"
        if runs.exists():  # at most the resolved config.yaml and the run log were written; no stage output
            assert {p.name for p in runs.rglob("*") if p.is_file()} <= {"config.yaml", "log.jsonl"}
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


# ---------------------------------------------------------------------------------------------
# Tokenizers: no EOS is refused; no pad token gets one (the reference's [PAD])
# ---------------------------------------------------------------------------------------------
def _word_tokenizer(words=("yes", "no"), **special):
    from lisa_align.data.templates import PROMPT_NO_INPUT

    return word_tokenizer(train_on=[PROMPT_NO_INPUT, "say", *words], specials=["<unk>", "<pad>", "</s>"], **special)


def test_tokenizer_without_eos(tmp_path):
    from lisa_align.data.templates import tokenize_example
    from lisa_align.models.loading import load_tokenizer

    tokenizer = _word_tokenizer(pad_token="<pad>")
    tokenizer.save_pretrained(tmp_path / "tok")
    with pytest.raises(LisaError) as e:
        load_tokenizer(str(tmp_path / "tok"))
    check(e, str(tmp_path / "tok"), "no EOS token", "eos_token")
    with pytest.raises(LisaError) as e:
        tokenize_example({"instruction": "say yes", "input": "", "output": "yes"}, tokenizer, max_length=64)
    check(e, "no EOS token", "eos_token")


def test_tokenizer_without_pad_gets_one():
    import torch

    from lisa_align.models.loading import DEFAULT_PAD_TOKEN, ensure_pad_token

    tokenizer = _word_tokenizer(eos_token="</s>")
    tokenizer.pad_token = None
    assert tokenizer.pad_token is None
    n = len(tokenizer)
    model = tiny_llama(n)
    assert ensure_pad_token(model, tokenizer) is True
    assert tokenizer.pad_token == DEFAULT_PAD_TOKEN and model.config.pad_token_id == tokenizer.pad_token_id
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == n + 1 and torch.allclose(emb[n], emb[:n].mean(0))


# ---------------------------------------------------------------------------------------------
# Data files: line numbers past blank lines and headers
# ---------------------------------------------------------------------------------------------
def test_jsonl_error_names_row_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\n\n\n{"instruction": "c", "output": 4.5}\n')
    with pytest.raises(LisaError) as e:
        load(path)
    check(e, str(path), "row 2 (line 4)", "'output'", "must be str", "float", "fix that row")


def test_jsonl_with_line_separator_characters_in_strings(tmp_path):
    """U+2028/U+0085 inside a JSON string (json.dumps(ensure_ascii=False) writes them raw) are not line
    breaks: the rows load, and a later error still names the right line."""
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": "a\u2028b", "output": "c\x85d"}, {"instruction": "e", "output": "f\u2029"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    assert [(r["instruction"], r["output"]) for r in load(path)] == [("a\u2028b", "c\x85d"), ("e", "f\u2029")]
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"instruction": "g"}\n')
    with pytest.raises(LisaError) as e:
        load(path)
    check(e, "row 3 (line 3)", "'output'")


def test_csv_error_names_row_and_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\na,b\nc,\n", encoding="utf-8")
    with pytest.raises(LisaError) as e:
        load(path)
    check(e, str(path), "row 2 (line 3)", "'output'", "empty")


# ---------------------------------------------------------------------------------------------
# Training: a nan/inf loss stops training at once, the last good checkpoint survives
# ---------------------------------------------------------------------------------------------
WORDS = ("yes", "no", "maybe", "ok")


@pytest.fixture
def micro_stage(tmp_path, monkeypatch):
    """A tiny Llama, a word tokenizer and 16 rows: ``train(stage_changes, log_tag, ...)`` runs
    ``train_stage`` on them for 8 steps (batch 2), a checkpoint every 2 steps, into tmp/trainer."""
    from lisa_align.config import StageSettings
    from lisa_align.defenses import SFT, Lisa
    from lisa_align.training.run import train_stage

    monkeypatch.setenv("LISA_ALIGN_CACHE", str(tmp_path / "cache"))
    tokenizer = _word_tokenizer(WORDS, pad_token="<pad>", eos_token="</s>")
    model = tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=None)
    rows = [{"instruction": f"say {w}", "input": "", "output": w} for w in WORDS * 4]
    out = tmp_path / "trainer"

    def train(log_tag="finetune/sft", lisa=False, **changes):
        stage = StageSettings(**{"lr": 1e-3, "max_steps": 8, "batch_size": 2, "lora": None, "scheduler": "constant",
                                 "warmup_ratio": 0.0, "logging_steps": 1, **changes})
        return train_stage(model, tokenizer, rows, stage, out, seed=0, max_length=64, use_cpu=True,
                           defense=Lisa(k1=2, k2=2, rho=1.0, proximal_warmup_ratio=0.0) if lisa else SFT(),
                           data={"alignment": rows[:4]}, log_path=tmp_path / "log.jsonl",
                           log_tag=log_tag)

    train.model, train.out = model, out
    return train


def checkpoints(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("checkpoint-*")) if folder.exists() else []


def finite_checkpoint(folder) -> bool:
    import torch
    from safetensors.torch import load_file

    assert (folder / "trainer_state.json").is_file()  # complete
    weights = load_file(folder / "model.safetensors")
    return bool(weights) and all(bool(torch.isfinite(t).all()) for t in weights.values())


@pytest.mark.parametrize("log_tag,lisa", [("finetune/sft", False), ("finetune/lisa", True)])
def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(micro_stage, log_tag, lisa):
    """The forward returns nan at the 7th optimizer step: training stops in that step, before its update,
    checkpoint-6 (finite) survives and no checkpoint after it is written."""
    calls = []

    def nan_at_step_7(module, args, output):
        if module.training:
            calls.append(1)
            if len(calls) == 7:
                return output * float("nan")
        return output

    micro_stage.model.lm_head.register_forward_hook(nan_at_step_7)
    with pytest.raises(LisaError) as e:
        micro_stage(log_tag, lisa=lisa)
    last = micro_stage.out / "checkpoint-6"
    check(e, log_tag, "training loss became nan at step 7", f"last good checkpoint is {last}",
          "lower finetune.lr", f"delete {micro_stage.out}")
    assert len(calls) == 7  # stopped at once
    assert checkpoints(micro_stage.out) == ["checkpoint-6"] and finite_checkpoint(last)


@pytest.mark.parametrize("logging_steps,caught_by", [(100, "the weight lm_head.weight became nan at step 4"),
                                                     (1, "the gradient norm became inf at step 4")])
def test_nonfinite_weights_are_never_checkpointed(micro_stage, logging_steps, caught_by):
    """The 4th step's gradient is inf, so its update turns the weights nan while its loss is finite: the
    logged gradient norm, or else the check before saving, stops training; checkpoint-4 is never written."""
    calls = []

    def inf_grad_at_step_4(grad):
        calls.append(1)
        return grad * math.inf if len(calls) == 4 else grad

    micro_stage.model.lm_head.weight.register_hook(inf_grad_at_step_4)
    with pytest.raises(LisaError) as e:
        micro_stage("align", logging_steps=logging_steps)
    last = micro_stage.out / "checkpoint-2"
    check(e, "align: ", caught_by, f"last good checkpoint is {last}", "lower align.lr")
    assert checkpoints(micro_stage.out) == ["checkpoint-2"] and finite_checkpoint(last)


def test_nonfinite_logged_loss_or_grad_norm_stops_training(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from lisa_align.training.callbacks import NonFiniteGuard

    guard = NonFiniteGuard("finetune/bso")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state = TrainerState(global_step=12)
    guard.on_log(args, state, TrainerControl(), logs={"loss": 1.5, "grad_norm": 3.0})  # fine
    for logs, what in (({"loss": math.inf}, "training loss became inf"),
                       ({"loss": 0.1, "grad_norm": math.nan}, "gradient norm became nan")):
        with pytest.raises(LisaError) as e:
            guard.on_log(args, state, TrainerControl(), logs=logs)
        check(e, "finetune/bso", what, "at step 12", "no checkpoint was saved")


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_cli_nan_training_is_one_line_and_keeps_finished_stages(tmp_path, monkeypatch, capsys, micro, jobs):
    """Also with --jobs 2, where the fine-tuning fails in a worker process: the same one line."""
    monkeypatch.setenv("LISA_ALIGN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(micro(**{"finetune.methods": ["sft"], "eval.models": ["base"]})))
    assert main(["run", str(path), "finetune.lr=1e30", "--jobs", jobs]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("lisa: error: finetune/sft: the ") and err.count("\n") == 1, err
    check(LisaError(err.strip()), "at step", "lower finetune.lr")
    assert "nan" in err or "inf" in err
    run = tmp_path / "runs" / "micro"
    assert (run / "aligned" / "model.safetensors").exists()  # the finished stage is kept
    assert not (run / "finetune" / "sft" / "adapter").exists()
    # --jobs 2 evaluated the base in a worker while the main process aligned
    assert sorted(p.name for p in (run / "eval").glob("*")) == ([] if jobs == "1" else ["base"])
    assert all(finite_checkpoint(c) for c in (run / "finetune" / "sft" / "trainer").glob("checkpoint-*"))


# ---------------------------------------------------------------------------------------------
# A full disk: one line, nothing half-written, the previous output/checkpoint intact
# ---------------------------------------------------------------------------------------------
def _enospc(path=""):
    import errno
    import os

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("how", ["torch.save", "safetensors", "torch.save-runtime-error"])
def test_disk_full_while_writing_a_checkpoint(micro_stage, monkeypatch, how):
    """The save of checkpoint-4 fails half-way: checkpoint-4 is removed, checkpoint-2 is intact."""
    import torch
    import transformers.modeling_utils as modeling_utils

    import lisa_align.io as lio

    def failing(real, error):
        def save(obj, path, *a, **k):
            if "checkpoint-4" in str(path):
                raise error
            return real(obj, path, *a, **k)
        return save

    if how == "torch.save":  # optimizer.pt, after the weights of checkpoint-4 were written
        monkeypatch.setattr(torch, "save", failing(torch.save, _enospc("optimizer.pt")))
    elif how == "safetensors":  # the weights; safetensors reports ENOSPC in its message
        monkeypatch.setattr(modeling_utils, "safe_save_file", failing(
            modeling_utils.safe_save_file, RuntimeError("Error while serializing: No space left on device (os error 28)")))
    else:  # torch's zip writer says nothing of the disk: the free space decides
        monkeypatch.setattr(torch, "save", failing(torch.save, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")))
        monkeypatch.setattr(lio, "free_bytes", lambda path: 4096)
    with pytest.raises(LisaError) as e:
        micro_stage()
    ckpt2 = micro_stage.out / "checkpoint-2"
    check(e, f"no space left on device while saving {micro_stage.out / 'checkpoint-4'}", "free space",
          f"the previous checkpoint {ckpt2} is intact")
    assert checkpoints(micro_stage.out) == ["checkpoint-2"] and finite_checkpoint(ckpt2)


def test_other_save_errors_are_not_called_disk_full(micro_stage, monkeypatch):
    import torch

    def save(obj, path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(PermissionError):
        micro_stage()


def test_disk_full_while_saving_a_stage_output(tmp_path, monkeypatch):
    """save_atomically: the temporary copy is removed, the previous output is intact."""
    from lisa_align.pipeline import save_atomically

    tokenizer = _word_tokenizer(pad_token="<pad>", eos_token="</s>")
    model = tiny_llama(len(tokenizer), seed=None)
    out = tmp_path / "finetune" / "sft" / "adapter"
    save_atomically(out, model, tokenizer)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = model.save_pretrained

    def half_then_full(path, *a, **k):
        real(path, *a, **k)  # the weights are written, then the disk fills up
        raise _enospc(f"{path}/extra")

    monkeypatch.setattr(model, "save_pretrained", half_then_full)
    with pytest.raises(LisaError) as e:
        save_atomically(out, model, tokenizer)
    check(e, f"no space left on device while saving {out}", "half-written copy was removed",
          "the previous adapter/ is intact", "checkpoints are kept")
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]  # no .adapter.tmp
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # nothing there before: nothing is left behind
    with pytest.raises(LisaError) as e:
        save_atomically(tmp_path / "aligned", model, tokenizer)
    check(e, "nothing was written to")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune"]


def test_stage_output_with_nan_weights_is_not_saved(tmp_path):
    import torch

    from lisa_align.pipeline import save_atomically

    tokenizer = _word_tokenizer(pad_token="<pad>", eos_token="</s>")
    model = tiny_llama(len(tokenizer), seed=None)
    with torch.no_grad():
        model.lm_head.weight[3, 2] = math.nan
    with pytest.raises(LisaError) as e:
        save_atomically(tmp_path / "adapter", model, tokenizer)
    check(e, str(tmp_path / "adapter"), "nan", "lm_head.weight", "not saved")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing_a_file(tmp_path, monkeypatch):
    import os

    from lisa_align.io import append_jsonl, atomic_write_json

    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"hs": 1.0})

    def full(fd):
        raise _enospc()

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(LisaError) as e:
        atomic_write_json(path, {"hs": 2.0})
    check(e, f"no space left on device while writing {path}", "free space", "previous metrics.json is intact")
    assert json.loads(path.read_text()) == {"hs": 1.0} and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    with pytest.raises(LisaError) as e:
        atomic_write_json(tmp_path / "summary.json", {})
    check(e, "summary.json", "nothing was written")

    import builtins

    real_open = builtins.open

    def open_full(file, mode="r", *a, **k):
        if "a" in mode:
            raise _enospc(file)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", open_full)
    with pytest.raises(LisaError) as e:
        append_jsonl(tmp_path / "log.jsonl", {"x": 1})
    check(e, "no space left on device while appending to", "log.jsonl")


# ---------------------------------------------------------------------------------------------
# Through the CLI: a run dir with another config; a hand-made bad dataset end to end
# ---------------------------------------------------------------------------------------------
def test_cli_run_dir_with_different_config_shows_the_diff(tmp_path, cli):
    cfg = write_config(tmp_path, _set("data.n", 100000))  # fails in data validation, after config.yaml is written
    check(LisaError(cli(["run", cfg])), "n=100000")
    saved = tmp_path / "runs" / DEMO["name"] / "config.yaml"
    assert saved.exists()
    p_old = DEMO["data"]["p"]
    msg = cli(["run", cfg, "data.p=0.3", "finetune.lisa.rho=7"])
    check(LisaError(msg), "holds a run with a different config", f"data.p: {p_old!r} -> 0.3",
          "finetune.lisa.rho: ", "-> 7.0", "--force")
    assert yaml.safe_load(saved.read_text())["data"]["p"] == p_old  # the old config is kept
    msg = cli(["run", "--force", cfg, "data.p=0.3"])  # accepted: fails later, in data validation
    assert "different config" not in msg and "n=100000" in msg
    assert yaml.safe_load(saved.read_text())["data"]["p"] == 0.3


def test_cli_hand_made_bad_dataset_end_to_end(tmp_path, cli):
    """A JSONL file with a BOM, a blank line and a row whose output is a number, through `lisa run`."""
    text = '{"instruction": "Say hi", "output": "hi"}\n\n{"instruction": "Count", "output": 42}\n'

    def edit(raw, t):
        (t / "mine.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
        raw["data"]["user"] = {"source": str(t / "mine.jsonl")}

    msg = cli(["run", write_config(tmp_path, edit)])  # exit 2, exactly one stderr line "lisa: error: ..."
    check(LisaError(msg), str(tmp_path / "mine.jsonl"), "row 2 (line 3)", "'output'", "must be str", "int",
          "fix that row")
    run = tmp_path / "runs" / DEMO["name"]
    assert not (run / "finetune").exists() and not (run / "eval").exists() and not (run / "aligned").exists()
