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
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._validation import check_finite_model, check_positive
from ..forms.shared import SharedWeights
from ..masks import prunable_tensors, sites_of
from ..plan import CODEBOOK, Plan, finetune_stage, oneshot_then_finetuned
from ..registry import MethodConfig, StageContext, option, register
from ..stats import collect_gradients

__all__ = ["kmeans_1d", "SharedWeights", "share_weights", "share_weights_global", "SharingReport", "KMeansConfig",
           "HessianKMeansConfig", "fisher_diagonal"]

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
        return torch.zeros(k, dtype=torch.float64, device=x.device), torch.zeros(0, dtype=torch.long, device=x.device)
    sw = torch.ones_like(x) if sample_weight is None else sample_weight.detach().double().flatten()
    if init == "linear":
        c = torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64, device=x.device)
    elif init == "density":
        c = torch.quantile(x, (torch.arange(k, dtype=torch.float64, device=x.device) + 0.5) / k)
    else:
        g = torch.Generator().manual_seed(seed)
        c = x[torch.randint(x.numel(), (k,), generator=g, device="cpu").to(x.device)].sort().values
    for _ in range(iters):
        labels = torch.bucketize(x, (c[1:] + c[:-1]) / 2)
        total = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, labels, x * sw)
        weight = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, labels, sw)
        new = torch.where(weight > 0, total / weight.clamp_min(1e-300), c).sort().values
        if torch.equal(new, c):
            break
        c = new
    return c, torch.bucketize(x, (c[1:] + c[:-1]) / 2)


@dataclass(frozen=True)
class SharingReport:
    """Per tensor: bits, number of shared values, surviving weights, and the RMS error it introduced."""

    name: str
    bits: int
    clusters: int
    nonzero: int
    rms_error: float


def _bits_for(bits: int | dict[str, int], name: str, kind: str) -> int:
    if isinstance(bits, int):
        return bits
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
    for site, m in sites_of(model, "share_weights"):
        b = _bits_for(bits, site.module, site.layer_kind)
        if b <= 0:
            continue
        if not 1 <= b <= 16:
            raise ValueError(f"share_weights: bits for layer {site.module!r} must be in [1, 16]; got {b}.")
        w = getattr(m, site.attr).detach().clone()
        if parametrize.is_parametrized(m, site.attr):
            parametrize.remove_parametrizations(m, site.attr, leave_parametrized=True)
        alive = w != 0
        c, labels = kmeans_1d(w[alive], (1 << b) - 1, init, iters, seed)
        index = torch.zeros_like(w, dtype=torch.long)
        index[alive] = labels + 1
        parametrize.register_parametrization(m, site.attr, SharedWeights(c, index), unsafe=True)
        err = float((getattr(m, site.attr) - w).pow(2).mean().sqrt())
        out.append(SharingReport(site.fqn, b, (1 << b) - 1, int(alive.sum()), err))
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
    sites = sites_of(model, "share_weights_global")
    ws = {}
    for site, m in sites:
        ws[site.fqn] = getattr(m, site.attr).detach().clone()
        if parametrize.is_parametrized(m, site.attr):
            parametrize.remove_parametrizations(m, site.attr, leave_parametrized=True)
    alive = {n: w != 0 for n, w in ws.items()}
    x = torch.cat([ws[n][alive[n]] for n in ws])
    if x.numel() == 0:
        raise ValueError("share_weights_global: every weight of the model is zero; there is nothing to share.")
    h = None
    if importance is not None:
        missing = [n for n in ws if n not in importance]
        if missing:
            raise ValueError(f"share_weights_global: importance lacks {missing}.")
        h = torch.cat([importance[n].detach().reshape(ws[n].shape)[alive[n]] for n in ws])
        h = h.clamp_min(0) + 1e-12 * float(h.abs().max())   # keep every weight in its nearest cluster's pull
    c, labels = kmeans_1d(x, (1 << bits) - 1, init, iters, seed, sample_weight=h)
    book = nn.Parameter(c.float().clone())
    off, sq = 0, 0.0
    for site, m in sites:
        n = int(alive[site.fqn].sum())
        index = torch.zeros_like(ws[site.fqn], dtype=torch.long)
        index[alive[site.fqn]] = labels[off:off + n] + 1
        off += n
        p = SharedWeights(c, index)
        p.codebook = book                      # the same Parameter object in every layer
        parametrize.register_parametrization(m, site.attr, p, unsafe=True)
        sq += float((getattr(m, site.attr) - ws[site.fqn]).pow(2).sum())
    return SharingReport("all", bits, (1 << bits) - 1, int(x.numel()), (sq / max(x.numel(), 1)) ** 0.5)


