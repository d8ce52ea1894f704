"""Half-wave Gaussian quantization of activations (Cai, He, Sun, Vasconcelos 2017, "Deep Learning with Low
Precision by Half-wave Gaussian Quantization", arXiv:1702.00953, Sec. 3-4).

Forward (Sec. 3.2): a ReLU whose output is quantized to ``2^b`` values, Q(x) = 0 for x <= 0 and, for x > 0,
the uniform levels q_i = i·Δ (i = 1 .. 2^b − 1) with thresholds halfway between levels. After BatchNorm the
pre-activations are close to N(0, 1), so Δ is the one that minimises E[(Q(x) − x)²] over the positive half of
the Gaussian (computed here by numerical integration; it reproduces the paper's values: 1 bit 0.798 =
E[x | x > 0], 2 bits 0.538).

Backward (Sec. 4): Q's derivative is zero almost everywhere, so the gradient is that of a ReLU approximation:
``relu`` (1 for x > 0), ``clipped`` (1 for 0 < x <= q_max, the paper's choice, Eq. (11)), or ``log_tailed``
(the clipped ReLU continued by a logarithm beyond q_max, derivative 1 / (x − τ) with τ = q_max − 1,
Eq. (12)).

Where: the input of every Linear/Conv layer but the first (whose input is the data) is quantized by a forward
pre-hook, the place where a ReLU's (or max-pool's: they commute with the monotone Q) output arrives; parameter
names do not change and the ``.nsz`` architecture record lists the layers and their bits (``hwgq_inputs``), so
the quantizers are rebuilt on load. The paper pairs HWGQ with binary weights (BW, Sec. 5): the method's
``binary_weights`` option trains BWN weights (one α per output channel) alongside.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..masks import prunable_layers
from ..registry import StageContext, option, register
from ..train import Callback, TrainConfig, Trainer, run_training
from .binary import Binarize

__all__ = ["half_gaussian_step", "hwgq", "install_hwgq_input", "hwgq_inputs_of", "apply_hwgq_inputs", "HWGQ",
           "HWGQConfig", "BACKWARDS"]

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


class HWGQ(Callback):
    """Train with HWGQ activations (the input of every layer but the first), optionally with BWN weights.

    Args:
        bits: activation bits (the paper: 2).
        backward: ``relu``, ``clipped`` (the paper's choice) or ``log_tailed``.
        binary_weights: also binarize the weights (α·sign(W) per output channel), the paper's "BW" networks;
            the first and last layers keep real weights, as in the paper.
    """

    def __init__(self, bits: int = 2, backward: str = "clipped", binary_weights: bool = True, seed: int = 0) -> None:
        if backward not in BACKWARDS:
            raise ValueError(f"hwgq: backward must be one of {list(BACKWARDS)}; got {backward!r}.")
        half_gaussian_step(bits)
        self.bits, self.backward = bits, backward
        self.weights = Binarize("alpha", None, keep_first=True, keep_last=True, lr_scale=False, seed=seed) \
            if binary_weights else None

    def prepare(self, model: nn.Module, **kw: Any) -> None:
        self._model = model
        layers = list(prunable_layers(model, "hwgq").items())
        if len(layers) < 2:
            raise ValueError("hwgq: the model needs at least two Linear/Conv layers (the first layer's input is the "
                             "data and stays real).")
        for _, layer in layers[1:]:
            install_hwgq_input(layer, self.bits, self.backward)
        if self.weights is not None:
            self.weights.prepare(model, **kw)

    def after_backward(self, trainer: Trainer | None = None) -> None:
        if self.weights is not None:
            self.weights.after_backward(trainer)

    def after_step(self, trainer: Trainer | None = None) -> None:
        if self.weights is not None:
            self.weights.after_step(trainer)

    def finalize(self, model: nn.Module | None = None) -> nn.Module:
        from ..models import record_hwgq_inputs

        out = self.weights.finalize(model) if self.weights is not None else super().finalize(model)
        record_hwgq_inputs(out, hwgq_inputs_of(out))
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.weights.state_dict() if self.weights is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.weights is not None:
            self.weights.load_state_dict(state)


@dataclass(frozen=True)
class HWGQConfig(TrainConfig):
    owner: ClassVar[str] = "hwgq"
    bits: int = option(2, "activation bits (2^bits values, 0 included; the paper: 2)", low=1, high=8)
    backward: str = option("clipped", "gradient approximation: relu, clipped (the paper's) or log_tailed",
                           choices=BACKWARDS)
    binary_weights: bool = option(True, "binary weights too (BWN, first and last layers real), as the paper's BW nets")
    optimizer: str = option("adam", "sgd (with momentum) or adam", choices=("sgd", "adam"))
    lr: float = option(1e-3, "learning rate", low=0, low_open=True)
    weight_decay: float = option(0.0, "L2 weight decay", low=0)


def _hwgq_gives(cfg: HWGQConfig) -> str:
    return "binary" if cfg.binary_weights else "float"


@register("hwgq", kind="training", config=HWGQConfig, needs_data=True, gives=_hwgq_gives,
          citation="Cai, He, Sun, Vasconcelos 2017 (CVPR), Deep Learning with Low Precision by Half-wave Gaussian "
                   "Quantization, Sec. 3-4 (Eq. (11)-(12))",
          summary="2-bit half-wave Gaussian activations (clipped-ReLU backward) with binary weights")
def _run_hwgq(model: nn.Module, cfg: HWGQConfig, ctx: StageContext) -> dict[str, Any]:
    cb = HWGQ(cfg.bits, cfg.backward, cfg.binary_weights, cfg.seed)
    return {**run_training(model, ctx, cfg, cb), "step": half_gaussian_step(cfg.bits),
            "quantized_inputs": list(hwgq_inputs_of(model))}
