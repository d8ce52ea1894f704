"""Robustness to weight distortion (Merolla, Appuswamy, Arthur, Esser, Modha 2016, "Deep neural networks are
robust to weight binarization and other non-linear distortions", arXiv:1606.01981).

The paper's finding: a network trained with a distortion applied to its weights in the forward pass (the
gradient updates the undistorted weights, straight through) becomes robust not only to that distortion at
test time but to other distortions as well, and binarization is one distortion among many. The experiment is
a table: networks trained under each distortion (or none), each tested under each distortion.

Distortions of a weight tensor ``w`` (our reading of the paper's families, each with its one parameter):

* ``binarize``: ``mean|w| · sign(w)`` (one scale per layer, as BWN's per-layer form);
* ``noise``: additive Gaussian ``w + σ·std(w)·ε``, ε ~ N(0, 1) drawn afresh for every forward pass in
  training, once per evaluation (seeded) at test time;
* ``multiplicative``: ``w · (1 + σ·ε)``;
* ``pow2``: ``sign(w) · 2^round(log2 |w|)``, exponents clamped to the ``levels`` largest powers of two
  at or below max|w| (smaller magnitudes go to zero): multiplications become shifts, as in Lin et al. 2016.

:class:`Distort` is the training callback; :func:`distort_model` applies a distortion once to a trained model
(the test-time column of the table). Training with ``distortion="pow2"`` or ``"binarize"`` finalizes the
model with the distorted values, so what is saved is the network that was evaluated.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..masks import prunable_layers
from ..registry import StageContext, option, register
from ..train import Callback, TrainConfig, run_training

__all__ = ["DISTORTIONS", "distort", "distort_model", "Distort", "DistortConfig"]

DISTORTIONS = ("binarize", "noise", "multiplicative", "pow2")


def distort(w: Tensor, kind: str, *, sigma: float = 0.5, levels: int = 8,
            generator: torch.Generator | None = None) -> Tensor:
    """``w`` under distortion ``kind`` (see the module docstring); a new tensor."""
    if kind == "binarize":
        return w.abs().mean() * torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    if kind == "noise":
        eps = torch.randn(w.shape, generator=generator, dtype=w.dtype, device="cpu").to(w.device)
        return w + sigma * w.std() * eps
    if kind == "multiplicative":
        eps = torch.randn(w.shape, generator=generator, dtype=w.dtype, device="cpu").to(w.device)
        return w * (1 + sigma * eps)
    if kind == "pow2":
        top = math.floor(math.log2(max(float(w.abs().max()), 1e-30)))
        e = torch.log2(w.abs().clamp_min(1e-30)).round().clamp(max=top)
        return torch.where(e >= top - levels + 1, torch.sign(w) * torch.exp2(e), torch.zeros_like(w))
    raise ValueError(f"distortion must be one of {list(DISTORTIONS)}; got {kind!r}.")


class _Straight(torch.autograd.Function):
    """The distorted tensor forward, the identity backward (the real weights learn)."""

    @staticmethod
    def forward(ctx, w: Tensor, distorted: Tensor) -> Tensor:  # type: ignore[override]
        return distorted

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return g, None


class _DistortWeights(nn.Module):
    def __init__(self, kind: str, sigma: float, levels: int, generator: torch.Generator) -> None:
        super().__init__()
        self.kind, self.sigma, self.levels, self.generator = kind, sigma, levels, generator

    def forward(self, w: Tensor) -> Tensor:
        if not self.training and self.kind in ("noise", "multiplicative"):
            return w  # noise is a training-time distortion; test under it with distort_model
        with torch.no_grad():
            d = distort(w, self.kind, sigma=self.sigma, levels=self.levels, generator=self.generator)
        return _Straight.apply(w, d)


class Distort(Callback):
    """Train with ``kind`` applied to every Linear/Conv weight in the forward pass (straight-through)."""

    def __init__(self, kind: str, sigma: float = 0.5, levels: int = 8, seed: int = 0) -> None:
        if kind not in DISTORTIONS:
            raise ValueError(f"distort: distortion must be one of {list(DISTORTIONS)}; got {kind!r}.")
        self.kind, self.sigma, self.levels = kind, sigma, levels
        self.generator = torch.Generator().manual_seed(seed)

    def prepare(self, model: nn.Module, **_: Any) -> None:
        self._model = model
        for name, m in prunable_layers(model, "distort").items():
            if parametrize.is_parametrized(m, "weight"):
                if any(isinstance(p, _DistortWeights) for p in m.parametrizations["weight"]):
                    continue
                raise ValueError(f"distort: layer {name!r} already holds parametrized weights; distort a plain "
                                 "float model.")
            parametrize.register_parametrization(
                m, "weight", _DistortWeights(self.kind, self.sigma, self.levels, self.generator))

    def finalize(self, model: nn.Module | None = None) -> nn.Module:
        """Leave plain weights: the distorted values for the deterministic distortions (what was trained is
        what is saved), the real weights for the noise distortions."""
        out = super().finalize(model)
        for m in prunable_layers(out, "distort").values():
            if parametrize.is_parametrized(m, "weight"):
                real = m.parametrizations["weight"].original.detach().clone()
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
                with torch.no_grad():
                    keep = self.kind in ("noise", "multiplicative")
                    m.weight.copy_(real if keep else distort(real, self.kind, levels=self.levels))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


@torch.no_grad()
def distort_model(model: nn.Module, kind: str, *, sigma: float = 0.5, levels: int = 8, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with ``kind`` applied once to every Linear/Conv weight (the test-time distortion)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for m in prunable_layers(out, "distort").values():
        m.weight.copy_(distort(m.weight.detach(), kind, sigma=sigma, levels=levels, generator=g))
    return out


@dataclass(frozen=True)
class DistortConfig(TrainConfig):
    owner: ClassVar[str] = "distort"
    distortion: str = option("binarize", "the distortion applied to the weights in the forward pass",
                             choices=DISTORTIONS)
    sigma: float = option(0.5, "noise: std as a multiple of the layer's weight std; multiplicative: relative std",
                          low=0, low_open=True)
    levels: int = option(8, "pow2: how many powers of two below max|w| are kept (the rest round to zero)",
                         low=1, high=64)


@register("distort", quick={"epochs": 1, "distortion": "pow2"},
          not_compared="a robustness experiment: trains float weights under distortion, compresses nothing",
          kind="training", config=DistortConfig, needs_data=True,
          citation="Merolla, Appuswamy, Arthur, Esser, Modha 2016, Deep neural networks are robust to weight "
                   "binarization and other non-linear distortions, arXiv:1606.01981",
          summary="train with a weight distortion (binarize, noise, power-of-two) in the forward pass")
def _run_distort(model: nn.Module, cfg: DistortConfig, ctx: StageContext) -> dict[str, Any]:
    cb = Distort(cfg.distortion, cfg.sigma, cfg.levels, cfg.seed)
    return run_training(model, ctx, cfg, cb)
