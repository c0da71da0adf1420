"""What every defense declares: its settings and how the pipeline runs it.

A defense is a pydantic model (its settings, validated from the config; no torch here) whose
class variables say where it runs and what it needs. The pipeline reads only these, so a new
defense is one module (a subclass of :class:`Defense`), one line in the registry of
``defenses/__init__.py`` and one entry in ``tests/test_defense_contract.py``.

- ``stages``: where it may be configured: ``align`` (``align.method``), ``finetune``
  (``finetune.methods``) or ``post`` (the ``post`` list: a one-shot transform of each fine-tuned
  model, evaluated beside it as ``<method>+<post>``).
- ``starts_from``: the model a fine-tuning defense trains: ``aligned`` or the unaligned ``base``.
- ``adapter``: ``continue`` when a fine-tuning defense always trains the alignment LoRA itself (the
  reference's single-LoRA mode, e.g. its EWC); None follows ``finetune.adapter``.
- ``needs``: the data roles it reads beside the stage's own rows (fine-tuning: the n user rows;
  alignment: the alignment rows): ``user``, ``alignment`` or ``harmful`` (the harmful source).
- ``trainer`` / ``arguments``: ``"module:Class"`` paths of its Trainer and TrainingArguments
  classes, imported when the stage runs (so the settings stay importable without torch).
- ``datasets``: Trainer keyword → data role, for data it takes beside the training rows.
- ``artifacts``: file name → Trainer attribute, written as JSON next to the adapter.
- ``align_key``: config paths that join the shared-alignment key of a sweep (an align-stage
  defense's data roles join it already).
- ``post_transform`` (post defenses): the ``"module:function"`` path of its transform, imported when
  the stage runs; it is called as ``function(defense, model, tokenizer, context)`` with the fine-tuned
  model (a peft model holding the user adapter, or a full fine-tune) and a
  :class:`lisa_align.post.PostContext`, changes the weights in place and returns a JSON-able record
  (written as ``post.json`` next to the result).
- ``lora_only`` (post defenses): it acts on LoRA factors, so every fine-tuning method must train a
  LoRA (``finetune.lora``, or a method that continues the alignment LoRA).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from lisa_align.errors import LisaError

Stage = Literal["align", "finetune", "post"]
DataRole = Literal["user", "alignment", "harmful"]

BASE_TRAINER = "lisa_align.training.base:BaseTrainer"
BASE_ARGUMENTS = "lisa_align.training.base:BaseArguments"


class Defense(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    label: str | None = None

    stages: ClassVar[tuple[Stage, ...]] = ("finetune",)
    starts_from: ClassVar[Literal["aligned", "base"]] = "aligned"
    adapter: ClassVar[Literal["new", "continue"] | None] = None  # None: finetune.adapter
    needs: ClassVar[tuple[DataRole, ...]] = ()
    trainer: ClassVar[str] = BASE_TRAINER
    arguments: ClassVar[str] = BASE_ARGUMENTS
    datasets: ClassVar[dict[str, DataRole]] = {}
    artifacts: ClassVar[dict[str, str]] = {}
    align_key: ClassVar[tuple[str, ...]] = ()
    post_transform: ClassVar[str] = ""
    lora_only: ClassVar[bool] = False

    @property
    def key(self) -> str:
        """The run folder of a fine-tuning defense (``finetune/<key>``): its label, else its name."""
        return self.label or self.name

    @classmethod
    def defense_name(cls) -> str:
        return cls.model_fields["name"].default

    def resolve(self, section: Any) -> Defense:
        """This defense with its defaults filled from the stage's config section (e.g. Lisa's K1, K2
        and rho from ``finetune.lisa``; a post defense gets the whole run config); raise ValueError for
        settings that cannot run."""
        return self

    def post_key(self, model_key: str) -> str:
        """A post defense's result for the fine-tuned model ``model_key``: its run folder
        (``post/<key>``) and evaluation key, ``<model_key>+<label or name>`` (e.g. ``lisa+antidote``)."""
        return f"{model_key}+{self.key}"

    def training_arguments(self) -> dict[str, Any]:
        """Keywords of :attr:`arguments` beyond the stage's optimizer settings."""
        return {}

    def training_rows(self, rows: list[dict], data: Mapping[str, list[dict]]) -> list[dict]:
        """The rows it trains on, from the stage's own rows (user rows when fine-tuning, alignment
        rows when aligning) and the run's data by role."""
        return rows

    def describe(self) -> str:
        """What the progress line adds about this defense (e.g. ", K1/K2=6/57, rho=1.0")."""
        return ""

    def report_values(self) -> dict[str, Any]:
        """The k1/k2/rho columns of ``results.csv`` (resolved values; none for most defenses)."""
        return {}


def check_rows(defense: Defense, role: str, rows: list[dict], wanted: int, setting: str) -> None:
    """One-line error when a defense asks for more rows of ``role`` than the run has."""
    if wanted > len(rows):
        raise LisaError(f"method '{defense.key}': {setting}={wanted} but the {role} data has {len(rows)} rows; "
                        f"lower {setting} or add {role} data")
