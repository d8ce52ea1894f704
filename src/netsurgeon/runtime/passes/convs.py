"""Pass ``convs``: each convolution timed against the kernels its storage form offers (``Form.conv_candidates``;
for plain float weights every plain form's, e.g. the direct sparse convolution of ``kernels/sparse_conv.py``
where at most half the taps are kept), the fastest kept (:func:`~.timing._swap_timed`). Runs before
``columns`` and ``pool`` (:func:`_swap_layers` runs the three): a layer swapped here is no longer a ``Conv2d``
there."""

from __future__ import annotations

from torch import nn

from ...forms import conv_candidates, layer_form
from ..plan import RuntimePlan
from .columns import _column_candidates
from .pool import _pool_candidates
from .timing import _swap_timed

__all__ = ["_conv_kernels", "_swap_layers"]


def _swap_layers(gm: nn.Module, forms: tuple[str, ...], batch: int, repeats: int, plan: RuntimePlan,
                 probe: nn.Module, last: bool) -> None:
    """The per-layer swaps, in order: convolutions on their forms' kernels, convolutions as im2col over kept
    columns, max-pooling by strided views; each timed against the layer as it is, among the names ``forms``."""
    for kind, cands in _conv_kernels(gm).items():
        if kind in forms:
            _swap_timed(gm, kind, cands, batch, repeats, plan, probe, last)
    if "columns" in forms:
        _swap_timed(gm, "columns", _column_candidates(gm), batch, repeats, plan, probe, last)
    if "pool" in forms:
        _swap_timed(gm, "pool", _pool_candidates(gm), batch, repeats, plan, probe, last)


def _conv_kernels(model: nn.Module) -> dict[str, dict[str, tuple[nn.Module, str, float]]]:
    """``{kernel name: {layer: (module, weight form, density)}}`` for every Conv2d without hooks."""
    out: dict[str, dict[str, tuple[nn.Module, str, float]]] = {}
    for name, m in model.named_modules():
        if type(m) is not nn.Conv2d or m._forward_hooks or m._forward_pre_hooks:
            continue
        weights, form, _ = layer_form(m)
        density = float((m.weight != 0).float().mean())
        for kind, fast in conv_candidates(form, m, density).items():
            out.setdefault(kind, {})[name] = (fast, weights, density)
    return out
