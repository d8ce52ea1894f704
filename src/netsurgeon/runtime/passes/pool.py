"""Pass ``pool``: a MaxPool2d whose window is its stride timed against the maximum of its strided views
(:class:`StridedMaxPool2d`); the faster is kept (:func:`~.timing._swap_timed`). This torch build's NCHW
max-pooling is several times slower than the arithmetic it does, dense model or not.
"""

from __future__ import annotations

from torch import nn

from ...kernels.modules import StridedMaxPool2d


def _pool_candidates(model: nn.Module) -> dict[str, tuple[nn.Module, str, float]]:
    """Each MaxPool2d whose window equals its stride: its :class:`StridedMaxPool2d` form."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.MaxPool2d) and not m._forward_hooks and not m._forward_pre_hooks:
            try:
                out[n] = (StridedMaxPool2d(m), "none", 1.0)
            except ValueError:  # padding, overlapping windows, ceil mode: stays as it is
                continue
    return out
