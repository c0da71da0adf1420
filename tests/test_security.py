"""Security: safetensors-only weights (pickle refused unless --allow-pickle), trust_remote_code off and
logged, the HF token never written or printed, and a config that is data, never code."""

from __future__ import annotations

import ast
import json
import logging
import pickle
import string
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from lisa_align.cli import main
from lisa_align.config import ModelSettings, load_config, validate_config
from lisa_align.errors import LisaError
from lisa_align.io import atomic_write_yaml, find_secret, redact_secrets
from lisa_align.models.loading import (
    allow_pickle_kwargs,
    check_safe_weights,
    load_causal_lm,
    load_model_and_tokenizer,
)
from lisa_align.models.lora import load_adapter

from conftest import tiny_llama, word_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src" / "lisa_align"
FAKE_TOKEN = "hf_" + "".join(string.ascii_letters[(7 * i) % 52] for i in range(34))  # planted, not real
WORDS = ["<unk>", "<pad>", "<s>", "</s>", "a", "b", "how", "to", "sure", "sorry", ":"]


def one_line(err, *parts: str) -> str:
    msg = str(err.value if isinstance(err, pytest.ExceptionInfo) else err)
    assert msg and "\n" not in msg and msg.strip() == msg, repr(msg)
    for part in parts:
        assert part.lower() in msg.lower(), f"{part!r} not in {msg!r}"
    return msg


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("LISA_ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


class _Trap:
    """Unpickling this creates ``path`` (harmless proof that pickle ran code)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(len(WORDS), seed=seed, pad_token_id=1, bos_token_id=2, eos_token_id=3)


def _tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS, pre_tokenizer="WhitespaceSplit", pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _pickle_model(folder: Path, model=None) -> Path:
    """A model folder as old checkpoints come: config.json + tokenizer + pytorch_model.bin (pickle)."""
    model = model or _tiny_llama()
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.fixture
def safe_dir(tmp_path) -> Path:
    path = tmp_path / "safe"
    _tiny_llama().save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# 1. Weights from safetensors only
# ---------------------------------------------------------------------------------------------
def test_pickle_model_folder_is_refused_unless_allowed(tmp_path, caplog):
    folder = _pickle_model(tmp_path / "old")
    for load in (load_model_and_tokenizer, load_causal_lm, check_safe_weights):
        with pytest.raises(LisaError) as e:
            load(str(folder))
        one_line(e, str(folder), "holds pickle weights (pytorch_model.bin)", "pickle can run code",
                 "convert to safetensors", "--allow-pickle")
    with caplog.at_level(logging.WARNING, logger="lisa_align.models.loading"):
        model, tok = load_model_and_tokenizer(str(folder), allow_pickle=True)
    assert "allow_pickle=True" in caplog.text
    ref = _tiny_llama()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    # pickle files of other names count too; a single pickle file given as the model is refused
    (folder / "pytorch_model.bin").rename(folder / "weights.pt")
    with pytest.raises(LisaError, match=r"weights\.pt"):
        check_safe_weights(folder)
    with pytest.raises(LisaError, match="holds pickle weights"):
        check_safe_weights(folder / "weights.pt")


def test_safetensors_are_loaded_and_a_stray_pickle_never_runs(safe_dir, tmp_path):
    marker = tmp_path / "pwned"
    (safe_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    (safe_dir / "training_args.bin").write_bytes(pickle.dumps(_Trap(marker)))
    model, _ = load_model_and_tokenizer(str(safe_dir))
    assert isinstance(model, LlamaForCausalLM) and not marker.exists()
    # a folder with the trap only: refused before anything is read
    (safe_dir / "model.safetensors").unlink()
    with pytest.raises(LisaError, match="pytorch_model.bin"):
        load_model_and_tokenizer(str(safe_dir))
    assert not marker.exists()
    # even when allowed, transformers reads pickle with weights_only=True: the trap does not run
    with pytest.raises(Exception):  # noqa: B017  (whatever the loader raises: the point is the trap)
        load_causal_lm(str(safe_dir), allow_pickle=True)
    assert not marker.exists()


def test_config_json_naming_pickle_weights_is_refused(safe_dir):
    cfg = json.loads((safe_dir / "config.json").read_text())
    (safe_dir / "config.json").write_text(json.dumps({**cfg, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(LisaError, match=r"holds pickle weights \(adapter_model.bin\)"):
        check_safe_weights(safe_dir)


def test_hub_ids_load_with_use_safetensors(monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []

    def fake(name, **kwargs):
        seen.append(kwargs)
        return "model"

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    assert load_causal_lm("some-org/some-model") == "model"
    assert seen[-1]["use_safetensors"] is True and seen[-1]["trust_remote_code"] is False
    load_causal_lm("some-org/some-model", allow_pickle=True)
    assert "use_safetensors" not in seen[-1]

    def no_safetensors(name, **kwargs):
        raise OSError(f"{name} does not appear to have a file named model.safetensors or "
                      "model.safetensors.index.json and thus cannot be loaded with `safetensors`.")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_safetensors)
    with pytest.raises(LisaError) as e:
        load_causal_lm("some-org/old-model")
    one_line(e, "'some-org/old-model' has no safetensors weights", "pickle", "--allow-pickle")


def _adapter(tmp_path) -> tuple[Path, dict]:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
    path = tmp_path / "adapter"
    peft_model.save_pretrained(path)
    assert (path / "adapter_model.safetensors").exists()
    return path, {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}


def test_lora_adapter_safetensors_only(tmp_path):
    from safetensors.torch import load_file

    path, lora = _adapter(tmp_path)
    loaded = load_adapter(_tiny_llama(), str(path))
    got = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert got.keys() == lora.keys() and all(torch.equal(got[k], lora[k]) for k in lora)
    # the same adapter as adapter_model.bin (pickle) only: refused; allowed with allow_pickle
    torch.save(load_file(path / "adapter_model.safetensors"), path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(LisaError) as e:
        load_adapter(_tiny_llama(), str(path))
    one_line(e, str(path), "holds pickle weights (adapter_model.bin)", "--allow-pickle")
    loaded = load_adapter(_tiny_llama(), str(path), allow_pickle=True)
    got = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert all(torch.equal(got[k], lora[k]) for k in lora)


def test_hub_adapter_without_safetensors_is_refused(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "file_exists", lambda repo, filename, **kw: False)
    with pytest.raises(LisaError) as e:
        load_adapter(_tiny_llama(), "some-org/old-adapter")
    one_line(e, "'some-org/old-adapter' has no adapter_model.safetensors", "--allow-pickle")


def test_judge_models_safetensors_only(tmp_path, safe_dir, caplog):
    from transformers import AutoModelForCausalLM

    from lisa_align.evaluation import get_judge, get_pairwise_judge
    from lisa_align.evaluation.judges import JUDGES, _load_judge_model

    folder = _pickle_model(tmp_path / "judge")
    for build in (lambda: get_judge("beaverdam", model_name_or_path=str(folder), device="cpu"),
                  lambda: get_judge("llamaguard", model_name_or_path=str(folder), device="cpu"),
                  lambda: get_pairwise_judge("local", model_name_or_path=str(folder), device="cpu")):
        with pytest.raises(LisaError) as e:
            build()
        one_line(e, str(folder), "holds pickle weights (pytorch_model.bin)", "--allow-pickle")
    tok, model = _load_judge_model(str(folder), AutoModelForCausalLM, torch.float32, "a causal LM",
                                   allow_pickle=True)
    assert isinstance(model, LlamaForCausalLM)
    with caplog.at_level(logging.WARNING, logger="lisa_align.evaluation.judges"):
        _load_judge_model(str(safe_dir), AutoModelForCausalLM, torch.float32, "a causal LM", trust_remote_code=True)
    assert "trust_remote_code=True" in caplog.text
    # the flag goes to model judges only (the refusal judge loads nothing)
    assert allow_pickle_kwargs(JUDGES["refusal"], True) == {}
    assert allow_pickle_kwargs(JUDGES["beaverdam"], True) == {"allow_pickle": True}
    assert allow_pickle_kwargs(JUDGES["beaverdam"], False) == {}


def test_lisa_evaluate_allow_pickle_reaches_the_judge(tmp_path, capsys):
    folder = _pickle_model(tmp_path / "judge")
    run = tmp_path / "run"
    preds = run / "eval" / "m" / "predictions"
    preds.mkdir(parents=True)
    (preds / "harmful.jsonl").write_text(json.dumps({"prompt": "how to", "output": "sure"}) + "\n")
    args = ["evaluate", str(run), "--judge", "beaverdam", "--judge-model", str(folder)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lisa: error: ") and "holds pickle weights" in err and "\n" not in err
    # allowed: the weights load, and the judge then fails on its own check (2 labels, not 14)
    assert main(args + ["--allow-pickle"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lisa: error: ") and "labels" in last and "pickle" not in last, last


@pytest.mark.parametrize("command", ["run", "demo"])
def test_allow_pickle_flag_sets_the_config(tmp_path, monkeypatch, command):
    import lisa_align.pipeline

    seen = []

    class Stop(lisa_align.pipeline.Pipeline):
        def __init__(self, cfg, **kw):
            seen.append(cfg)
            raise LisaError("stop here")

    monkeypatch.setattr(lisa_align.pipeline, "Pipeline", Stop)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    head = ["run", str(cfg)] if command == "run" else ["demo", "--output-dir", str(tmp_path / "runs")]
    assert main([*head]) == 2 and seen[-1].model.allow_pickle is False
    assert main([*head, "--allow-pickle"]) == 2 and seen[-1].model.allow_pickle is True
    assert ModelSettings().allow_pickle is False and ModelSettings().trust_remote_code is False


# ---------------------------------------------------------------------------------------------
# 2. trust_remote_code: off by default, logged
# ---------------------------------------------------------------------------------------------
def test_run_log_records_the_model_settings(tmp_path, caplog, micro):
    from lisa_align.pipeline import Pipeline

    cfg = validate_config(micro(**{"model.trust_remote_code": True}))
    pipeline = Pipeline(cfg, echo=lambda *_: None)
    assert not cfg.run_dir.exists()  # the constructor has no side effects
    pipeline.start()
    records = [json.loads(line) for line in (cfg.run_dir / "log.jsonl").read_text().splitlines()]
    model = next(r for r in records if r.get("event") == "model")
    assert {k: model[k] for k in ("trust_remote_code", "allow_pickle", "model")} == \
        {"trust_remote_code": True, "allow_pickle": False, "model": "tiny"}
    assert model["threads"] == torch.get_num_threads() >= 1  # the run log records the threads used
    with caplog.at_level(logging.WARNING, logger="lisa_align.models.loading"), pytest.raises(LisaError):
        load_model_and_tokenizer(str(tmp_path / "missing"), trust_remote_code=True)
    assert "trust_remote_code=True" in caplog.text


# ---------------------------------------------------------------------------------------------
# 3. The HF token: never written, never printed
# ---------------------------------------------------------------------------------------------
def test_redact_secrets(monkeypatch):
    assert redact_secrets(f"x {FAKE_TOKEN} y") == "x hf_*** y"
    assert redact_secrets("hf_short and path/my_hf_model") == "hf_short and path/my_hf_model"
    monkeypatch.setenv("HF_TOKEN", "not-a-pattern-but-secret-42")
    assert redact_secrets("url?t=not-a-pattern-but-secret-42") == "url?t=hf_***"
    assert find_secret({"a": [1, {"b": "not-a-pattern-but-secret-42"}]}) == "a.1.b"
    assert find_secret({"model": {"name": "tiny"}}) is None


def test_config_with_a_token_is_refused(tmp_path, monkeypatch, micro):
    with pytest.raises(LisaError) as e:
        validate_config(micro(**{"model.name": FAKE_TOKEN}), "cfg.yaml")
    msg = one_line(e, "cfg.yaml", "config field model.name looks like a Hugging Face token", "HF_TOKEN")
    assert FAKE_TOKEN not in msg
    with pytest.raises(LisaError, match="data.user.source") as e:
        load_config(None, [f"data.user.source=https://x/{FAKE_TOKEN}"])
    assert FAKE_TOKEN not in str(e.value)
    with pytest.raises(LisaError, match="config field eval.note looks like") as e:
        atomic_write_yaml(tmp_path / "c.yaml", {"eval": {"note": FAKE_TOKEN}})
    assert not (tmp_path / "c.yaml").exists() and FAKE_TOKEN not in str(e.value)


def _grep_tree(root: Path, secret: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_hf_token_appears_nowhere(tmp_path, monkeypatch, capfd, caplog, micro):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    path = tmp_path / "micro.yaml"
    # model.cache_dir unset: the tiny base is built here, under tmp_path/cache, so the grep below covers it
    path.write_text(yaml.safe_dump(micro(**{"model.cache_dir": None})))
    with caplog.at_level(logging.DEBUG):
        assert main(["run", str(path)]) == 0
        run = tmp_path / "runs" / "micro"
        assert (run / "summary.json").is_file()
        models = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r.get("event") == "model"]
        assert [(r["trust_remote_code"], r["allow_pickle"], r["model"]) for r in models] == [(False, False, "tiny")]
        # failing runs: a missing model, a token in an override, a token in a malformed override
        assert main(["run", str(path), "name=failing", f"model.name={tmp_path / 'missing-model'}"]) == 2
        assert main(["run", str(path), "name=leaky", f"model.name={FAKE_TOKEN}"]) == 2
        assert main(["run", str(path), FAKE_TOKEN]) == 2
    out, err = capfd.readouterr()
    assert "missing-model" in err and "looks like a Hugging Face token" in err and "hf_***" in err
    secret = FAKE_TOKEN.encode()
    assert FAKE_TOKEN not in out and FAKE_TOKEN not in err and FAKE_TOKEN not in caplog.text
    assert _grep_tree(tmp_path, secret) == []  # run dirs, logs, configs, checkpoints, the model cache


# ---------------------------------------------------------------------------------------------
# 4. A config is data, not code
# ---------------------------------------------------------------------------------------------
def test_python_yaml_tags_are_refused_and_run_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = f'!!python/object/apply:os.system ["echo pwned > {marker}"]'
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: {payload}\n")
    assert main(["run", str(path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("lisa: error: ") and "\n" not in err, err
    assert "!!python/object/apply:os.system" in err and "not allowed" in err and "line 1" in err
    assert "pwned" not in captured.out
    with pytest.raises(LisaError) as e:
        load_config(None, [f"model.name={payload}"])
    one_line(e, "override 'model.name'", "not allowed")
    path.write_text("model:\n  name: !!python/name:os.system\n")
    with pytest.raises(LisaError) as e:
        load_config(path)
    one_line(e, str(path), "!!python/name:os.system", "line 2")
    assert not marker.exists()


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else (
                f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                else f"?.{getattr(f, 'attr', '')}")  # a method (model.eval()), not a builtin
            yield name, node


def _only_class_paths_of_registered_defenses() -> bool:
    """The defense registry imports the trainer/arguments classes a registered defense names in code
    (class variables), so that the defenses' settings need no torch; no config can name a class."""
    from lisa_align.config import validate_config

    try:
        validate_config({"finetune": {"methods": [{"name": "sft", "trainer": "os:system"}]}})
    except LisaError as e:
        return "'trainer' is not a setting of sft" in str(e)
    return False


def test_source_has_no_code_loading():
    """No eval/exec/__import__/import_module, no unsafe YAML, no pickle, torch.load only with
    weights_only=True, trust_remote_code never hard-wired on."""
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(SRC)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal") for n in names):
                    bad.append(f"{where}:{node.lineno} imports pickle")
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and \
                    isinstance(node.value, ast.Constant) and node.value.value is True:
                bad.append(f"{where}:{node.value.lineno} trust_remote_code=True")
        for name, call in _calls(tree):
            if (name in ("import_module", "importlib.import_module") and str(where) == "defenses/registry.py"
                    and _only_class_paths_of_registered_defenses()):
                continue
            if name in ("eval", "exec", "__import__", "compile", "import_module", "importlib.import_module",
                        "yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load", "yaml.full_load_all",
                        "yaml.unsafe_load_all", "pickle.load", "pickle.loads", "numpy.load", "np.load"):
                bad.append(f"{where}:{call.lineno} {name}(")
            if name == "torch.load" and not any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in call.keywords):
                bad.append(f"{where}:{call.lineno} torch.load without weights_only=True")
    assert bad == []
