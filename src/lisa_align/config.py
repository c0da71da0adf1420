"""The typed run configuration: YAML in, validated by pydantic, defaults = the paper's settings.

Unknown keys are refused with the closest known key suggested. ``key.path=value`` overrides from the
command line are applied before validation.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lisa_align.data.sources import SourceSpec
from lisa_align.errors import LisaError
from lisa_align.io import find_secret, token_in_config_error
from lisa_align.models.lora import ALIGN_LORA, FINETUNE_LORA, LoraSettings
from lisa_align.training.schedule import validate_lisa_settings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TinySettings(_Strict):
    """The embedded offline base: a small Llama trained on CPU from the synthetic corpus."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 256
    pretrain_rows: int = 6000
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 16
    seed: int | None = Field(None, description="defaults to the run seed")


class ModelSettings(_Strict):
    name: str = Field("tiny", description="'tiny' (embedded base), a HF id, or a local folder")
    dtype: str = "auto"
    trust_remote_code: bool = Field(False, description="run Python code shipped with the model (off unless set)")
    allow_pickle: bool = Field(False, description="also load pickle weights (pytorch_model.bin, adapter_model.bin, "
                               "*.pt); pickle can run code when loaded, so only for files you trust (--allow-pickle)")
    tiny: TinySettings = Field(default_factory=TinySettings)
    cache_dir: str | None = Field(None, description="where the tiny base is cached (default ~/.cache/lisa-align)")


class StageSettings(_Strict):
    """Optimizer settings of one training stage (Trainer arguments)."""

    lr: float = 1e-5
    epochs: float = 20
    max_steps: int = -1
    batch_size: int = 5
    grad_accum: int = 1
    weight_decay: float = 0.0
    scheduler: str = "constant_with_warmup"
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    lora: LoraSettings | None = Field(default_factory=lambda: FINETUNE_LORA.model_copy(deep=True))
    loss_reduction: Literal["token", "example"] = "token"
    bf16: bool = False
    logging_steps: int = 10
    report_to: list[str] = Field(default_factory=list, description="e.g. [wandb] or [tensorboard]")

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not v > 0 or math.isinf(v):
            raise ValueError("must be a positive learning rate")
        return v


class AlignStage(StageSettings):
    enabled: bool = True
    method: Literal["sft", "vaccine", "random_vaccine"] = Field(
        "sft", description="sft; vaccine (perturbation-aware, Vaccine+Lisa = this + a lisa finetune); random_vaccine")
    vaccine_rho: float = Field(2.0, ge=0, allow_inf_nan=False, description="Vaccine perturbation norm / variance")
    output_dir: str | None = Field(None, description="where the aligned model is kept (default RUN_DIR/aligned); "
                                   "runs that name the same folder share one alignment")
    lr: float = 1e-3
    epochs: float = 30
    weight_decay: float = 0.1
    scheduler: str = "cosine"
    lora: LoraSettings | None = Field(default_factory=lambda: ALIGN_LORA.model_copy(deep=True))


class LisaSettings(_Strict):
    k1: int = 100
    k2: int = 900
    rho: float = 1.0
    proximal_warmup_ratio: float = 0.1

    @model_validator(mode="after")
    def _check(self):
        try:
            validate_lisa_settings(self.k1, self.k2, self.rho, self.proximal_warmup_ratio)
        except LisaError as e:  # a ValueError keeps the key path (finetune.lisa) in the message
            raise ValueError(str(e)) from None
        return self


METHODS = ("sft", "bso", "lisa", "na_sft", "vlguard", "ewc")
BI_STATE_METHODS = ("bso", "lisa")


