"""L1 penalty on the weights with proximal (soft-thresholding) steps: the baseline that AutoPrune argues is
sensitive to its strength (Xiao et al. 2019, Sec. 1). After each optimizer step every prunable weight is
shrunk, w <- sign(w)·max(|w| − lr·λ, 0), the proximal operator of lr·λ·|w|, which gives exact zeros."""

from __future__ import annotations

import torch

from .._validation import check_positive
from ..masks import prunable_layers
from ..train import Callback, Trainer

__all__ = ["L1Proximal"]


class L1Proximal(Callback):
    """Proximal L1 regularization of every Linear/Conv2d weight with strength ``lam``."""

    def __init__(self, lam: float) -> None:
        check_positive("L1Proximal", "lam", lam)
        self.lam = lam

    @torch.no_grad()
    def after_step(self, trainer: Trainer) -> None:
        assert trainer.optimizer is not None
        shrink = trainer.optimizer.param_groups[0]["lr"] * self.lam
        for m in prunable_layers(trainer.model, "L1Proximal").values():
            w = m.weight
            w.copy_(torch.sign(w) * (w.abs() - shrink).clamp_min(0))
