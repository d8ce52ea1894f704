"""How a layer's weight is held, for the runtime's passes: read through the storage-form registry (``forms/``),
so a new form needs nothing here."""

from __future__ import annotations

import torch
from torch import nn

from ..forms import layer_form

__all__ = ["linear_form"]


def linear_form(m: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """How a layer's weight is held: its pipeline weight form (``"float"`` for plain, possibly masked weights) and
    its stored arrays (``Form.parts``: e.g. ``{book, index}`` for k-means, ``{q, scale}`` for int8 and binary;
    ``{weight}`` for plain float)."""
    form, _, parts = layer_form(m)
    return form, parts
