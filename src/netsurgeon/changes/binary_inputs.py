"""``binary_inputs``: layers that binarize their input (BNN: sign(x); XNOR-Net: sign(x) with the output scaled by
β for a Linear layer or K for a convolution, Rastegari et al. 2016, Eq. (10)-(11); ``quantization/binary.py``).

The record is ``{layer: "sign" | "scaled"}``; the loader installs the same forward hooks the method trained with,
which live here because a file needs them to rebuild the model. The straight-through gradient of the sign is
BNN's (Hubara et al. 2016, Eq. (4)): g · 1_{|x| <= 1}.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..coding.container import NszError
from ..coding.schema import check_mapping, short
from . import ArchChange, record_change, register_change

__all__ = ["BinaryInputs", "record_binary_inputs", "MODES", "INPUT_MODES", "install_binary_input",
           "binary_inputs_of", "apply_binary_inputs", "sign_pm", "SignCancel"]

MODES = INPUT_MODES = ("sign", "scaled")   # BNN's sign(x); XNOR-Net's sign(x) with the β / K output scale
_HOOK_ATTR = "_netsurgeon_binary_input"


def sign_pm(x: Tensor) -> Tensor:
    """+1 where x >= 0, −1 elsewhere, in x's dtype."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class SignCancel(torch.autograd.Function):
    """sign(x) forward, g · 1_{|x| <= 1} backward (BNN Eq. (4); XNOR-Net's activation STE)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return sign_pm(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


class _InputBinarizer:
    """Forward hooks binarizing a layer's input (BNN: sign; XNOR-Net: sign, output scaled by K or β)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._k: Tensor | None = None

    def pre(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if self.mode == "scaled":
            self._k = _input_scale(module, x)
        return (SignCancel.apply(x), *args[1:])

    def post(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
        if self.mode != "scaled":
            return out
        k, self._k = self._k, None
        bias = getattr(module, "bias", None)
        if bias is None:
            return out * k
        b = bias if isinstance(module, nn.Linear) else bias.view(1, -1, *([1] * (out.dim() - 2)))
        return (out - b) * k + b  # a Linear's bias runs along the last dimension (tokens: (B, T, out))


def _input_scale(module: nn.Module, x: Tensor) -> Tensor:
    """XNOR-Net's K (Eq. (11)) for a convolution: mean |x| over the input channels (of each group), averaged
    over each filter window with the layer's stride, padding and dilation (zero padding counted, as the
    convolution counts it), one value per output position (and group); β = mean |x| per sample (Eq. (10)) for
    a Linear layer."""
    if isinstance(module, nn.Linear):
        return x.abs().mean(-1, keepdim=True)
    conv = F.conv2d if isinstance(module, nn.Conv2d) else F.conv1d
    g = module.groups  # type: ignore[union-attr]
    a = x.abs().unflatten(1, (g, -1)).mean(2)  # [B, groups, *spatial]
    box = torch.full((g, 1, *module.kernel_size), 1.0 / math.prod(module.kernel_size), dtype=x.dtype,  # type: ignore[union-attr]
                     device=x.device)
    k = conv(a, box, None, module.stride, module.padding, module.dilation, g)  # type: ignore[union-attr]
    return k.repeat_interleave(module.out_channels // g, dim=1) if g > 1 else k  # type: ignore[union-attr]


def install_binary_input(layer: nn.Module, mode: str) -> None:
    """Binarize ``layer``'s input from now on (idempotent: a layer already binarizing keeps its hooks)."""
    if mode not in INPUT_MODES:
        raise ValueError(f"binary input: mode must be one of {INPUT_MODES}; got {mode!r}.")
    if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        raise ValueError(f"binary input: only Linear and Conv1d/2d layers binarize their input; got "
                         f"{type(layer).__name__}.")
    if getattr(layer, _HOOK_ATTR, None) is not None:
        return
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.padding_mode != "zeros":
        raise ValueError(f"binary input: padding_mode {layer.padding_mode!r} is not supported (zeros only).")
    hook = _InputBinarizer(mode)
    layer.register_forward_pre_hook(hook.pre)
    layer.register_forward_hook(hook.post)
    object.__setattr__(layer, _HOOK_ATTR, mode)


def binary_inputs_of(model: nn.Module) -> dict[str, str]:
    """``{layer name: mode}`` of every layer that binarizes its input."""
    return {name: getattr(m, _HOOK_ATTR) for name, m in model.named_modules()
            if getattr(m, _HOOK_ATTR, None) is not None}


def apply_binary_inputs(model: nn.Module, inputs: dict[str, str], source: str = "file") -> nn.Module:
    """Install the input binarization a file records; raises ValueError naming a layer that does not fit."""
    for name, mode in inputs.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{source}: binary-input layer {name!r} is not in the model.") from None
        try:
            install_binary_input(layer, mode)
        except ValueError as e:
            raise ValueError(f"{source}: layer {name!r}: {e}") from None
    return model



def record_binary_inputs(model: nn.Module, inputs: dict[str, str]) -> None:
    """Record on ``model`` which layers binarize their input ({layer: "sign" | "scaled"})."""
    record_change(model, "binary_inputs", inputs)


@register_change
class BinaryInputs(ArchChange):
    key = "binary_inputs"
    order = 30

    def check(self, where: str, value: Any) -> None:
        def one(layer: str, mode: Any) -> None:
            if mode not in MODES:
                raise NszError(f"{where}: field 'binary_inputs' must map layer names to 'sign' or 'scaled'; got "
                               f"{short(value)}.")

        check_mapping(where, "binary_inputs", value, one)

    def apply(self, model: nn.Module, value: Any, source: str) -> None:
        apply_binary_inputs(model, value, source)
