"""Low-rank factorization of fully connected layers by truncated SVD (Denton, Zaremba, Bruna, LeCun, Fergus 2014,
"Exploiting Linear Structure Within Convolutional Networks for Efficient Evaluation", arXiv:1404.0736, Sec. 3.2
and Sec. 5: the fully connected layers; also the survey's "low-rank factorization" family, Cheng et al. Sec. 3).

W (out x in) ≈ U_r S_r V_rᵀ, the best rank-r approximation in Frobenius norm (Eckart-Young); the layer becomes
two smaller Linear layers, x → (S_r^½ V_rᵀ) x → (U_r S_r^½)(·) + b, with r·(in + out) instead of in·out weights.
The rank of each layer is chosen by

* ``energy``: the smallest r keeping that fraction of Σσ² (per layer), or
* ``params``: one energy threshold for all layers, found by bisection, such that the factorized layers keep at
  most that fraction of the Linear layers' weights (a global parameter budget).

A layer is factorized only where that saves weights (r·(in + out) < in·out). The model-level entry point, with
convolutions too, is :func:`netsurgeon.lowrank.lowrank_factorize`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["energy_rank", "choose_ranks", "svd_ranks", "factorize_linear"]


def energy_rank(s: Tensor, energy: float) -> int:
    """Smallest r with Σ_{i<r} σ_i² >= energy · Σσ²."""
    e = (s.double() ** 2).cumsum(0)
    return int(torch.searchsorted(e, energy * e[-1] * (1 - 1e-12)).item()) + 1


def choose_ranks(rank_at: dict[str, Callable[[float], Any]], cost: dict[str, Callable[[Any], int]],
                 full: dict[str, int], *, energy: float | None = None, params: float | None = None) -> dict[str, Any]:
    """Ranks per layer at one energy threshold: ``energy`` itself, or for a ``params`` budget the largest threshold
    (bisection) at which the layers' weights, each ``min(cost(rank), full)``, stay within ``params · Σ full``.
    ``rank_at[name](e)`` gives a layer's rank at threshold e; ``cost[name](rank)`` its factorized weights."""
    if (energy is None) == (params is None):
        raise ValueError("svd_ranks: give exactly one of energy or params.")

    def ranks(e: float) -> dict[str, Any]:
        return {n: f(e) for n, f in rank_at.items()}

    if energy is not None:
        return ranks(energy)
    budget = params * sum(full.values())
    lo, hi = 0.0, 1.0
    for _ in range(50):  # bisection on the shared energy threshold
        mid = (lo + hi) / 2
        if sum(min(cost[n](r), full[n]) for n, r in ranks(mid).items()) <= budget:
            lo = mid
        else:
            hi = mid
    return ranks(lo)


def svd_ranks(spectra: dict[str, tuple[Tensor, int, int]], *, energy: float | None = None,
              params: float | None = None) -> dict[str, int]:
    """Ranks per layer from ``spectra`` ({layer: (singular values, in, out)}) by ``energy`` or a ``params``
    budget (see module doc). A layer whose rank would not save weights keeps its full rank (not factorized)."""
    return choose_ranks({n: (lambda e, s=s: energy_rank(s, e)) for n, (s, _, _) in spectra.items()},
                        {n: (lambda r, i=i, o=o: r * (i + o)) for n, (_, i, o) in spectra.items()},
                        {n: i * o for n, (_, i, o) in spectra.items()}, energy=energy, params=params)


def factorize_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Two Linear layers computing the rank-``rank`` truncated SVD of ``layer`` (bias on the second)."""
    w = layer.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    dev = layer.weight.device
    first = nn.Linear(layer.in_features, rank, bias=False, device=dev)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None, device=dev)
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vh[:rank]).float())
        second.weight.copy_((u[:, :rank] * root).float())
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second)
