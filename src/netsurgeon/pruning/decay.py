"""Biased weight decay: the classic pruning-by-decay baseline (Hanson & Pratt 1989, after Rumelhart 1987).

A *bias* is a penalty term added to the training error that pushes the network towards a minimal one. Hanson
& Pratt compare two biases with plain weight decay; each is applied to a whole *unit* (a neuron's or
filter's incoming weight set), so that units whose weights are small are pushed out entirely while the
penalty on a large unit saturates (it stops growing, so the units that matter are left alone):

    standard      B(w) = w²                  (per weight: plain weight decay, the baseline)
    hyperbolic    B(u) = u / (1 + u)          u = Σ_j |w_ij| / s, the unit's incoming weight magnitude
    exponential   B(u) = 1 − exp(−u)

with the loss ``E + λ Σ_units B(u)``; the derivative of B with respect to each weight is the unit's decay
rate (``B'(u)·sign(w_ij)/s``): large for a weak unit, vanishing for a strong one. ``per="weight"`` applies the
same saturating functions to each weight alone (u = w²/s², the form Weigend et al. 1991 call weight
elimination). The scale ``s`` is where the penalty starts to saturate.

Our reading: the paper's full text was not available here (only its first page); the unit-wise form with
u = Σ|w| follows the paper's aim (choosing the number of hidden units) and its two named biases. Deviations
and the benchmark are in docs/survey.md. The pruning step after training is the same global magnitude cut as
the ``magnitude`` method, so the methods compare at equal sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._validation import check_positive
from ..devices import model_device
from ..masks import original, prunable_tensors
from ..plan import trained
from ..registry import StageContext, option, register
from ..train import Callback, TrainConfig, Trainer, run_training
from .magnitude import _kept, prune_magnitude

__all__ = ["BIASES", "bias_value", "BiasedWeightDecay", "BiasedDecayConfig"]

BIASES = ("standard", "hyperbolic", "exponential")


def bias_value(kind: str, u: Tensor) -> Tensor:
    """B(u) of ``kind`` (elementwise)."""
    if kind == "standard":
        return u
    if kind == "hyperbolic":
        return u / (1 + u)
    if kind == "exponential":
        return 1 - torch.exp(-u)
    raise ValueError(f"biased_decay: bias must be one of {list(BIASES)}; got {kind!r}.")


def _bias_slope(kind: str, u: Tensor) -> Tensor:
    """dB/du."""
    if kind == "standard":
        return torch.ones_like(u)
    if kind == "hyperbolic":
        return 1 / (1 + u) ** 2
    return torch.exp(-u)


class BiasedWeightDecay(Callback):
    """Add the gradient of ``λ Σ B`` to every Linear/Conv weight's gradient after each backward pass.

    ``bias``: standard (λ Σ w², plain weight decay), hyperbolic or exponential; ``per``: ``unit`` (B of the
    unit's Σ|w|/s, Hanson & Pratt) or ``weight`` (B of w²/s² for each weight). Biases are not decayed.
    """

    def __init__(self, lam: float, bias: str = "hyperbolic", per: str = "unit", scale: float = 1.0) -> None:
        check_positive("BiasedWeightDecay", "lam", lam)
        check_positive("BiasedWeightDecay", "scale", scale)
        if bias not in BIASES:
            raise ValueError(f"biased_decay: bias must be one of {list(BIASES)}; got {bias!r}.")
        if per not in ("unit", "weight"):
            raise ValueError(f"biased_decay: per must be 'unit' or 'weight'; got {per!r}.")
        self.lam, self.bias, self.per, self.scale = lam, bias, per, scale
        self._names: list[str] = []

    def prepare(self, model: nn.Module, **_: Any) -> None:
        self._model = model
        self._names = prunable_tensors(model, owner="biased_decay")

    def penalty(self, model: nn.Module | None = None) -> Tensor:
        """``λ Σ B`` over every weight tensor (for inspection and the tests; training adds its gradient)."""
        model = model or self._model
        total = torch.zeros((), dtype=torch.float64, device=model_device(model))
        for name in self._names:
            total += self._term(original(model, name).detach()).double()
        return self.lam * total

    def _term(self, w: Tensor) -> Tensor:
        if self.bias == "standard":
            return (w * w).sum()
        if self.per == "unit":
            u = w.abs().reshape(w.shape[0], -1).sum(1) / self.scale
        else:
            u = (w / self.scale) ** 2
        return bias_value(self.bias, u).sum()

    @torch.no_grad()
    def after_backward(self, trainer: Trainer | None = None) -> None:
        if trainer is not None and self._model is not trainer.model:
            self.prepare(trainer.model)
        for name in self._names:
            w = original(self._model, name)
            if w.grad is None:
                continue
            if self.bias == "standard":
                w.grad.add_(w, alpha=2 * self.lam)
            elif self.per == "unit":
                flat = w.reshape(w.shape[0], -1)
                u = flat.abs().sum(1) / self.scale
                slope = _bias_slope(self.bias, u) / self.scale
                w.grad.add_((torch.sign(flat) * slope[:, None]).reshape_as(w), alpha=self.lam)
            else:
                u = (w / self.scale) ** 2
                w.grad.add_(_bias_slope(self.bias, u) * 2 * w / self.scale ** 2, alpha=self.lam)


@dataclass(frozen=True)
class BiasedDecayConfig(TrainConfig):
    owner: ClassVar[str] = "biased_decay"
    lam: float = option(1e-4, "strength lambda of the bias term", low=0, low_open=True)
    bias: str = option("hyperbolic", "standard (w^2: weight decay), hyperbolic (u/(1+u)) or exponential "
                                     "(1-exp(-u))", choices=BIASES)
    per: str = option("unit", "unit: u = sum |w| of a neuron's/filter's incoming weights / scale (Hanson & "
                              "Pratt); weight: u = (w/scale)^2 for each weight", choices=("unit", "weight"))
    scale: float = option(1.0, "where the bias saturates (u is measured in units of it)", low=0, low_open=True)
    sparsity: float = option(0.0, "after training, remove this fraction of all weights by magnitude (global); 0: "
                                  "none", low=0, high=1, high_open=True)


@register("biased_decay", family="pruning", compare=trained("biased_decay", sparse=True),
          quick={"epochs": 1, "sparsity": 0.5},
          kind="training", config=BiasedDecayConfig, needs_data=True,
          citation="Hanson & Pratt 1989 (NeurIPS 1), Comparing biases for minimal network construction with "
                   "back-propagation (hyperbolic and exponential biases)",
          summary="train with a saturating per-unit decay that drives weak units to zero, then cut by magnitude")
def _run_biased_decay(model: nn.Module, cfg: BiasedDecayConfig, ctx: StageContext) -> dict[str, Any]:
    cb = BiasedWeightDecay(cfg.lam, cfg.bias, cfg.per, cfg.scale)
    report = run_training(model, ctx, cfg, cb)
    if cfg.sparsity > 0:
        prune_magnitude(model, sparsity=cfg.sparsity, scope="global")
    return {**report, **_kept(model)}
