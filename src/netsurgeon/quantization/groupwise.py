"""Weight-only quantization with one (scale, zero point) per group of input columns of a row, and round-to-nearest
(RTN), the baseline GPTQ is measured against (Frantar et al. 2023, arXiv:2210.17323, Sec. 2 and 5; the grid is the
official code's ``quant.Quantizer``).

The grid of a group x (its weights in one row, ``group_size`` consecutive inputs, or the whole row):

* asymmetric ("zero points"): xmin = min(min x, 0), xmax = max(max x, 0), scale = (xmax − xmin)/(2^b − 1),
  zero = round(−xmin/scale) (an integer code in [0, 2^b − 1]);
* symmetric: a = max|x|, scale = 2a/(2^b − 1), zero = 2^(b−1) (the official code's choice: the grid runs from
  −2^(b−1)·scale to (2^(b−1) − 1)·scale, so the largest positive weight is clipped by half a step; unlike the
  official code, a group of non-negative weights also gets xmin = −a).

code = clamp(round(x/scale) + zero, 0, 2^b − 1), value = scale·(code − zero). A range of zero gets [−1, 1]. Since
xmin <= 0 <= xmax and the zero point is an integer, **0 is always on the grid exactly**: a pruned weight is stored
as the code ``zero`` and comes back as 0.0, so quantizing a sparse layer keeps its zeros (its mask is baked in).

:class:`GroupQuantWeights` holds the codes (uint8, one per weight), scales and zero points, and dequantizes in its
forward (``forms/grouped.py``: the pipeline's weight form ``grouped``, stored in a ``.nsz`` file as packed codes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._validation import check_finite_model
from ..calibration import discover_layers, layer_targets
from ..forms.grouped import GroupQuantWeights, dequantize, dequantize_codes, groups_of
from ..masks import weight_matrix
from ..registry import MethodConfig, StageContext, option, register

__all__ = ["grid_params", "quantize", "dequantize", "rtn_quantize", "GroupQuantWeights", "install_group_quant",
           "quantize_model_rtn", "GroupQuantConfig", "RTNConfig"]


def grid_params(x: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """(scale, zero) of each row of ``x`` (rows, g) (see the module docstring). Shapes: -> (rows,), (rows,)."""
    maxq = 2**bits - 1
    xmin = x.min(1).values.clamp(max=0)
    xmax = x.max(1).values.clamp(min=0)
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, 2 ** (bits - 1)) if symmetric else torch.round(-xmin / scale)
    return scale, zero


def quantize(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer codes clamp(round(x/scale) + zero, 0, maxq), as floats; scale and zero broadcast against x."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def rtn_quantize(W: Tensor, bits: int, group_size: int | None, symmetric: bool,
                 keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Round-to-nearest with a grid per group of ``group_size`` columns of each row (None: per row).

    ``keep`` (rows, d) bool: weights outside it are given the zero code (exact 0) and left out of the grid.
    Returns codes (rows, d) uint8, scales (rows, groups), zero points (rows, groups) uint8 (None when symmetric)
    and the dequantized weights (rows, d)."""
    rows, d = W.shape
    g = d if group_size is None or group_size >= d else group_size
    keep_f = torch.ones_like(W) if keep is None else keep.to(W.dtype)
    codes = torch.empty(rows, d, dtype=torch.uint8, device=W.device)
    scales = torch.empty(rows, groups_of(d, group_size), dtype=W.dtype, device=W.device)
    zeros = torch.empty_like(scales)
    for gi, a in enumerate(range(0, d, g)):
        cols = W[:, a:a + g] * keep_f[:, a:a + g]
        s, z = grid_params(cols, bits, symmetric)
        codes[:, a:a + g] = quantize(cols, s[:, None], z[:, None], 2**bits - 1).to(torch.uint8)
        scales[:, gi], zeros[:, gi] = s, z
    deq = dequantize_codes(codes, scales, zeros, g)
    return codes, scales, None if symmetric else zeros.to(torch.uint8), deq


@torch.no_grad()
def install_group_quant(model: nn.Module, tensor: str, par: GroupQuantWeights) -> None:
    """Replace tensor ``tensor``'s parametrizations (masks are baked in first) by ``par``; the float original is
    set to the dequantized weights. In place."""
    mod_name, _, attr = tensor.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    if parametrize.is_parametrized(module, attr):
        parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    p = getattr(module, attr)
    p.data.copy_(par(p))
    parametrize.register_parametrization(module, attr, par, unsafe=True)


def _weight_tensors(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """{weight FQN: kind} of every layer a calibrated method supports, and the skipped layers."""
    layers, skipped = discover_layers(model)
    return {t.tensor: t.kind for n, m in layers.items() for t in layer_targets(n, m)}, skipped


@torch.no_grad()
def quantize_model_rtn(model: nn.Module, bits: int = 4, group_size: int | None = 128,
                       symmetric: bool = False) -> dict[str, Any]:
    """Round-to-nearest group quantization of every supported weight (Linear, Conv, attention, HF Conv1D), in
    place: each becomes a :class:`GroupQuantWeights`. Masked weights stay exactly 0. Returns a report."""
    check_finite_model("rtn", model)
    tensors, skipped = _weight_tensors(model)
    err = {}
    for fqn, kind in tensors.items():
        mod_name, _, attr = fqn.rpartition(".")
        p = getattr(model.get_submodule(mod_name) if mod_name else model, attr)
        W = weight_matrix(p.detach(), kind).float().clone()
        codes, scales, zeros, deq = rtn_quantize(W, bits, group_size, symmetric)  # pruned zeros stay 0: on the grid
        install_group_quant(model, fqn, GroupQuantWeights(codes, scales, zeros, bits, group_size,
                                                          shape=tuple(p.shape), transposed=kind == "transposed"))
        err[fqn] = float((deq - W).square().mean().sqrt())
    return {"bits": bits, "group_size": group_size, "rms_error": err, "skipped": skipped}


# -- registered methods ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupQuantConfig(MethodConfig):
    """The grid options GPTQ and RTN share."""

    bits: int = option(4, "bits per weight", low=2, high=8)
    group_size: int | None = option(128, "input columns per (scale, zero point); null: one per output row", low=2)
    symmetric: bool = option(False, "symmetric grid (zero point 2^(bits-1)) instead of per-group zero points")


@dataclass(frozen=True)
class RTNConfig(GroupQuantConfig):
    owner: ClassVar[str] = "rtn"


@register("rtn", family="quantization", compare=lambda p: [{"rtn": {}}], quick={"bits": 4, "group_size": 16},
          kind="quantizer", config=RTNConfig, gives="grouped",
          citation="round-to-nearest, the baseline of Frantar et al. 2023, GPTQ, arXiv:2210.17323, Sec. 5",
          summary="weight-only round-to-nearest quantization with a scale and zero point per group of inputs")
def _run_rtn(model: nn.Module, cfg: RTNConfig, ctx: StageContext) -> dict[str, Any]:
    return quantize_model_rtn(model, cfg.bits, cfg.group_size, cfg.symmetric)