class MethodSpec(_Strict):
    """One fine-tuning method; ``label`` names its run folder (default: the method name).

    - ``sft``: plain fine-tuning of the aligned model on the user set;
    - ``na_sft``: the same on the unaligned base (no alignment stage);
    - ``vlguard``: SFT on the user set plus ``alignment_rows`` alignment rows (default 1000);
      the n user rows, with their round(p·n) harmful ones, are kept as they are;
    - ``ewc``: SFT plus a Fisher-weighted L2 pull toward the start weights, ``ewc_lambda``
      (default 0.001), the Fisher measured on the alignment data;
    - ``lisa``: bi-state optimization with the proximal term; ``bso``: the same with rho = 0.
    """

    name: Literal["sft", "bso", "lisa", "na_sft", "vlguard", "ewc"]
    label: str | None = None
    k1: int | None = None
    k2: int | None = None
    rho: float | None = None
    alignment_rows: int | None = Field(None, gt=0, description="vlguard: alignment rows mixed in (default 1000)")
    ewc_lambda: float | None = Field(None, ge=0, allow_inf_nan=False, description="ewc: strength (default 0.001)")

    @property
    def key(self) -> str:
        return self.label or self.name

    @property
    def vlguard_rows(self) -> int | None:
        """Alignment rows Vlguard mixes in (default 1000); None for other methods."""
        return (self.alignment_rows or 1000) if self.name == "vlguard" else None

    @property
    def ewc_strength(self) -> float | None:
        """EWC's λ (default 0.001, the reference's); None for other methods."""
        return (self.ewc_lambda if self.ewc_lambda is not None else 0.001) if self.name == "ewc" else None

    @property
    def starts_from_base(self) -> bool:
        return self.name == "na_sft"

    def lisa_values(self, base: LisaSettings) -> tuple[int, int, float]:
        rho = 0.0 if self.name == "bso" else (self.rho if self.rho is not None else base.rho)
        return (self.k1 if self.k1 is not None else base.k1, self.k2 if self.k2 is not None else base.k2, rho)

    def lisa(self, base: LisaSettings) -> LisaSettings | None:
        """Lisa settings for the bi-state methods; None for the SFT-family methods."""
        if self.name not in BI_STATE_METHODS:
            return None
        k1, k2, rho = self.lisa_values(base)
        return LisaSettings(k1=k1, k2=k2, rho=rho, proximal_warmup_ratio=base.proximal_warmup_ratio)


