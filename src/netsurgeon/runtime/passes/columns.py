"""Pass ``columns``: each Conv2d (groups 1) timed against im2col over the columns of its lowered weight that are
not all zero + one GEMM (:class:`ColumnConv2d`); the faster is kept (:func:`~.timing._swap_timed`).

SSL's shape-wise groups and pruning that empties whole (input channel, kernel position) pairs shrink its work;
at batch 1 it can beat the direct convolution even dense. Scattered zeros do not speed convolutions up on this
CPU (docs/runtime.md); removing whole channels does.
"""

from __future__ import annotations

from torch import nn

from ...kernels.modules import ColumnConv2d
from ..weights import linear_form


def _column_candidates(model: nn.Module) -> dict[str, tuple[nn.Module, str, float]]:
    """Each Conv2d (groups 1, zero padding): its :class:`ColumnConv2d` form, weight form and density. Every
    such convolution is a candidate, zero columns or not, so a dense model's runtime form gets the kernel too
    and a ratio against it credits only the skipped columns."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" \
                and not isinstance(m.padding, str) and not m._forward_hooks and not m._forward_pre_hooks:
            out[n] = (ColumnConv2d(m), linear_form(m)[0], float((m.weight != 0).float().mean()))
    return out
