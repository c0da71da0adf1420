"""RepNoise (alignment stage): refusals learnt, harmful answers' representations noised.

Per micro-batch of refusal rows and their paired harmful rows (``defenses/repnoise.py`` pairs them):

    loss = CE_harmless + β · mean over layers of MMD(MLP output on the harmful tokens, N(0, I))
           − α · log(CE_lens + 1)

as in git-disl/Booster ``loss_func/repnoise_loss.py`` (``rep_noise_loss``, the baseline of the
Booster and Antidote papers; the same loss as domenicrosati/representation-noising ``loss.py``):

- layers: the output of each decoder layer's ``mlp`` module (before the residual addition);
- tokens (``mask: reference``): the positions where the harmful ids differ from the refusal ids
  (the other batch cut or padded with 0 to the same width), for the harmful terms; for the harmless
  CE the same comparison from the refusal side. With a shared prompt (right padding) these are the
  answer tokens; with different prompts they include the differing prompt tokens, as in the reference.
  ``mask: answer`` uses each row's labelled answer tokens instead;
- the CE of each term is on the input ids (next token), kept where the mask holds at the target; the
  reference also zeroes the logits at positions outside the mask and never takes token id 0 as a
  target: ``mask: reference`` does both, ``mask: answer`` neither;
- MMD: the biased estimate mean(K_xx + K_yy − K_xy − K_yx) between the batch's flattened (tokens ×
  hidden) masked activations and as many masked samples of N(0, I), K a sum of five Gaussian kernels
  exp(−d²/b) with b = m·2^i, i = −2..2, m the mean off-diagonal squared distance (not differentiated);
- CE_lens: (CE of the final logits + Σ over every hidden state h of the CE of lm_head(norm(h))) /
  (number of hidden states): embeddings and each layer, the last of which the model already normed
  (so it is normed twice), divided by L + 1 over L + 2 terms, as in the reference.

Deviations (none changes the loss on a shared-prompt, right-padded batch): the noise is drawn from a
generator seeded by (seed, rank, step, micro-batch), so a resumed run draws the same noise; a term
with no masked token is 0 where the reference would give nan; kernels and CEs are computed in float32;
``loss_reduction: example`` averages each CE per row first (the reference: ``token``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import datasets
import torch
import torch.nn.functional as F

from lisa_align.data.templates import IGNORE_INDEX
from lisa_align.errors import LisaError
from lisa_align.training.base import BaseArguments, BaseTrainer, check_nonnegative, model_columns
from lisa_align.training.hooks import capture_outputs, decoder_blocks

MASKS = ("reference", "answer")
PAIR = "repnoise_pair"  # the train rows' column: the index of each refusal row's harmful row
HARMFUL = "harmful_"  # batch keys of the paired harmful rows: harmful_input_ids, ...


# ---- the loss, as pure functions ----------------------------------------------------------------
def adapt_to(ids: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``other`` cut or right-padded with 0 to the shape of ``ids`` (the reference's comparison)."""
    rows, cols = ids.shape
    out = torch.zeros_like(ids)
    r, c = min(rows, other.shape[0]), min(cols, other.shape[1])
    out[:r, :c] = other[:r, :c]
    return out


