"""``hwgq_inputs``: layers whose input is quantized by the half-wave Gaussian quantizer (Cai, He, Sun, Vasconcelos
2017, "Deep Learning with Low Precision by Half-wave Gaussian Quantization", arXiv:1702.00953, Sec. 3-4; the method
is ``quantization/hwgq.py``).

The record is ``{layer: bits}``; the loader installs the same forward pre-hook the method trained with, so the
quantizers are rebuilt without pickle. The quantizer itself (forward Sec. 3.2, backward approximations Sec. 4,
Eq. (11)-(12)) lives here because a file needs it to rebuild the model.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..coding.schema import check_int, check_mapping
from . import ArchChange, record_change, register_change

__all__ = ["half_gaussian_step", "hwgq", "install_hwgq_input", "hwgq_inputs_of", "apply_hwgq_inputs",
           "record_hwgq_inputs", "BACKWARDS", "HwgqInputs"]

BACKWARDS = ("relu", "clipped", "log_tailed")
_HOOK_ATTR = "_netsurgeon_hwgq_input"


@functools.cache
def half_gaussian_step(bits: int) -> float:
    """The step Δ of the b-bit half-wave quantizer that minimises the squared error for x ~ N(0, 1), x > 0."""
    if not 1 <= bits <= 8:
        raise ValueError(f"hwgq: bits must be in [1, 8]; got {bits}.")
    x = np.linspace(1e-9, 8.0, 400_001)
    w = np.exp(-x * x / 2)  # the half-normal density up to a constant: the argmin does not need it
    levels = (1 << bits) - 1

    def mse(d: float) -> float:
        q = d * np.clip(np.round(x / d), 1, levels)
        return float(((q - x) ** 2 * w).sum())

    lo, hi = 1e-3, 3.0  # golden-section search: the error is unimodal in Δ
    g = (5 ** 0.5 - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = mse(a), mse(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = mse(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = mse(b)
    return (lo + hi) / 2


class _HWGQFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, step: float, levels: int, backward: str) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.qmax, ctx.kind = step * levels, backward
        q = step * torch.clamp(torch.round(x / step), 1, levels)
        return torch.where(x > 0, q, torch.zeros_like(x))

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        pos = x > 0
        if ctx.kind == "relu":
            return g * pos.to(g.dtype), None, None, None
        inside = pos & (x <= ctx.qmax)
        if ctx.kind == "clipped":
            return g * inside.to(g.dtype), None, None, None
        tau = ctx.qmax - 1.0  # log-tailed: derivative 1 / (x − τ) beyond q_max, continuous at q_max
        tail = torch.where(x > ctx.qmax, 1.0 / (x - tau).clamp_min(1e-12), torch.zeros_like(x))
        return g * (inside.to(g.dtype) + tail), None, None, None


def hwgq(x: Tensor, bits: int = 2, backward: str = "clipped") -> Tensor:
    """The b-bit half-wave Gaussian quantizer of ``x`` with the ``backward`` gradient approximation."""
    if backward not in BACKWARDS:
        raise ValueError(f"hwgq: backward must be one of {list(BACKWARDS)}; got {backward!r}.")
    return _HWGQFn.apply(x, half_gaussian_step(bits), (1 << bits) - 1, backward)


class _InputQuantizer:
    def __init__(self, bits: int, backward: str) -> None:
        self.bits, self.backward = bits, backward

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (hwgq(args[0], self.bits, self.backward), *args[1:])


def install_hwgq_input(layer: nn.Module, bits: int, backward: str = "clipped") -> None:
    """Quantize ``layer``'s input from now on (a layer already quantizing keeps its hook)."""
    if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        raise ValueError(f"hwgq: only Linear and Conv1d/2d layers quantize their input; got {type(layer).__name__}.")
    half_gaussian_step(bits)  # validates bits
    if getattr(layer, _HOOK_ATTR, None) is not None:
        return
    q = _InputQuantizer(bits, backward)
    object.__setattr__(layer, _HOOK_ATTR, (q, layer.register_forward_pre_hook(q)))


def hwgq_inputs_of(model: nn.Module) -> dict[str, int]:
    """``{layer name: bits}`` of every layer whose input is HWGQ-quantized."""
    return {n: getattr(m, _HOOK_ATTR)[0].bits for n, m in model.named_modules()
            if getattr(m, _HOOK_ATTR, None) is not None}


def apply_hwgq_inputs(model: nn.Module, inputs: dict[str, int], source: str = "file") -> nn.Module:
    """Install the recorded input quantizers (a file's ``hwgq_inputs``); ValueError names a layer that does not fit."""
    for name, bits in inputs.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{source}: hwgq input layer {name!r} is not in the model.") from None
        install_hwgq_input(layer, int(bits))
    return model


def record_hwgq_inputs(model: nn.Module, inputs: dict[str, int]) -> None:
    """Record the layers whose input is HWGQ-quantized and their bits, so a ``.nsz`` file rebuilds the quantizers."""
    record_change(model, "hwgq_inputs", inputs)


@register_change
class HwgqInputs(ArchChange):
    key = "hwgq_inputs"
    order = 40

    def check(self, where: str, value: Any) -> None:
        check_mapping(where, "hwgq_inputs", value, lambda layer, bits: check_int(where, f"hwgq_inputs.{layer}",
                                                                                 bits, 1, 8))

    def apply(self, model: nn.Module, value: Any, source: str) -> None:
        apply_hwgq_inputs(model, value, source)
