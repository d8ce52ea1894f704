"""How a layer's weight is held (pruned float, k-means-shared, int8, binary): what the runtime's candidates are
built from. One function, so that the storage forms are read in one place."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["linear_form"]


def linear_form(m: nn.Linear) -> tuple[str, dict[str, torch.Tensor]]:
    """How a Linear layer's weight is held: ``("shared", {book, index})``, ``("int8", {q, scale})``,
    ``("binary", {q: ±1 int8 signs, scale})`` or ``("float", {weight})`` (pruning masks already applied)."""
    if parametrize.is_parametrized(m, "weight"):
        for p in m.parametrizations["weight"]:
            if type(p).__name__ == "SharedWeights":
                return "shared", {"book": p.codebook.detach(), "index": p.index}
            if type(p).__name__ == "Int8Weights":
                return "int8", {"q": p.q, "scale": p.scale}
            if type(p).__name__ == "BinaryWeights":
                return "binary", {"q": p.signs, "scale": p.scale}
    return "float", {"weight": m.weight.detach()}
