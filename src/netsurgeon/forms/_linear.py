"""Runtime candidates shared by the forms whose Linear layers the fused sparse kernel runs (pruned float weights,
k-means codes): one numba call for a whole run of layers, and torch's CSR matmul per layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import chain

__all__ = ["float_linear_candidates", "layer_spec"]


def layer_spec(m: nn.Linear, relu: bool, codebook: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:
    """One layer of the runtime's fused chain (``runtime.modules.FusedLinearChain``): its nonzeros as
    (rows, cols, values) or, for k-means weights (``codebook`` = (book, index)), (rows, cols, codes) and the book."""
    bias = None if m.bias is None else m.bias.detach().float().numpy()
    spec: dict[str, Any] = {"n_in": m.in_features, "n_out": m.out_features, "bias": bias, "relu": relu}
    if codebook is not None:
        book, idx = codebook
        rows, cols = torch.nonzero(idx, as_tuple=True)
        spec.update(rows=rows.numpy(), cols=cols.numpy(), codes=(idx[rows, cols] - 1).to(torch.uint8).numpy(),
                    book=book.float().numpy())
    else:
        w = m.weight.detach().float()
        rows, cols = torch.nonzero(w, as_tuple=True)
        spec.update(rows=rows.numpy(), cols=cols.numpy(), values=w[rows, cols].numpy())
    return spec


def float_linear_candidates(layers: list[nn.Linear], relus: list[bool], names: list[str], density: float,
                            codebooks: list[tuple[Tensor, Tensor]] | None = None) -> dict[str, nn.Module]:
    """Runtime candidates of a run of pruned float (or, with ``codebooks``, k-means) Linear layers: the fused
    kernel (where the run is at most half dense, or shared) and CSR per layer (at most half dense)."""
    from ..kernels import fused as kernels
    from ..kernels.modules import CSRLinear, FusedLinearChain

    out: dict[str, nn.Module] = {}
    books = codebooks or [None] * len(layers)
    if density <= 0.5 or codebooks is not None:
        if kernels.available():
            out["fused"] = FusedLinearChain([layer_spec(m, r, b) for m, r, b in zip(layers, relus, books,
                                                                                 strict=True)], names)
        if density <= 0.5:
            out["csr"] = chain([CSRLinear(m.weight.detach(), m.bias) for m in layers], relus)
    return out
