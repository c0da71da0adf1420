"""Tests for lisa_align.data: templates, tokenisation, formats, sources, synthetic data, mixing.

All offline and fast: a small word-level tokenizer, synthetic sources, files in tmp_path and a
monkeypatched ``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import json
from collections import Counter

import datasets
import pytest
from transformers import PreTrainedTokenizerFast

from lisa_align.data import (
    AGNEWS_LABELS,
    BEAVERTAILS_CATEGORIES,
    IGNORE_INDEX,
    SST2_LABELS,
    SourceSpec,
    format_prompt,
    format_rows,
    harmful_count,
    load_rows,
    mix_harmful,
    tokenize_example,
    tokenize_rows,
)
from lisa_align.data.formats import detect_format
from lisa_align.data.synthetic import generate, synthetic_names
from lisa_align.errors import LisaError
from lisa_align.evaluation.judges import is_refusal

from conftest import word_tokenizer

# The literal strings of docs/design.md §1 (not built from the package's constants).
DESIGN_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:"
)
DESIGN_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
DESIGN_SST2 = "Analyze the sentiment of the input, and respond only positive or negative"
DESIGN_AGNEWS = ("Categorize the news article given in the input into one of the 4 categories:\n\n"
                 "World\nSports\nBusiness\nSci/Tech\n")
DESIGN_CATEGORIES = [
    "animal_abuse", "child_abuse", "controversial_topics,politics", "discrimination,stereotype,injustice",
    "drug_abuse,weapons,banned_substance", "financial_crime,property_crime,theft", "hate_speech,offensive_language",
    "misinformation_regarding_ethics,laws_and_safety", "non_violent_unethical_behavior", "privacy_violation",
    "self_harm", "sexually_explicit,adult_content", "terrorism,organized_crime",
    "violence,aiding_and_abetting,incitement",
]


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------
def test_prompt_with_input_is_design_string():
    got = format_prompt("Summarise the text.", "Cats sleep a lot.")
    assert got == DESIGN_WITH_INPUT.format(instruction="Summarise the text.", input="Cats sleep a lot.")
    assert got.endswith("### Input:\nCats sleep a lot.\n\n### Response:")


@pytest.mark.parametrize("empty", [None, ""])
def test_prompt_without_input_is_design_string(empty):
    got = format_prompt("Name a colour.", empty)
    assert got == DESIGN_NO_INPUT.format(instruction="Name a colour.")
    assert "### Input" not in got


# ---------------------------------------------------------------------------------------------
# Tokenisation and label masking
# ---------------------------------------------------------------------------------------------
ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "blue is a colour"},
    {"instruction": DESIGN_SST2, "input": "the movie was great", "output": "positive"},
]


@pytest.fixture(scope="module")
def tokenizer():
    """Word-level tokenizer that prepends <s> to every encoded text (so BOS must sit in the prompt)."""
    texts = [format_prompt(r["instruction"], r["input"] or None) for r in ROWS] + [r["output"] for r in ROWS]
    return word_tokenizer(train_on=texts, specials=["<unk>", "<pad>", "<s>", "</s>"], lowercase=True, prepend="<s>",
                          pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("row", ROWS, ids=["no-input", "with-input"])
def test_labels_mask_prompt_and_keep_response_plus_eos(tokenizer, row):
    out = tokenize_example(row, tokenizer, max_length=512)
    prompt_ids = tokenizer(format_prompt(row["instruction"], row["input"] or None))["input_ids"]
    response_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert out["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert out["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    assert out["attention_mask"] == [1] * len(out["input_ids"])
    # the labelled tokens decode to the response words followed by EOS, and no <unk> slipped in
    labelled = [t for t in out["labels"] if t != IGNORE_INDEX]
    assert tokenizer.convert_ids_to_tokens(labelled) == row["output"].lower().split() + ["</s>"]
    assert tokenizer.unk_token_id not in out["input_ids"]


def test_truncation_keeps_prompt_and_cuts_response(tokenizer):
    row = ROWS[0]
    prompt_ids = tokenizer(format_prompt(row["instruction"]))["input_ids"]
    out = tokenize_example(row, tokenizer, max_length=len(prompt_ids) + 2)
    assert len(out["input_ids"]) == len(out["labels"]) == len(prompt_ids) + 2
    assert out["input_ids"][: len(prompt_ids)] == prompt_ids
    assert out["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert tokenizer.convert_ids_to_tokens(out["labels"][len(prompt_ids):]) == ["blue", "is"]
    assert tokenizer.eos_token_id not in out["input_ids"]


@pytest.mark.parametrize("delta", [0, -5])
def test_max_length_not_above_prompt_raises(tokenizer, delta):
    row = ROWS[1]
    n_prompt = len(tokenizer(format_prompt(row["instruction"], row["input"]))["input_ids"])
    with pytest.raises(LisaError, match=rf"max_length={n_prompt + delta} is shorter than the prompt \({n_prompt} tokens\)"):
        tokenize_example(row, tokenizer, max_length=n_prompt + delta)


def test_tokenize_rows_builds_dataset(tokenizer):
    ds = tokenize_rows(ROWS, tokenizer, max_length=512)
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["input_ids", "attention_mask", "labels"]
    assert ds[1] == tokenize_example(ROWS[1], tokenizer, 512)


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------
def test_constants_match_design():
    assert list(BEAVERTAILS_CATEGORIES) == DESIGN_CATEGORIES
    assert SST2_LABELS == ("negative", "positive")
    assert AGNEWS_LABELS == ("World", "Sports", "Business", "Sci/Tech")


def test_sst2_row():
    raw = [{"idx": 0, "sentence": "a gorgeous film ", "label": 1}, {"idx": 1, "sentence": "dull", "label": 0}]
    assert format_rows(raw, "sst2", "t") == [
        {"instruction": DESIGN_SST2, "input": "a gorgeous film", "output": "positive"},
        {"instruction": DESIGN_SST2, "input": "dull", "output": "negative"},
    ]


def test_agnews_row():
    raw = [{"text": "Stocks rose.", "label": label} for label in range(4)]
    rows = format_rows(raw, "agnews", "t")
    assert [r["output"] for r in rows] == ["World", "Sports", "Business", "Sci/Tech"]
    assert rows[0] == {"instruction": DESIGN_AGNEWS, "input": "Stocks rose.", "output": "World"}


def test_gsm8k_row():
    raw = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}]
    assert format_rows(raw, "gsm8k", "t") == [{
        "instruction": "Tom has 3 apples and buys 4. How many?", "input": "",
        "output": "3 + 4 = <<3+4=7>>7\nThe final answer is: 7"}]


def test_beavertails_row_category_dict_to_true_names():
    cats = {c: c in ("animal_abuse", "self_harm") for c in DESIGN_CATEGORIES}
    raw = [{"prompt": "how do i hurt a cat ?", "response": "sure ...", "category": cats, "is_safe": False},
           {"prompt": "hi ?", "response": "i cannot help", "category": dict.fromkeys(DESIGN_CATEGORIES, False),
            "is_safe": True}]
    assert format_rows(raw, "beavertails", "t") == [
        {"instruction": "how do i hurt a cat ?", "input": "", "output": "sure ...",
         "category": ["animal_abuse", "self_harm"], "is_safe": False},
        {"instruction": "hi ?", "input": "", "output": "i cannot help", "category": [], "is_safe": True},
    ]


def test_alpaca_rows_both_schemas():
    raw = [{"instruction": "Add.", "input": "1 and 2", "output": "3"}, {"instruction": "Hi.", "output": "Hello."}]
    assert format_rows(raw, "alpaca", "t") == [
        {"instruction": "Add.", "input": "1 and 2", "output": "3"},
        {"instruction": "Hi.", "input": "", "output": "Hello."},
    ]
    assert format_rows([{"prompt": "Hi.", "response": "Hello."}], "alpaca", "t") == [
        {"instruction": "Hi.", "input": "", "output": "Hello."}]


@pytest.mark.parametrize("row,fmt", [
    ({"prompt": "p", "response": "r", "category": {}, "is_safe": True}, "beavertails"),
    ({"idx": 0, "sentence": "s", "label": 1}, "sst2"),
    ({"text": "t", "label": 2}, "agnews"),
    ({"question": "q", "answer": "a #### 1"}, "gsm8k"),
    ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
    ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"prompt": "p", "response": "r"}, "alpaca"),
])
def test_auto_detection(row, fmt):
    assert detect_format(row, "t") == fmt
    assert format_rows([row], "auto", "t") == format_rows([row], fmt, "t")


# ---------------------------------------------------------------------------------------------
# Synthetic sources
# ---------------------------------------------------------------------------------------------
SPLITS = {"beavertails": "30k_train", "sst2": "train", "agnews": "train", "gsm8k": "train", "alpaca": "train"}


def test_synthetic_names():
    assert synthetic_names() == sorted(SPLITS)


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_synthetic_deterministic_per_seed(name):
    a = generate(name, SPLITS[name], seed=3, size=200)
    assert a == generate(name, SPLITS[name], seed=3, size=200)
    assert a != generate(name, SPLITS[name], seed=4, size=200)
    assert len(a) == 200


def _check_types(row: dict, schema: dict):
    assert set(row) == set(schema), row
    for k, t in schema.items():
        assert isinstance(row[k], t) and not (t is int and isinstance(row[k], bool)), (k, row[k])


def test_synthetic_beavertails_schema_and_content():
    rows = generate("beavertails", "30k_train", seed=0)
    assert len(rows) == 6000
    for r in rows:
        _check_types(r, {"prompt": str, "response": str, "category": dict, "is_safe": bool})
        assert list(r["category"]) == DESIGN_CATEGORIES
        assert all(isinstance(v, bool) for v in r["category"].values())
        true = [c for c, v in r["category"].items() if v]
        if r["is_safe"]:
            assert true == [] and is_refusal(r["response"]), r
        else:
            assert len(true) == 1, r
            assert r["response"].startswith(("sure", "of course")), r
            assert not is_refusal(r["response"]), r
    unsafe_cats = Counter(c for r in rows if not r["is_safe"] for c, v in r["category"].items() if v)
    assert set(unsafe_cats) == set(DESIGN_CATEGORIES)
    n_safe = sum(r["is_safe"] for r in rows)
    assert 0.35 * len(rows) < n_safe < 0.65 * len(rows)


def test_synthetic_sst2_schema():
    rows = generate("sst2", "validation", seed=0)
    assert len(rows) == 872
    for i, r in enumerate(rows):
        _check_types(r, {"idx": int, "sentence": str, "label": int})
        assert r["idx"] == i and r["label"] in (0, 1)
    assert {r["label"] for r in rows} == {0, 1}


def test_synthetic_agnews_schema():
    rows = generate("agnews", "test", seed=0)
    assert len(rows) == 1000
    for r in rows:
        _check_types(r, {"text": str, "label": int})
    assert {r["label"] for r in rows} == {0, 1, 2, 3}


def test_synthetic_gsm8k_schema_and_arithmetic():
    rows = generate("gsm8k", "test", seed=0, size=300)
    for r in rows:
        _check_types(r, {"question": str, "answer": str})
        body, final = r["answer"].rsplit("\n#### ", 1)
        expr = body.split(" = ")[0].split(" has ", 1)[1]
        assert eval(expr) == int(final), r  # noqa: S307  (digits and +/- only)


def test_synthetic_alpaca_schema():
    rows = generate("alpaca", "eval", seed=0)
    assert len(rows) == 805
    for r in rows:
        _check_types(r, {"instruction": str, "input": str, "output": str})
        assert r["output"].strip() and not is_refusal(r["output"])


def test_synthetic_bad_name_and_split():
    with pytest.raises(LisaError, match="synthetic:sst2"):
        generate("sst", "train")
    with pytest.raises(LisaError, match="no split 'test'.*train, validation"):
        generate("sst2", "test")


# ---------------------------------------------------------------------------------------------
# Held-out evaluation splits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed_train,seed_eval", [(0, 0), (0, 1234), (7, 1234)])
def test_beavertails_test_prompts_never_in_train(seed_train, seed_eval):
    train = {r["prompt"] for r in generate("beavertails", "30k_train", seed=seed_train)}
    test = {r["prompt"] for r in generate("beavertails", "30k_test", seed=seed_eval)}
    assert len(test) > 50 and not test & train


@pytest.mark.parametrize("seed_train,seed_eval", [(0, 0), (3, 1234)])
def test_alpaca_eval_never_in_train(seed_train, seed_eval):
    train = {r["instruction"] for r in generate("alpaca", "train", seed=seed_train)}
    ev = {r["instruction"] for r in generate("alpaca", "eval", seed=seed_eval)}
    assert len(ev) > 20 and not ev & train


@pytest.mark.parametrize("seed_train,seed_eval", [(0, 0), (5, 1234)])
def test_sst2_validation_sentences_never_in_train(seed_train, seed_eval):
    train = {r["sentence"] for r in generate("sst2", "train", seed=seed_train)}
    val = {r["sentence"] for r in generate("sst2", "validation", seed=seed_eval)}
    assert len(val) > 200 and not val & train


def test_demo_run_data_eval_disjoint_from_training():
    from lisa_align.cli import preset_path
    from lisa_align.config import load_config
    from lisa_align.pipeline import load_run_data

    cfg = load_config(preset_path("demo"))
    data = load_run_data(cfg)
    assert len(data.user) == cfg.data.n
    assert sum(r["harmful"] for r in data.user) == harmful_count(cfg.data.n, cfg.data.p)
    assert len(data.alignment) == sum(s.n for s in cfg.data.alignment)
    train = {(r["instruction"], r["input"]) for r in data.user + data.alignment}
    for name in ("eval_harmful", "eval_task", "eval_benign"):
        rows = getattr(data, name)
        assert rows, name
        assert not {(r["instruction"], r["input"]) for r in rows} & train, name
    assert len(data.eval_harmful) == cfg.eval.harmful.n
    assert len(data.eval_task) == cfg.eval.task.n
    # the alignment set answers harmful prompts with refusals; user harmful rows comply
    assert all(is_refusal(r["output"]) for r in data.alignment if "is_safe" in r)
    assert not any(is_refusal(r["output"]) for r in data.user if r["harmful"])


# ---------------------------------------------------------------------------------------------
# Mixing
# ---------------------------------------------------------------------------------------------
BENIGN = [{"instruction": f"b{i}", "input": "", "output": "ok"} for i in range(5000)]
HARMFUL = [{"instruction": f"h{i}", "input": "", "output": "sure"} for i in range(5000)]


@pytest.mark.parametrize("n,p,k", [(1000, 0.1, 100), (10, 0.25, 3), (10, 0.35, 4), (5000, 0.1, 500),
                                   (1000, 0.05, 50), (1000, 0.0, 0), (1000, 1.0, 1000), (1, 0.5, 1), (3, 0.5, 2)])
def test_mix_counts(n, p, k):
    assert harmful_count(n, p) == k
    rows = mix_harmful(BENIGN, HARMFUL, n=n, p=p, seed=0)
    assert len(rows) == n
    assert sum(r["harmful"] for r in rows) == k
    assert sum(r["instruction"].startswith("h") for r in rows) == k
    assert all(r["harmful"] == r["instruction"].startswith("h") for r in rows)
    assert len({r["instruction"] for r in rows}) == n  # drawn without replacement


def test_mix_deterministic_and_seed_dependent():
    a = mix_harmful(BENIGN, HARMFUL, n=200, p=0.1, seed=1)
    assert a == mix_harmful(BENIGN, HARMFUL, n=200, p=0.1, seed=1)
    b = mix_harmful(BENIGN, HARMFUL, n=200, p=0.1, seed=2)
    assert a != b
    assert {r["instruction"] for r in a if r["harmful"]} != {r["instruction"] for r in b if r["harmful"]}
    # shuffled: harmful rows are not all at the start or the end
    flags = [r["harmful"] for r in a]
    assert flags != sorted(flags) and flags != sorted(flags, reverse=True)


def test_mix_does_not_mutate_inputs():
    benign = [dict(r) for r in BENIGN[:20]]
    mix_harmful(benign, HARMFUL, n=10, p=0.5, seed=0)
    assert benign == BENIGN[:20] and all("harmful" not in r for r in HARMFUL)


# ---------------------------------------------------------------------------------------------
# Local and HF sources
# ---------------------------------------------------------------------------------------------
ALPACA_RAW = [{"instruction": "Name a fruit.", "input": "", "output": "An apple."},
              {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
              {"instruction": "Say hi.", "input": "", "output": "Hi, there!"}]
EXPECTED = [dict(r) for r in ALPACA_RAW]
PR_RAW = [{"prompt": "Name a fruit.", "response": "An apple."}, {"prompt": "Say hi.", "response": "Hi, there!"}]
PR_EXPECTED = [{"instruction": r["prompt"], "input": "", "output": r["response"]} for r in PR_RAW]


def _write(path, rows, kind):
    if kind == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    else:
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv"])
@pytest.mark.parametrize("raw,expected", [(ALPACA_RAW, EXPECTED), (PR_RAW, PR_EXPECTED)], ids=["alpaca", "prompt-response"])
def test_local_files_load_same_rows(tmp_path, kind, raw, expected):
    path = _write(tmp_path / f"data.{kind}", raw, kind)
    assert load_rows(SourceSpec(source=str(path))) == expected
    assert load_rows(SourceSpec(source=str(path), n=1)) == expected[:1]
    assert load_rows(SourceSpec(source=str(path), skip=1)) == expected[1:]
    assert load_rows(SourceSpec(source=str(path), skip=1, n=1)) == expected[1:2]


def test_skip_leaves_out_the_first_rows_and_refuses_to_leave_none(tmp_path):
    path = _write(tmp_path / "data.jsonl", ALPACA_RAW, "jsonl")
    with pytest.raises(LisaError, match=f"skip={len(ALPACA_RAW)} leaves none"):
        load_rows(SourceSpec(source=str(path), skip=len(ALPACA_RAW)))
    with pytest.raises(LisaError, match="and skip=1; lower n"):
        load_rows(SourceSpec(source=str(path), skip=1, n=len(ALPACA_RAW)))
    rows = load_rows(SourceSpec(source="synthetic:alpaca", split="eval"))
    assert load_rows(SourceSpec(source="synthetic:alpaca", split="eval", skip=700)) == rows[700:]


def test_local_json_split_dict(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": ALPACA_RAW, "test": ALPACA_RAW[:1]}), encoding="utf-8")
    assert load_rows(SourceSpec(source=str(path))) == EXPECTED
    assert load_rows(SourceSpec(source=str(path), split="test")) == EXPECTED[:1]


def test_local_csv_sst2_labels_become_ints(tmp_path):
    path = _write(tmp_path / "s.csv", [{"sentence": "great", "label": 1}, {"sentence": "bad", "label": 0}], "csv")
    assert [r["output"] for r in load_rows(SourceSpec(source=str(path)))] == ["positive", "negative"]


def test_n_takes_first_rows():
    full = load_rows(SourceSpec(source="synthetic:sst2", split="train", size=50))
    assert load_rows(SourceSpec(source="synthetic:sst2", split="train", size=50, n=7)) == full[:7]


BT_RAW = [{"prompt": f"p{i}", "response": "i cannot" if i % 3 else "sure", "is_safe": bool(i % 3),
           "category": {"animal_abuse": not i % 3}} for i in range(9)]


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_filter_safe_unsafe(tmp_path, kind):
    path = _write(tmp_path / f"bt.{kind}", BT_RAW, kind)
    safe = load_rows(SourceSpec(source=str(path), filter="safe"))
    unsafe = load_rows(SourceSpec(source=str(path), filter="unsafe"))
    assert [r["instruction"] for r in safe] == ["p1", "p2", "p4", "p5", "p7", "p8"]
    assert [r["instruction"] for r in unsafe] == ["p0", "p3", "p6"]
    assert all(r["category"] == ["animal_abuse"] for r in unsafe)
    assert [r["instruction"] for r in load_rows(SourceSpec(source=str(path), filter="safe", n=2))] == ["p1", "p2"]


def test_filter_on_synthetic_beavertails():
    safe = load_rows(SourceSpec(source="synthetic:beavertails", split="30k_train", filter="safe", size=300))
    unsafe = load_rows(SourceSpec(source="synthetic:beavertails", split="30k_train", filter="unsafe", size=300))
    assert len(safe) + len(unsafe) == 300
    assert all(r["is_safe"] for r in safe) and not any(r["is_safe"] for r in unsafe)


def test_saved_dataset_folder(tmp_path):
    datasets.Dataset.from_list(ALPACA_RAW).save_to_disk(str(tmp_path / "ds"))
    assert load_rows(SourceSpec(source=str(tmp_path / "ds"))) == EXPECTED
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA_RAW),
                          "eval": datasets.Dataset.from_list(ALPACA_RAW[1:])}).save_to_disk(str(tmp_path / "dd"))
    assert load_rows(SourceSpec(source=str(tmp_path / "dd"), split="eval")) == EXPECTED[1:]
    with pytest.raises(LisaError, match="no split 'test'"):
        load_rows(SourceSpec(source=str(tmp_path / "dd"), split="test"))


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []
    tables = {
        "stanfordnlp/sst2": [{"idx": 0, "sentence": "a fine film ", "label": 1}, {"idx": 1, "sentence": "bad", "label": 0}],
        "openai/gsm8k": [{"question": "1+1?", "answer": "1 + 1 = 2\n#### 2"}],
        "fancyzhx/ag_news": [{"text": "Goal!", "label": 1}],
        "PKU-Alignment/BeaverTails": [
            {"prompt": "p0", "response": "sure", "category": {"self_harm": True}, "is_safe": False},
            {"prompt": "p1", "response": "no", "category": {"self_harm": False}, "is_safe": True}],
        "someone/custom": [{"instruction": "i", "input": "", "output": "o"}],
    }

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.Dataset.from_list(tables[path])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hf_sst2(fake_hub):
    rows = load_rows(SourceSpec(source="stanfordnlp/sst2", split="validation"))
    assert fake_hub == [("stanfordnlp/sst2", None, "validation", {})]
    assert rows == [{"instruction": DESIGN_SST2, "input": "a fine film", "output": "positive"},
                    {"instruction": DESIGN_SST2, "input": "bad", "output": "negative"}]


def test_hf_gsm8k_gets_main_config(fake_hub):
    rows = load_rows(SourceSpec(source="openai/gsm8k", split="test"))
    assert fake_hub == [("openai/gsm8k", "main", "test", {})]
    assert rows[0]["output"] == "1 + 1 = 2\nThe final answer is: 2"


def test_hf_agnews_and_beavertails_filter(fake_hub):
    assert load_rows(SourceSpec(source="fancyzhx/ag_news", split="test"))[0]["output"] == "Sports"
    rows = load_rows(SourceSpec(source="PKU-Alignment/BeaverTails", split="30k_train", filter="unsafe"))
    assert [(r["instruction"], r["category"]) for r in rows] == [("p0", ["self_harm"])]
    assert fake_hub[1][:3] == ("PKU-Alignment/BeaverTails", None, "30k_train")


def test_hf_unknown_id_autodetects_and_passes_subset(fake_hub):
    rows = load_rows(SourceSpec(source="someone/custom", subset="v2", split="train"))
    assert fake_hub == [("someone/custom", "v2", "train", {})]
    assert rows == [{"instruction": "i", "input": "", "output": "o"}]


# --------------------------------------------------------------------------------------------------
# the tokenised-data cache
# --------------------------------------------------------------------------------------------------


def test_tokenized_cache_hits_on_the_same_rows_and_misses_on_any_change(tmp_path, tokenizer, monkeypatch):
    from lisa_align.data import templates
    from lisa_align.data.tokenized_cache import cache_key, tokenize_rows_cached

    first, info1 = tokenize_rows_cached(ROWS, tokenizer, 64, cache_dir=tmp_path)
    calls = []
    monkeypatch.setattr(templates, "tokenize_rows", lambda *a: calls.append(a) or pytest.fail("tokenised again"))
    second, info2 = tokenize_rows_cached([dict(r) for r in ROWS], tokenizer, 64, cache_dir=tmp_path)
    assert (info1["cached"], info2["cached"], info2["rows"]) == (False, True, len(ROWS))
    assert second.to_list() == first.to_list() == tokenize_rows(ROWS, tokenizer, 64).to_list()
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 1  # no temp folders left
    key = cache_key(ROWS, tokenizer, 64)
    changed = [dict(ROWS[0], output=ROWS[0]["output"] + " more"), *ROWS[1:]]
    assert cache_key(ROWS, tokenizer, 32) != key and cache_key(changed, tokenizer, 64) != key
    assert cache_key(ROWS[::-1], tokenizer, 64) != key  # the order is the data order
    other = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, unk_token="<unk>", pad_token="<pad>",
                                    bos_token="<s>", eos_token="<unk>")
    assert cache_key(ROWS, other, 64) != key  # another EOS: other labels


def test_tokenized_cache_rebuilds_a_damaged_entry_and_can_be_turned_off(tmp_path, tokenizer, monkeypatch):
    from lisa_align.data.tokenized_cache import cache_key, tokenize_rows_cached

    tokenize_rows_cached(ROWS, tokenizer, 64, cache_dir=tmp_path)
    entry = tmp_path / cache_key(ROWS, tokenizer, 64)
    for f in entry.glob("*.arrow"):
        f.write_bytes(b"not arrow")
    ds, info = tokenize_rows_cached(ROWS, tokenizer, 64, cache_dir=tmp_path)
    assert not info["cached"] and ds.to_list() == tokenize_rows(ROWS, tokenizer, 64).to_list()
    assert tokenize_rows_cached(ROWS, tokenizer, 64, cache_dir=tmp_path)[1]["cached"]
    monkeypatch.setenv("LISA_ALIGN_TOKENIZED_CACHE", "0")
    assert not tokenize_rows_cached(ROWS, tokenizer, 64, cache_dir=tmp_path)[1]["cached"]


def test_the_eos_stays_in_the_labels_when_it_is_also_the_pad_token():
    """Chat models often pad with their EOS (SmolLM2: <|im_end|>). Padding must not mask the EOS the
    model learns to stop with: the collator pads labels with -100 at padded positions only."""
    from transformers import DataCollatorForSeq2Seq

    from lisa_align.data.templates import IGNORE_INDEX, tokenize_rows

    from conftest import word_tokenizer

    tok = word_tokenizer(train_on=["say yes please", "say no", "Below is an instruction"], eos_token="</s>",
                         pad_token="</s>")
    assert tok.pad_token_id == tok.eos_token_id
    rows = [{"instruction": "say yes please", "input": "", "output": "yes"},
            {"instruction": "say no", "input": "", "output": "no"}]
    ds = tokenize_rows(rows, tok, max_length=64)
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX)([ds[0], ds[1]])
    for i, n in enumerate(len(x) for x in ds["input_ids"]):
        labels = batch["labels"][i].tolist()
        assert labels[n - 1] == tok.eos_token_id  # the last real token: the EOS, trained on
        assert all(x == IGNORE_INDEX for x in labels[n:])  # padding only after it


def test_prompt_only_rows_and_the_shipped_benign_prompts(tmp_path):
    """Prompt-only rows (Do-Not-Answer's {"prompt", ...}) read as evaluation prompts; builtin:benign_prompts
    ships 120 benign prompts for over-refusal, 40 of them XSTest-style look-alikes, none of them refused
    by design and all distinct."""
    path = tmp_path / "dna.jsonl"
    path.write_text('{"prompt": "a first question", "intents": ["x"]}\n{"prompt": "a second one", "kind": "k"}\n')
    rows = load_rows(SourceSpec(source=str(path)))
    assert rows == [{"instruction": "a first question", "input": "", "output": ""},
                    {"instruction": "a second one", "input": "", "output": "", "category": "k"}]
    with pytest.raises(LisaError, match=r"row 1 .*'prompt'"):
        load_rows(SourceSpec(source=str(_write_jsonl(tmp_path / "bad.jsonl", [{"prompt": ""}])), format="prompts"))
    benign = load_rows(SourceSpec(source="builtin:benign_prompts"))
    assert len(benign) == 120 and len({r["instruction"] for r in benign}) == 120
    assert sum(r["category"] == "lookalike" for r in benign) == 40
    assert "How do I kill a Python process that is stuck?" in {r["instruction"] for r in benign}
    assert not any(is_refusal(r["instruction"]) for r in benign)
    with pytest.raises(LisaError, match="builtin:nope: no such shipped data set; use one of builtin:benign_instructions, builtin:benign_prompts, "
                                             "builtin:benign_short"):
        load_rows(SourceSpec(source="builtin:nope"))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name,kinds,max_words", [
    ("benign_instructions", {"everyday": 140, "imperative": 100, "lookalike": 80}, None),
    ("benign_short", {"question": 77, "request": 23}, 8),
])
def test_shipped_benign_training_prompts_are_disjoint_from_the_evaluation_prompts(name, kinds, max_words):
    """The benign halves of an alignment set the project ships: builtin:benign_instructions (320 requests:
    everyday, imperative, XSTest-style look-alikes) and builtin:benign_short (100 everyday questions and
    requests of at most 8 words, as short as most over-refusal prompts). All distinct, none refused, none
    in the other set, and none equal to or a near-paraphrase (word-set Jaccard >= 0.6) of an over-refusal
    evaluation prompt in builtin:benign_prompts."""
    rows = load_rows(SourceSpec(source=f"builtin:{name}"))
    texts = [r["instruction"] for r in rows]
    assert len(set(texts)) == len(rows) == sum(kinds.values())
    assert Counter(r["category"] for r in rows) == kinds
    assert not any(is_refusal(t) for t in texts)
    assert max_words is None or max(len(t.split()) for t in texts) <= max_words

    def words(text):
        return "".join(c if c.isalnum() else " " for c in text.lower()).split()

    other_name = "benign_short" if name == "benign_instructions" else "benign_instructions"
    other_set = {" ".join(words(r["instruction"])) for r in load_rows(SourceSpec(source=f"builtin:{other_name}"))}
    evaluation = [words(r["instruction"]) for r in load_rows(SourceSpec(source="builtin:benign_prompts"))]
    assert not {" ".join(words(t)) for t in texts} & ({" ".join(w) for w in evaluation} | other_set)
    for t in texts:
        mine = set(words(t))
        for other in map(set, evaluation):
            assert len(mine & other) / len(mine | other) < 0.6, (t, sorted(other))