def reference_mask(ids: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Where ``ids`` differs position-wise from ``other`` (adapted to its shape)."""
    return ids.ne(adapt_to(ids, other))


def masked_token_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, *, reference: bool = True,
                    reduction: str = "token") -> torch.Tensor:
    """Next-token CE of ``ids`` where ``mask`` holds at the target. ``reference``: the logits at positions
    outside the mask are zeroed and token id 0 is never a target (the reference's masking). ``token``: mean
    over the kept tokens; ``example``: each row's mean, then the mean over rows. 0 when none is kept."""
    logits = logits[:, :-1].float()
    target = ids[:, 1:]
    keep = mask[:, 1:].bool()
    if reference:
        logits = logits * mask[:, :-1].unsqueeze(-1).to(logits.dtype)
        keep = keep & target.ne(0)
    tok = F.cross_entropy(logits.transpose(1, 2), target.masked_fill(~keep, 0), reduction="none") * keep
    if reduction == "example":
        return (tok.sum(1) / keep.sum(1).clamp(min=1)).mean()
    return tok.sum() / keep.sum().clamp(min=1)


def gaussian_mmd(source: torch.Tensor, target: torch.Tensor, kernel_mul: float = 2.0,
                 kernel_num: int = 5) -> torch.Tensor:
    """Biased MMD² between two equal-sized sets of row vectors, with a sum of ``kernel_num`` Gaussian
    kernels exp(−d²/b) whose bandwidths b are the mean off-diagonal squared distance (of the pooled
    rows, detached) times kernel_mul^i, i = −(kernel_num // 2) .. kernel_num − 1 − kernel_num // 2."""
    x = torch.cat([source, target]).float()
    n = x.shape[0]
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp(min=0)
    d2 = d2 * (1 - torch.eye(n, dtype=d2.dtype, device=d2.device))  # an exact 0 on the diagonal
    base = d2.detach().sum() / max(n * n - n, 1) / kernel_mul ** (kernel_num // 2)
    base = base.clamp(min=torch.finfo(d2.dtype).tiny)  # all rows equal (nothing masked): MMD 0, not nan
    kernel = sum(torch.exp(-d2 / (base * kernel_mul ** i)) for i in range(kernel_num))
    b = source.shape[0]
    return (kernel[:b, :b] + kernel[b:, b:] - kernel[:b, b:] - kernel[b:, :b]).mean()


def noise_mmd(activations: Sequence[torch.Tensor], mask: torch.Tensor,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean over layers of the MMD between each layer's masked activations (batch, tokens, hidden),
    flattened per row, and as many masked N(0, I) samples (drawn in layer order from ``generator``)."""
    total = 0.0
    for act in activations:
        m = mask.unsqueeze(-1).to(torch.float32)
        h = act.float() * m
        noise = torch.randn(h.shape, generator=generator, device=h.device, dtype=torch.float32) * m
        total = total + gaussian_mmd(h.flatten(1), noise.flatten(1))
    return total / len(activations)


def logit_lens_ce(final_logits: torch.Tensor, hidden_states: Sequence[torch.Tensor],
                  lens: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, *,
                  reference: bool = True, reduction: str = "token") -> torch.Tensor:
    """(CE of ``final_logits`` + Σ_h CE of ``lens(h)``) / len(hidden_states), as the reference sums them."""
    total = masked_token_ce(final_logits, ids, mask, reference=reference, reduction=reduction)
    for h in hidden_states:
        total = total + masked_token_ce(lens(h), ids, mask, reference=reference, reduction=reduction)
    return total / len(hidden_states)


def repnoise_masks(harmless: dict, harmful: dict, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(harmless mask, harmful mask) of a paired batch (``input_ids``, ``labels``) for ``mask`` ``mode``."""
    if mode == "reference":
        return (reference_mask(harmless["input_ids"], harmful["input_ids"]),
                reference_mask(harmful["input_ids"], harmless["input_ids"]))
    if mode == "answer":
        return harmless["labels"].ne(IGNORE_INDEX), harmful["labels"].ne(IGNORE_INDEX)
    raise LisaError(f"repnoise_mask='{mode}': use one of {', '.join(MASKS)}")


def repnoise_loss(*, harmless_logits: torch.Tensor, harmless_ids: torch.Tensor, harmless_mask: torch.Tensor,
                  harmful_logits: torch.Tensor, harmful_ids: torch.Tensor, harmful_mask: torch.Tensor,
                  activations: Sequence[torch.Tensor], hidden_states: Sequence[torch.Tensor],
                  lens: Callable[[torch.Tensor], torch.Tensor], alpha: float = 1.0, beta: float = 0.001,
                  generator: torch.Generator | None = None, reference: bool = True,
                  reduction: str = "token") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE_harmless + β · noise MMD − α · log(CE_lens + 1), and its terms (detached)."""
    harmless = masked_token_ce(harmless_logits, harmless_ids, harmless_mask, reference=reference, reduction=reduction)
    noise = noise_mmd(activations, harmful_mask, generator)
    harmful = logit_lens_ce(harmful_logits, hidden_states, lens, harmful_ids, harmful_mask, reference=reference,
                            reduction=reduction)
    loss = harmless + beta * noise - alpha * torch.log(harmful + 1)
    terms = {"harmless_ce": harmless, "noise_mmd": noise, "harmful_lens_ce": harmful}
    return loss, {k: v.detach() for k, v in terms.items()}


# ---- the model's parts the loss reads -----------------------------------------------------------
def mlp_modules(model) -> list[torch.nn.Module]:
    """Each decoder layer's ``mlp``."""
    return decoder_blocks(model, "mlp", "RepNoise")


def final_norm(model) -> torch.nn.Module:
    """The norm the model applies before its LM head (the logit lens applies both to every hidden state)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for owner in (decoder, model):
        for name in ("norm", "final_layer_norm", "ln_f"):
            module = getattr(owner, name, None) if owner is not None else None
            if isinstance(module, torch.nn.Module):
                return module
    raise LisaError(f"{type(model).__name__}: no final norm (norm, final_layer_norm or ln_f) found for RepNoise's "
                    "logit lens")


# ---- data: each refusal row with its harmful row ------------------------------------------------
class PairedCollator:
    """The stage's collator on the refusal rows, and again on their harmful rows (keys ``harmful_*``):
    a batch holds its pairs, so a resumed run, which replays the sampler, sees the same pairs."""

    def __init__(self, collate, harmful: list[dict]):
        self.collate = collate
        self.harmful = harmful

    def __call__(self, features):
        index = [int(f[PAIR]) for f in features]
        batch = self.collate([{k: v for k, v in f.items() if k != PAIR} for f in features])
        for k, v in self.collate([self.harmful[i] for i in index]).items():
            batch[HARMFUL + k] = v
        return batch


@dataclass
class RepNoiseArguments(BaseArguments):
    repnoise_alpha: float = field(default=1.0, metadata={"help": "weight of −log(harmful logit-lens CE + 1)"})
    repnoise_beta: float = field(default=0.001, metadata={"help": "weight of the noise MMD"})
    repnoise_mask: str = field(default="reference", metadata={"help": "reference | answer"})

    def __post_init__(self):
        check_nonnegative("repnoise_alpha", self.repnoise_alpha, "the harmful ascent weight; 0 disables it")
        check_nonnegative("repnoise_beta", self.repnoise_beta, "the noise weight; 0 disables it")
        if self.repnoise_mask not in MASKS:
            raise LisaError(f"repnoise_mask='{self.repnoise_mask}': use one of {', '.join(MASKS)}")
        self.remove_unused_columns = False  # the pair column must reach the collator
        super().__post_init__()


class RepNoiseTrainer(BaseTrainer):
    """``train_dataset``: n refusal rows followed by their n harmful rows (``RepNoise.training_rows``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        data = self.train_dataset
        if data is None or len(data) == 0 or len(data) % 2:
            raise LisaError(f"RepNoiseTrainer needs train_dataset= of n refusal rows followed by their n harmful "
                            f"rows; got {0 if data is None else len(data)} rows")
        data = model_columns(data)
        n = len(data) // 2
        self.train_dataset = datasets.Dataset.from_list([dict(r, **{PAIR: i})
                                                         for i, r in enumerate(data.select(range(n)).to_list())])
        self.data_collator = PairedCollator(self.data_collator, data.select(range(n, 2 * n)).to_list())
        self.loss_is_scaled_for_ga = False  # a micro-batch mean: the Trainer divides by the accumulation steps
        self.last_terms: dict[str, float] = {}
        self._noise_at: tuple[int, int] = (-1, 0)  # (optimizer step, micro-batches drawn in it)

    def noise_generator(self, device) -> torch.Generator:
        """The generator of this micro-batch's noise: seeded by (seed, rank, optimizer step, micro-batch),
        so a resumed run draws what the straight run drew."""
        step, micro = self._noise_at
        micro = micro + 1 if step == self.state.global_step else 0
        self._noise_at = (self.state.global_step, micro)
        key = f"repnoise:{self.args.seed}:{self.args.process_index}:{self.state.global_step}:{micro}".encode()
        g = torch.Generator(device=device)
        g.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1)
        return g

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        harmful = {k[len(HARMFUL):]: v for k, v in inputs.items() if k.startswith(HARMFUL)}
        harmless = {k: v for k, v in inputs.items() if not k.startswith(HARMFUL)}
        if "input_ids" not in harmful:
            raise LisaError("RepNoiseTrainer: a batch without its harmful rows (use the trainer's PairedCollator)")
        unwrapped = self.accelerator.unwrap_model(model)
        mlps = mlp_modules(unwrapped)
        with capture_outputs(mlps) as activations:
            harmful_out = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"],
                                output_hidden_states=True, use_cache=False)
        harmless_out = model(input_ids=harmless["input_ids"], attention_mask=harmless["attention_mask"],
                             use_cache=False)
        norm, head = final_norm(unwrapped), unwrapped.get_output_embeddings()
        harmless_mask, harmful_mask = repnoise_masks(harmless, harmful, self.args.repnoise_mask)
        loss, terms = repnoise_loss(
            harmless_logits=harmless_out.logits, harmless_ids=harmless["input_ids"], harmless_mask=harmless_mask,
            harmful_logits=harmful_out.logits, harmful_ids=harmful["input_ids"], harmful_mask=harmful_mask,
            activations=activations, hidden_states=harmful_out.hidden_states, lens=lambda h: head(norm(h)),
            alpha=self.args.repnoise_alpha, beta=self.args.repnoise_beta,
            generator=self.noise_generator(harmful["input_ids"].device),
            reference=self.args.repnoise_mask == "reference", reduction=self.args.loss_reduction)
        self.last_terms = {k: float(v) for k, v in terms.items()}
        return (loss, harmless_out) if return_outputs else loss
