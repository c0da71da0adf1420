"""T-Vaccine: Vaccine's perturbation on sampled decoder layers, the only ones that train.

At the first micro-batch of optimizer step ``s`` (so once per step under gradient accumulation):

1. if ``s % K == 0`` (K = ``t_vaccine_measure_every``): a harmful batch (``t_vaccine_probe_batch_size``
   rows of the first ``t_vaccine_harmful_rows`` harmful rows) goes forward with every layer's weights
   trainable, and the gradient of its loss with respect to each layer's attention output is taken
   (Vaccine's first pass, :meth:`VaccineTrainer.output_gradients`, on all layers); its L2 norm per layer,
   over the sum of them, is the layer's probability;
2. if ``s % J == 0`` (J = ``t_vaccine_resample_every``): S = ``t_vaccine_sampled_layers`` layers are drawn
   from those probabilities without replacement (successive draws, as ``numpy.random.choice`` with
   ``replace=False`` and ``p``);
3. only the sampled layers' trainable weights keep ``requires_grad`` (``t_vaccine_scope``: their
   attention module, or their whole decoder layer); the others get no gradient, so the optimizer
   leaves them untouched (no weight decay either) until a draw samples them again.

Each micro-batch then runs Vaccine's two passes with the perturbation on the sampled layers only,
scaled to total norm ρ over them; the other layers' outputs get an exact zero.

The harmful batch and the draw come from generators seeded by ``args.seed`` and the step, not from a
global RNG, and the measured norms, the sampled layers and the steps they were taken at are saved with
each checkpoint, so a resumed run takes the same layers as a straight one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lisa_align.errors import LisaError
from lisa_align.training.base import model_columns
from lisa_align.training.vaccine import VaccineArguments, VaccineTrainer, attention_modules

SCOPES = ("attention", "layer")
MEASURE, DRAW = 0, 1  # the stream of a step's generator: the harmful batch, the draw


def step_seed(seed: int, stream: int, step: int) -> int:
    """The seed of ``stream`` (MEASURE or DRAW) at optimizer step ``step`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([int(seed) % 2**32, stream, step]).generate_state(1)[0])


def layer_probabilities(norms: Sequence[float], k: int) -> torch.Tensor:
    """Each layer's norm over their sum (float64); a LisaError when fewer than ``k`` are positive."""
    p = torch.tensor([float(n) for n in norms], dtype=torch.float64)
    if not torch.isfinite(p).all():
        raise LisaError(f"T-Vaccine: the harmful batch gave non-finite gradient norms {list(norms)} "
                        "(a nan/inf loss, or harmful rows with no response tokens within data.max_length)")
    if int((p > 0).sum()) < k:
        raise LisaError(f"T-Vaccine: only {int((p > 0).sum())} layers have a nonzero harmful-gradient norm, "
                        f"fewer than the {k} it samples; lower sampled_layers or check the harmful data")
    return p / p.sum()


def draw_layers(probs: torch.Tensor, k: int, seed: int) -> list[int]:
    """``k`` distinct layers drawn from ``probs`` (successive draws without replacement), sorted."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.multinomial(probs, k, replacement=False, generator=g).tolist())


def _check_count(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LisaError(f"{name}={value} must be an integer >= {minimum}")


@dataclass
class TVaccineArguments(VaccineArguments):
    vaccine_rho: float = field(default=3.0, metadata={"help": "perturbation norm over the sampled layers"})
    t_vaccine_sampled_layers: int = field(default=8, metadata={"help": "S: layers drawn at each draw"})
    t_vaccine_resample_every: int = field(default=20, metadata={"help": "J: optimizer steps between draws"})
    t_vaccine_measure_every: int = field(default=200, metadata={
        "help": "K: optimizer steps between measurements of the layers' harmful-gradient norms"})
    t_vaccine_harmful_rows: int | None = field(default=200, metadata={
        "help": "the first N harmful rows the norms are measured on (None: all)"})
    t_vaccine_probe_batch_size: int = field(default=1, metadata={"help": "harmful rows per measurement"})
    t_vaccine_scope: str = field(default="attention", metadata={
        "help": "what a sampled layer trains: attention (its attention module's trainable weights, the "
                "reference) or layer (the whole decoder layer's)"})

    def __post_init__(self):
        _check_count("t_vaccine_sampled_layers", self.t_vaccine_sampled_layers)
        _check_count("t_vaccine_resample_every", self.t_vaccine_resample_every)
        _check_count("t_vaccine_measure_every", self.t_vaccine_measure_every)
        _check_count("t_vaccine_probe_batch_size", self.t_vaccine_probe_batch_size)
        if self.t_vaccine_harmful_rows is not None:
            _check_count("t_vaccine_harmful_rows", self.t_vaccine_harmful_rows)
        if self.t_vaccine_scope not in SCOPES:
            raise LisaError(f"t_vaccine_scope='{self.t_vaccine_scope}': use one of {', '.join(SCOPES)}")
        if self.vaccine_random:
            raise LisaError("T-Vaccine has no random variant: vaccine_random must be false")
        super().__post_init__()


class TVaccineTrainer(VaccineTrainer):
    def __init__(self, *args, harmful_dataset=None, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        if not hasattr(a, "t_vaccine_sampled_layers"):
            raise LisaError("TVaccineTrainer needs TVaccineArguments: pass args=TVaccineArguments(...)")
        if harmful_dataset is None or not len(harmful_dataset):
            raise LisaError("TVaccineTrainer needs harmful_dataset= (harmful rows with their harmful answers: "
                            "data.harmful) to measure the layers' gradient norms")
        if a.t_vaccine_harmful_rows is not None:
            if a.t_vaccine_harmful_rows > len(harmful_dataset):
                raise LisaError(f"t_vaccine_harmful_rows={a.t_vaccine_harmful_rows} but the harmful dataset has "
                                f"{len(harmful_dataset)} rows; lower harmful_rows")
            harmful_dataset = harmful_dataset.select(range(a.t_vaccine_harmful_rows))
        self.harmful_dataset = model_columns(harmful_dataset)
        self.layer_params = self._layer_params()
        if a.t_vaccine_sampled_layers > len(self.layer_params):
            raise LisaError(f"T-Vaccine samples {a.t_vaccine_sampled_layers} layers but the model has "
                            f"{len(self.layer_params)} decoder layers; lower sampled_layers")
        self.layer_norms: list[float] | None = None  # each layer's share of the harmful gradient's norm
        self.measured_at: int | None = None
        self.sampled_layers: list[int] | None = None
        self.drawn_at: int | None = None
        self._scheduled_step = -1
        self._resume_checked = False

    def _layer_params(self) -> list[list[torch.nn.Parameter]]:
        """Per decoder layer, the weights its draw trains (trainable now, before any freezing)."""
        modules = attention_modules(self.model)
        owners = modules
        if self.args.t_vaccine_scope == "layer":
            blocks = {id(b._modules["self_attn"]): b for b in self.model.modules() if "self_attn" in b._modules}
            owners = [blocks[id(m)] for m in modules]
        params = [[p for p in o.parameters() if p.requires_grad] for o in owners]
        empty = [i for i, m in enumerate(modules) if not any(p.requires_grad for p in m.parameters())]
        if empty:
            raise LisaError(f"T-Vaccine: the attention modules of layers {empty} have no trainable weights (LoRA "
                            "target_modules without the attention projections?); it perturbs and trains them")
        return params

    # ---- the measurement, the draw, the freezing ---------------------------------------------
    def harmful_batch(self, step: int) -> dict:
        """The harmful rows measured at ``step`` (seeded by args.seed and the step), collated."""
        g = torch.Generator().manual_seed(step_seed(self.args.seed, MEASURE, step))
        n = min(self.args.t_vaccine_probe_batch_size, len(self.harmful_dataset))
        rows = torch.randperm(len(self.harmful_dataset), generator=g)[:n].tolist()
        return self.data_collator([self.harmful_dataset[i] for i in rows])

    def measure_layer_norms(self, model, step: int) -> list[float]:
        """Each layer's share of the norm of the harmful loss's gradient w.r.t. the attention outputs, with
        every layer's weights trainable (as the reference measures); parameter gradients stay untouched."""
        modules = attention_modules(self.model)
        pool = [p for ps in self.layer_params for p in ps]
        was = [p.requires_grad for p in pool]
        try:
            for p in pool:
                p.requires_grad_(True)
            grads = self.output_gradients(model, self.harmful_batch(step), modules)  # Vaccine's first pass
        finally:
            for p, w in zip(pool, was):
                p.requires_grad_(w)
        return [float(g.float().norm()) for g in grads]

    def draw(self, step: int) -> list[int]:
        """The layers drawn at ``step`` from the current norms (seeded by args.seed and the step)."""
        k = self.args.t_vaccine_sampled_layers
        return draw_layers(layer_probabilities(self.layer_norms, k), k, step_seed(self.args.seed, DRAW, step))

    def freeze_unsampled(self) -> None:
        sampled = set(self.sampled_layers or ())
        for i, params in enumerate(self.layer_params):
            for p in params:
                p.requires_grad_(i in sampled)

    def _begin_step(self, model, step: int) -> None:
        if not self._resume_checked:
            self._resume_checked = True
            self.restore_if_resumed()
        a = self.args
        if self.layer_norms is None or step % a.t_vaccine_measure_every == 0:
            self.layer_norms, self.measured_at = self.measure_layer_norms(model, step), step
        if self.sampled_layers is None or step % a.t_vaccine_resample_every == 0:
            self.sampled_layers, self.drawn_at = self.draw(step), step
        self.freeze_unsampled()

    def _perturbations(self, model, inputs, modules) -> list[torch.Tensor]:
        """Vaccine's perturbation on the sampled layers only (total norm ρ over them); a zero elsewhere."""
        if self.sampled_layers is None:
            return super()._perturbations(model, inputs, modules)
        eps = super()._perturbations(model, inputs, [modules[i] for i in self.sampled_layers])
        zero = torch.zeros((), dtype=eps[0].dtype, device=eps[0].device)
        out = [zero] * len(modules)
        for i, e in zip(self.sampled_layers, eps):
            out[i] = e
        return out

    def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
        step = self.state.global_step
        if step != self._scheduled_step:
            self._begin_step(model, step)
            self._scheduled_step = step
        return super().training_step(model, inputs, num_items_in_batch, **kwargs)

    # ---- checkpointed state ------------------------------------------------------------------
    def _settings(self) -> dict:
        a = self.args
        return {"layers": len(self.layer_params), "sampled_layers": a.t_vaccine_sampled_layers,
                "resample_every": a.t_vaccine_resample_every, "measure_every": a.t_vaccine_measure_every,
                "scope": a.t_vaccine_scope}

    def trainer_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        if self.layer_norms is None:
            return {}, {}
        return {}, {"trainer": "t_vaccine", "global_step": self.state.global_step, **self._settings(),
                    "layer_norms": self.layer_norms, "measured_at": self.measured_at,
                    "sampled": self.sampled_layers, "drawn_at": self.drawn_at}

    def restore_trainer_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        mine = self._settings()
        theirs = {k: meta.get(k) for k in mine}
        if theirs != mine:
            raise LisaError(f"the checkpoint {self._resume_dir} was written by T-Vaccine with {theirs}, this run has "
                            f"{mine}: resume with the same settings, or start in a new output folder")
        self.layer_norms = [float(n) for n in meta["layer_norms"]]
        self.measured_at = meta["measured_at"]
        self.sampled_layers = [int(i) for i in meta["sampled"]]
        self.drawn_at = meta["drawn_at"]
