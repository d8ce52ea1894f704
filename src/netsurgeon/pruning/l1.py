"""L1 penalty on the weights with proximal (soft-thresholding) steps: the baseline that AutoPrune argues is
sensitive to its strength (Xiao et al. 2019, Sec. 1). After each optimizer step every prunable weight is
shrunk, w <- sign(w)·max(|w| − lr·λ, 0), the proximal operator of lr·λ·|w|, which gives exact zeros."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._validation import check_positive
from ..masks import mask_zeros, original, prunable_tensors
from ..plan import trained
from ..registry import StageContext, option, register
from ..train import Callback, TrainConfig, Trainer, run_training

__all__ = ["L1Proximal", "L1Config"]


class L1Proximal(Callback):
    """Proximal L1 regularization of every Linear/Conv weight with strength ``lam``.

    In the user's own loop pass the optimizer to :meth:`prepare` (the shrink step is lr·λ).
    """

    def __init__(self, lam: float) -> None:
        check_positive("L1Proximal", "lam", lam)
        self.lam = lam
        self._optimizer: torch.optim.Optimizer | None = None
        self._names: list[str] = []

    def prepare(self, model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None, **_: Any) -> None:
        self._model, self._optimizer = model, optimizer
        self._names = prunable_tensors(model, owner="L1Proximal")

    @torch.no_grad()
    def after_step(self, trainer: Trainer | None = None) -> None:
        if trainer is not None and self._model is not trainer.model:
            self.prepare(trainer.model)
        opt = trainer.optimizer if trainer is not None else self._optimizer
        if opt is None or self._model is None:
            raise ValueError("L1Proximal: call prepare(model, optimizer=opt) before training.")
        shrink = opt.param_groups[0]["lr"] * self.lam
        for name in self._names:  # the trainable tensor, also under an earlier stage's mask
            w = original(self._model, name)
            w.copy_(torch.sign(w) * (w.abs() - shrink).clamp_min(0))

    def finalize(self, model: nn.Module | None = None) -> nn.Module:
        """Weights that reached exactly zero get a mask, so later training keeps them pruned."""
        model = super().finalize(model)
        mask_zeros(model, self._names)
        return model


@dataclass(frozen=True)
class L1Config(TrainConfig):
    owner: ClassVar[str] = "l1"
    lam: float = option(1e-3, "L1 strength lambda (shrink lr x lambda per step)", low=0, low_open=True)


@register("l1", family="pruning", compare=trained("l1"), quick={"lam": 0.05, "epochs": 1},
          kind="training", config=L1Config, needs_data=True,
          citation="Tibshirani 1996 (lasso); proximal step as in Parikh & Boyd 2014, Sec. 6.5.2",
          summary="train with an L1 penalty applied as a proximal (soft-threshold) step: exact zeros")
def _run_l1(model: nn.Module, cfg: L1Config, ctx: StageContext) -> dict[str, Any]:
    report = run_training(model, ctx, cfg, L1Proximal(cfg.lam))
    return report