def fisher_diagonal(model: nn.Module, data: Any, num_grads: int = 1000, grad_batch: int = 16,
                    seed: int = 0, progress: bool = False) -> dict[str, Tensor]:
    """``{fqn: diag of the empirical Fisher}`` of every prunable weight, the importance of Hessian-weighted
    k-means (Choi et al. 2017, Sec. 4.2 use the Hessian diagonal; its Fisher estimate is the cheap stand-in).
    ``data``: a Split or any iterable of ``(x, y)`` batches."""
    names = prunable_tensors(model, owner="fisher_diagonal")
    g = collect_gradients(model, data, names, num_grads, grad_batch, seed, progress=progress)
    diag = g.pow(2).mean(0)
    out, off = {}, 0
    for n in names:
        mod, _, attr = n.rpartition(".")
        t = getattr(model.get_submodule(mod), attr)
        out[n] = diag[off:off + t.numel()].view_as(t)
        off += t.numel()
    return out


# -- registered methods ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class KMeansConfig(MethodConfig):
    owner: ClassVar[str] = "kmeans"
    bits: int | dict[str, int] = option({"conv": 8, "fc": 5}, "bits per layer: one int, or {conv|fc|layer: bits}; "
                                        "0 leaves a layer alone", low=0, high=16)
    init: str = option("linear", "centroid initialization (Sec. 3.2)", choices=_INITS)
    iters: int = option(50, "Lloyd iterations at most", low=1)
    seed: int = option(0, "seed of the random init", low=0)


def _deep_compression(p: Plan) -> list[dict[str, Any]]:
    """Deep Compression in a comparison: prune (half the budget), share by k-means, fine-tune centroids."""
    return [{"magnitude": {"sparsity": p.sparsity, "rounds": 1, **p.train(0.5)}}, {"kmeans": {}},
            finetune_stage(p, 0.5, **CODEBOOK)]


@register("kmeans", family="quantization", quick={"bits": 3},
          compare={"kmeans": oneshot_then_finetuned("kmeans", CODEBOOK),
                   "deep_compression": ("pipeline", _deep_compression)},
          kind="quantizer", config=KMeansConfig, gives="shared",
          citation="Han, Mao, Dally 2016, Deep Compression, arXiv:1510.00149, Sec. 3, Eq. (1)-(3)",
          summary="k-means weight sharing per layer (zeros stay zero); fine-tune centroids with a finetune stage")
def _run_kmeans(model: nn.Module, cfg: KMeansConfig, ctx: StageContext) -> dict[str, Any]:
    rows = share_weights(model, cfg.bits, cfg.init, cfg.iters, cfg.seed)
    if not rows:
        layers = {site.module: site.layer_kind for site, _ in sites_of(model, "kmeans")}
        raise ValueError(f"kmeans: nothing was shared: bits {cfg.bits!r} selects no layer of this model "
                         f"(layers and types: {layers}).")
    return {"layers": {r.name: {"bits": r.bits, "nonzero": r.nonzero, "rms_error": r.rms_error} for r in rows}}


@dataclass(frozen=True)
class HessianKMeansConfig(MethodConfig):
    owner: ClassVar[str] = "hessian_kmeans"
    bits: int = option(5, "bits of the one network-wide codebook", low=1, high=16)
    init: str = option("linear", "centroid initialization", choices=_INITS)
    iters: int = option(50, "Lloyd iterations at most", low=1)
    num_grads: int = option(1000, "gradients for the Fisher-diagonal importance", low=1)
    grad_batch: int = option(16, "samples per gradient", low=1)
    weighted: bool = option(True, "weight by the Fisher diagonal (false: plain k-means over all layers)")
    seed: int = option(0, "seed of init and of the gradient mini-batches", low=0)


@register("hessian_kmeans", family="quantization",
          compare=oneshot_then_finetuned("hessian_kmeans", CODEBOOK, num_grads=500),
          quick={"bits": 3, "num_grads": 4, "grad_batch": 4},
          kind="quantizer", config=HessianKMeansConfig, gives="shared",
          needs_data=lambda c: c.weighted,
          citation="Choi, El-Khamy, Lee 2017, Towards the Limit of Network Quantization, arXiv:1612.01543, "
                   "Sec. 3-4",
          summary="one codebook for all layers, k-means weighted by the Hessian (Fisher) diagonal")
def _run_hessian_kmeans(model: nn.Module, cfg: HessianKMeansConfig, ctx: StageContext) -> dict[str, Any]:
    imp = None
    if cfg.weighted:
        imp = fisher_diagonal(model, ctx.require_data("hessian_kmeans").train, cfg.num_grads, cfg.grad_batch, cfg.seed,
                              progress=ctx.progress)
    r = share_weights_global(model, cfg.bits, imp, cfg.init, cfg.iters, cfg.seed)
    return {"bits": r.bits, "nonzero": r.nonzero, "rms_error": r.rms_error}
