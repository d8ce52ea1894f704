"""k-means weight sharing with centroid fine-tuning (Han, Mao, Dally 2016, "Deep Compression",
arXiv:1510.00149, Sec. 3).

Per layer, the surviving (nonzero) weights are clustered in 1-D (Sec. 3.1, Eq. (1): minimise the
within-cluster sum of squares); each weight then stores only its cluster index. Initialization (Sec. 3.2)
is linear over [min, max] (the paper's best), density-based (quantiles of the CDF) or random (Forgy).
Fine-tuning (Sec. 3.3, Eq. (3)): the gradient of a centroid is the sum of the gradients of the weights
that share it, which is exactly what autograd gives for ``codebook[index]``. Index 0 is reserved for zero,
so pruned weights stay pruned; a layer of ``bits`` bits has 2**bits - 1 shared values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._validation import check_finite_model, check_positive
from ..masks import prunable_layers

__all__ = ["kmeans_1d", "SharedWeights", "share_weights", "share_weights_global", "SharingReport"]

log = logging.getLogger(__name__)
_INITS = ("linear", "density", "random")


def kmeans_1d(x: Tensor, k: int, init: str = "linear", iters: int = 50, seed: int = 0,
              sample_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Lloyd's algorithm on scalars: returns ``(centroids (k,), labels (n,))``, centroids sorted.

    ``sample_weight`` (n,) weights each point in the centroid update (Hessian-weighted k-means). An empty
    cluster keeps its centroid. Assignment uses the midpoints of sorted centroids (O(n log k)).
    """
    if init not in _INITS:
        raise ValueError(f"kmeans_1d: init must be one of {_INITS}; got {init!r}.")
    check_positive("kmeans_1d", "k", k, integer=True)
    x = x.detach().double().flatten()
    if x.numel() == 0:
        return torch.zeros(k, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    sw = torch.ones_like(x) if sample_weight is None else sample_weight.detach().double().flatten()
    if init == "linear":
        c = torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64)
    elif init == "density":
        c = torch.quantile(x, (torch.arange(k, dtype=torch.float64) + 0.5) / k)
    else:
        g = torch.Generator().manual_seed(seed)
        c = x[torch.randint(x.numel(), (k,), generator=g)].sort().values
    for _ in range(iters):
        labels = torch.bucketize(x, (c[1:] + c[:-1]) / 2)
        total = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, x * sw)
        weight = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, sw)
        new = torch.where(weight > 0, total / weight.clamp_min(1e-300), c).sort().values
        if torch.equal(new, c):
            break
        c = new
    return c, torch.bucketize(x, (c[1:] + c[:-1]) / 2)


class SharedWeights(nn.Module):
    """Parametrization ``W -> [0, codebook][index]``: every weight is one of the shared values (or zero).

    ``codebook`` is trainable (centroid fine-tuning); ``index`` is a buffer, 0 meaning a pruned weight.
    """

    def __init__(self, codebook: Tensor, index: Tensor) -> None:
        super().__init__()
        self.codebook = nn.Parameter(codebook.float().clone())
        self.register_buffer("index", index.long())

    def forward(self, w: Tensor) -> Tensor:
        table = torch.cat([self.codebook.new_zeros(1), self.codebook])
        return table[self.index]


@dataclass(frozen=True)
class SharingReport:
    """Per tensor: bits, number of shared values, surviving weights, and the RMS error it introduced."""

    name: str
    bits: int
    clusters: int
    nonzero: int
    rms_error: float


def _bits_for(bits: int | dict[str, int], name: str, module: nn.Module) -> int:
    if isinstance(bits, int):
        return bits
    kind = "conv" if isinstance(module, nn.Conv2d) else "fc"
    return int(bits.get(name, bits.get(kind, 0)))


