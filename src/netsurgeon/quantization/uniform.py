"""Uniform symmetric 8-bit quantization of weights: post-training (PTQ) and quantization-aware (QAT).

Survey of model compression (Cheng et al.), "8-bit quantization"; the scheme is the standard symmetric one:
scale s = max|w| / 127 per tensor or per output channel, q = clamp(round(w / s), −127, 127), w ≈ q·s.
Zero maps to zero exactly, so pruned weights stay pruned. QAT (fake quantization) runs the forward pass on
q·s and passes the gradient straight through to the float weights (the straight-through estimator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._validation import check_finite_model
from ..forms.int8 import Int8Weights, dequantize
from ..masks import SITE_KINDS, sites_of
from ..plan import trained
from ..registry import MethodConfig, StageContext, option, register
from ..train import Callback, TrainConfig, run_training

__all__ = ["quantize_int8", "Int8Weights", "FakeQuantInt8", "quantize_model_int8", "QuantizationAwareTraining",
           "Int8Config", "QATConfig"]


def quantize_int8(w: Tensor, per_channel: bool = True) -> tuple[Tensor, Tensor]:
    """Return ``(q int8 of w's shape, scale)``; scale has shape (out_channels,) or () per tensor."""
    w = w.detach()
    amax = w.abs().flatten(1).amax(1) if per_channel else w.abs().amax()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    view = scale.view(-1, *([1] * (w.dim() - 1))) if per_channel else scale
    return torch.clamp(torch.round(w / view), -127, 127).to(torch.int8), scale.float()


class FakeQuantInt8(nn.Module):
    """Parametrization for QAT: forward uses the int8 grid, gradient passes straight to the float weight."""

    def __init__(self, per_channel: bool = True) -> None:
        super().__init__()
        self.per_channel = per_channel

    def forward(self, w: Tensor) -> Tensor:
        q, s = quantize_int8(w, self.per_channel)
        return w + (dequantize(q, s) - w).detach()


@torch.no_grad()
def quantize_model_int8(model: nn.Module, per_channel: bool = True, linear_only: bool = False) -> nn.Module:
    """Post-training int8 quantization of every weight site (Linear, attention projections, embeddings, and
    convolutions unless ``linear_only``), in place.

    Existing parametrizations (masks, fake quantization) are baked in first. Biases stay float.
    """
    check_finite_model("quantize_model_int8", model)
    for site, m in sites_of(model, "quantize_model_int8", _kinds(linear_only)):
        w = getattr(m, site.attr).detach().clone()
        if parametrize.is_parametrized(m, site.attr):
            parametrize.remove_parametrizations(m, site.attr, leave_parametrized=True)
        q, s = quantize_int8(w, per_channel)
        parametrize.register_parametrization(m, site.attr, Int8Weights(q, s), unsafe=True)
    return model


def _kinds(linear_only: bool) -> tuple[str, ...]:
    """The weights int8 covers: every kind (one scale per row: output channel, token or projection row), or
    without ``linear_only``'s convolutions."""
    return tuple(k for k in SITE_KINDS if not (linear_only and k == "conv"))


class QuantizationAwareTraining(Callback):
    """Attach fake int8 quantization to every weight at the start of training (masks are kept: the
    fake quantizer stacks on top of them). :meth:`finalize` turns the trained weights into int8."""

    def __init__(self, per_channel: bool = True, linear_only: bool = False) -> None:
        self.per_channel, self.linear_only = per_channel, linear_only

    def prepare(self, model: nn.Module, **_: Any) -> None:
        self._model = model
        for site, m in sites_of(model, "QuantizationAwareTraining", _kinds(self.linear_only)):
            plist = m.parametrizations[site.attr] if parametrize.is_parametrized(m, site.attr) else []
            if not any(isinstance(p, FakeQuantInt8) for p in plist):
                parametrize.register_parametrization(m, site.attr, FakeQuantInt8(self.per_channel), unsafe=True)

    def finalize(self, model: nn.Module | None = None) -> nn.Module:
        """Replace the fake quantizers by int8 weights and scales (post-training quantization of the result)."""
        return quantize_model_int8(super().finalize(model), self.per_channel, self.linear_only)


# -- registered methods ----------------------------------------------------------------------------------
_SURVEY = "Cheng et al., A Survey of Model Compression and Acceleration for DNNs, Sec. 2.1 (8-bit quantization)"


@dataclass(frozen=True)
class Int8Config(MethodConfig):
    owner: ClassVar[str] = "int8"
    per_channel: bool = option(True, "one scale per output channel (false: per tensor)")
    linear_only: bool = option(False, "quantize Linear layers only (convolutions stay float)")


@register("int8", family="quantization", compare=lambda p: [{"int8": {}}], quick={},
          kind="quantizer", config=Int8Config, gives="int8", citation=_SURVEY,
          summary="symmetric int8 post-training quantization of weights, max|w|/127 scales")
def _run_int8(model: nn.Module, cfg: Int8Config, ctx: StageContext) -> dict[str, Any]:
    quantize_model_int8(model, cfg.per_channel, cfg.linear_only)
    return {}


@dataclass(frozen=True)
class QATConfig(TrainConfig):
    owner: ClassVar[str] = "qat"
    epochs: int = option(1, "training epochs with fake quantization", low=1)
    per_channel: bool = option(True, "one scale per output channel (false: per tensor)")
    linear_only: bool = option(False, "quantize Linear layers only (convolutions stay float)")


@register("qat", family="quantization", compare=trained("qat"), quick={"epochs": 1},
          kind="training", config=QATConfig, gives="int8", needs_data=True,
          citation=_SURVEY + "; fake quantization with the straight-through estimator (Bengio et al. 2013)",
          summary="int8 quantization-aware training (fake quantization), then int8 weights")
def _run_qat(model: nn.Module, cfg: QATConfig, ctx: StageContext) -> dict[str, Any]:
    return run_training(model, ctx, cfg, QuantizationAwareTraining(cfg.per_channel, cfg.linear_only))