class FinetuneStage(StageSettings):
    methods: list[MethodSpec] = Field(default_factory=lambda: [MethodSpec(name="sft"), MethodSpec(name="lisa")])
    lisa: LisaSettings = Field(default_factory=LisaSettings)

    @field_validator("methods", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        out = []
        for m in v or []:
            m = {"name": m} if isinstance(m, str) else m
            if isinstance(m, dict) and m.get("name") not in METHODS:
                raise ValueError(f"unknown method '{m.get('name')}': use one of {', '.join(METHODS)}"
                                 + _suggest(str(m.get("name")), METHODS))
            out.append(m)
        return out

    @model_validator(mode="after")
    def _check_methods(self):
        seen: set[str] = set()
        for i, m in enumerate(self.methods):
            where = f"method '{m.key}' (methods.{i})"
            if m.key in seen:
                raise ValueError(f"{where}: two methods share the run folder '{m.key}'; give each one a distinct 'label'")
            seen.add(m.key)
            if m.name == "bso" and m.rho not in (None, 0):
                raise ValueError(f"{where}: bso is Lisa with rho=0, so rho={m.rho} is not allowed; "
                                 "use name: lisa for rho > 0, or remove rho")
            if m.alignment_rows is not None and m.name != "vlguard":
                raise ValueError(f"{where}: alignment_rows applies to vlguard only; remove it")
            if m.ewc_lambda is not None and m.name != "ewc":
                raise ValueError(f"{where}: ewc_lambda applies to ewc only; remove it")
            if m.name not in BI_STATE_METHODS:
                if any(v is not None for v in (m.k1, m.k2, m.rho)):
                    raise ValueError(f"{where}: k1/k2/rho apply to lisa and bso only; remove them")
                continue
            k1, k2, rho = m.lisa_values(self.lisa)
            try:
                validate_lisa_settings(k1, k2, rho, self.lisa.proximal_warmup_ratio)
            except LisaError as e:
                raise ValueError(f"{where}: {e}") from None
        return self


class DataSettings(_Strict):
    task: Literal["sst2", "agnews", "gsm8k", "alpaca_eval"] = "sst2"
    max_length: int = 512
    n: int = 5000
    p: float = 0.1
    user: SourceSpec = Field(default_factory=lambda: SourceSpec(source="stanfordnlp/sst2", split="train"))
    harmful: SourceSpec = Field(default_factory=lambda: SourceSpec(
        source="PKU-Alignment/BeaverTails", split="30k_train", filter="unsafe"))
    alignment: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(
        source="PKU-Alignment/BeaverTails", split="30k_train", filter="safe", n=10000)])

    @field_validator("p")
    @classmethod
    def _p(cls, v: float) -> float:
        if math.isnan(v) or not 0 <= v <= 1:
            raise ValueError("p is the harmful fraction and must be in [0, 1]")
        return v

    @field_validator("max_length")
    @classmethod
    def _max_length(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("max_length is the longest tokenised row and must be > 0 (e.g. 512)")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("n is the number of fine-tuning samples and must be > 0")
        return v


class EvalSettings(_Strict):
    judge: str = "beaverdam"
    judge_model: str | None = None
    pairwise_judge: str = Field("local", description="alpaca_eval win-rate judge (a registered pairwise judge)")
    pairwise_judge_model: str | None = Field(None, description="local HF causal LM (path or id) for the pairwise "
                                             "judge; None: save the generations only, judge later")
    harmful: SourceSpec = Field(default_factory=lambda: SourceSpec(
        source="PKU-Alignment/BeaverTails", split="30k_test", n=1000))
    task: SourceSpec = Field(default_factory=lambda: SourceSpec(source="stanfordnlp/sst2", split="validation", n=872))
    benign: SourceSpec | None = None
    batch_size: int = 32
    backend: Literal["hf", "vllm"] = Field("hf", description="generation: hf (transformers, batched) or vllm "
                                           "(pip install 'lisa-align[vllm]'; LoRA adapters served by vLLM)")
    vllm: dict[str, Any] = Field(default_factory=dict, description="extra vllm.LLM arguments, e.g. "
                                 "{gpu_memory_utilization: 0.8, tensor_parallel_size: 2}")
    max_new_tokens_harmful: int = 512
    max_new_tokens_task: int = 200
    max_new_tokens_benign: int = 128
    models: list[str] = Field(default_factory=lambda: ["aligned", "methods"],
                              description="which models to evaluate: base, aligned, methods")

    @field_validator("judge")
    @classmethod
    def _judge(cls, v: str) -> str:
        from lisa_align.evaluation.judges import JUDGES

        if str(v).strip().lower().replace("-", "").replace("_", "") not in JUDGES:
            raise ValueError(f"unknown judge '{v}': use one of {', '.join(sorted(JUDGES))}"
                             + _suggest(str(v).lower(), sorted(JUDGES)))
        return v

    @field_validator("pairwise_judge")
    @classmethod
    def _pairwise_judge(cls, v: str) -> str:
        from lisa_align.evaluation.pairwise import PAIRWISE_JUDGES, judge_key

        if judge_key(v) not in PAIRWISE_JUDGES:
            raise ValueError(f"unknown pairwise judge '{v}': use one of {', '.join(sorted(PAIRWISE_JUDGES))}")
        return v


class SlurmSettings(_Strict):
    """Resources of one run when a sweep is launched as a Slurm array."""

    gpus: int = 1
    cpus: int = 8
    mem: str = "64G"
    time: str = "24:00:00"
    partition: str | None = None


class SweepSettings(_Strict):
    """The grid `lisa sweep CONFIG` runs when no --grid is given: axis -> values."""

    grid: dict[str, list[Any]] = Field(default_factory=dict)


class RunConfig(_Strict):
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 42
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    align: AlignStage = Field(default_factory=AlignStage)
    finetune: FinetuneStage = Field(default_factory=FinetuneStage)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    sweep: SweepSettings = Field(default_factory=SweepSettings)
    use_cpu: bool = False

    @model_validator(mode="after")
    def _check_eval_models(self):
        keys = [m.key for m in self.finetune.methods]
        for k in self.eval.models:
            if k not in ("base", "aligned", "methods") and k not in keys:
                raise ValueError(f"eval.models: unknown model '{k}': use base, aligned, methods or a method name "
                                 f"({', '.join(keys) or 'none configured'})"
                                 + _suggest(k, ["base", "aligned", "methods", *keys]))
        return self

    @model_validator(mode="after")
    def _synthetic_training_data_follows_the_seed(self):
        """Synthetic training sources (user, harmful, alignment) are generated with the run seed unless
        they name their own. Resolved here, so the written config.yaml holds the seed really used and a
        sweep's or a saved config's runs get the same data as `lisa run ... seed=N`."""
        d = self.data
        for spec in (d.user, d.harmful, *d.alignment):
            if spec.source.startswith("synthetic:") and "seed" not in spec.model_fields_set:
                spec.seed = self.seed  # assignment marks the field as set: a re-validated dump keeps it
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    return list(model.model_fields)


def _error_line(err: ValidationError, source: str) -> str:
    errors = err.errors()
    e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = tuple(e["loc"])
    dotted = ".".join(str(p) for p in loc)
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key '{dotted}'{_suggest(str(loc[-1]), _known_keys(RunConfig, loc))}"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{source}: {dotted + ': ' if dotted else ''}{msg}"


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise LisaError(f"override '{text}' must look like key.path=value (e.g. data.p=0.2)")
    key, value = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(value)  # the safe loader: plain data, no Python objects
    except yaml.YAMLError as e:
        raise LisaError(f"override '{key.strip()}': {_yaml_problem(e)}") from None


def _yaml_problem(err: yaml.YAMLError, where: str = "") -> str:
    """One line on why YAML was refused: a Python/unknown tag (data only) or a syntax error."""
    if isinstance(err, yaml.constructor.ConstructorError):
        tag = re.search(r"tag '([^']*)'", str(getattr(err, "problem", "") or ""))
        name = tag.group(1).replace("tag:yaml.org,2002:", "!!") if tag else "a tag"
        return (f"the YAML tag {name}{where} is not allowed: a config is data (mappings, lists, strings, "
                "numbers, booleans), never code; remove the tag")
    return f"not valid YAML{where}; fix the syntax"


def _default_section(path: list[str]) -> dict:
    """The values a default section was built with (e.g. eval.harmful -> its source, split and n), so
    that ``eval.harmful.n=100`` on a config without an ``eval.harmful`` section changes only n."""
    obj: Any = RunConfig()
    for part in path:
        obj = getattr(obj, part, None)
    return obj.model_dump(mode="json", exclude_unset=True) if isinstance(obj, BaseModel) else {}


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            if node.get(part) is None:  # absent or null (e.g. lora: null): start from the default section
                node[part] = _default_section(path[: i + 1])
            node = node[part]
            if not isinstance(node, dict):
                raise LisaError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return raw


def read_config_file(path: str | Path) -> dict:
    """The raw mapping of a YAML config file (safe loader: plain data), or a one-line LisaError."""
    p = Path(path)
    if not p.exists():
        raise LisaError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}  # the safe loader: no Python objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise LisaError(f"{p}: {_yaml_problem(e, where)}") from None
    except UnicodeDecodeError as e:
        raise LisaError(f"{p}: not UTF-8 text (bad byte at offset {e.start}); save the config as UTF-8") from None
    if not isinstance(raw, dict):
        raise LisaError(f"{p}: the top level must be a mapping of sections (model, data, align, finetune, eval)")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw = read_config_file(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return validate_config(raw, str(path) if path is not None else "config")


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    where = find_secret(raw)  # before validation: no error message may echo the token
    if where is not None:
        raise LisaError(f"{source}: {token_in_config_error(where)}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise LisaError(_error_line(e, source)) from None
    except LisaError as e:
        raise LisaError(f"{source}: {e}") from None


def config_to_dict(cfg: RunConfig) -> dict:
    return cfg.model_dump(mode="json")