@torch.no_grad()
def share_weights(model: nn.Module, bits: int | dict[str, int] | None = None, init: str = "linear",
                  iters: int = 50, seed: int = 0) -> list[SharingReport]:
    """Replace each prunable weight by a k-means codebook and indices. Modifies ``model`` in place.

    Args:
        bits: per layer type (``{"conv": 8, "fc": 5}``, the paper's choice and the default), per layer
            name, or one int; 2**bits - 1 shared values per layer (index 0 is zero). A layer with 0 bits
            is left alone.
        init: "linear" (default), "density" or "random".

    Existing masks are multiplied in first: zeros stay zeros. Biases are left in floating point.
    """
    bits = {"conv": 8, "fc": 5} if bits is None else bits
    check_finite_model("share_weights", model)
    out = []
    for name, m in prunable_layers(model, "share_weights").items():
        b = _bits_for(bits, name, m)
        if b <= 0:
            continue
        if not 1 <= b <= 16:
            raise ValueError(f"share_weights: bits for layer {name!r} must be in [1, 16]; got {b}.")
        w = m.weight.detach().clone()
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        alive = w != 0
        c, labels = kmeans_1d(w[alive], (1 << b) - 1, init, iters, seed)
        index = torch.zeros_like(w, dtype=torch.long)
        index[alive] = labels + 1
        parametrize.register_parametrization(m, "weight", SharedWeights(c, index), unsafe=True)
        err = float((m.weight - w).pow(2).mean().sqrt())
        out.append(SharingReport(f"{name}.weight", b, (1 << b) - 1, int(alive.sum()), err))
    return out



@torch.no_grad()
def share_weights_global(model: nn.Module, bits: int, importance: dict[str, Tensor] | None = None,
                         init: str = "linear", iters: int = 50, seed: int = 0) -> SharingReport:
    """One codebook for all prunable weights of the network at once. Modifies ``model`` in place.

    With ``importance`` ({fqn: tensor of the weight's shape}, e.g. the diagonal of the Hessian or of the
    empirical Fisher) this is Hessian-weighted k-means (Choi, El-Khamy, Lee 2017, "Towards the Limit of
    Network Quantization", arXiv:1612.01543, Sec. 3-4): it minimises Σ h_ii (w_i − c_{j(i)})², the
    second-order estimate of the loss increase, over all layers together. Without it, plain k-means over
    all layers. Every layer's parametrization shares the one trainable codebook.
    """
    check_positive("share_weights_global", "bits", bits, integer=True)
    check_finite_model("share_weights_global", model)
    layers = prunable_layers(model, "share_weights_global")
    ws = {}
    for name, m in layers.items():
        ws[name] = m.weight.detach().clone()
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    alive = {n: w != 0 for n, w in ws.items()}
    x = torch.cat([ws[n][alive[n]] for n in ws])
    h = None
    if importance is not None:
        missing = [f"{n}.weight" for n in ws if f"{n}.weight" not in importance]
        if missing:
            raise ValueError(f"share_weights_global: importance lacks {missing}.")
        h = torch.cat([importance[f"{n}.weight"].detach().reshape(ws[n].shape)[alive[n]] for n in ws])
        h = h.clamp_min(0) + 1e-12 * float(h.abs().max())   # keep every weight in its nearest cluster's pull
    c, labels = kmeans_1d(x, (1 << bits) - 1, init, iters, seed, sample_weight=h)
    book = nn.Parameter(c.float().clone())
    off, sq = 0, 0.0
    for name, m in layers.items():
        n = int(alive[name].sum())
        index = torch.zeros_like(ws[name], dtype=torch.long)
        index[alive[name]] = labels[off:off + n] + 1
        off += n
        p = SharedWeights(c, index)
        p.codebook = book                      # the same Parameter object in every layer
        parametrize.register_parametrization(m, "weight", p, unsafe=True)
        sq += float((m.weight - ws[name]).pow(2).sum())
    return SharingReport("all", bits, (1 << bits) - 1, int(x.numel()), (sq / max(x.numel(), 1)) ** 0.5)
