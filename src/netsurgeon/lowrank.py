"""Low-rank factorization of fully connected layers by truncated SVD (Denton, Zaremba, Bruna, LeCun, Fergus 2014,
"Exploiting Linear Structure Within Convolutional Networks for Efficient Evaluation", arXiv:1404.0736, Sec. 3.2
and Sec. 5: the fully connected layers; also the survey's "low-rank factorization" family, Cheng et al. Sec. 3).

W (out x in) ≈ U_r S_r V_rᵀ, the best rank-r approximation in Frobenius norm (Eckart-Young); the layer becomes
two smaller Linear layers, x → (S_r^½ V_rᵀ) x → (U_r S_r^½)(·) + b, with r·(in + out) instead of in·out weights.
The rank of each layer is chosen by

* ``energy``: the smallest r keeping that fraction of Σσ² (per layer), or
* ``params``: one energy threshold for all layers, found by bisection, such that the factorized layers keep at
  most that fraction of the Linear layers' weights (a global parameter budget).

A layer is factorized only where that saves weights (r·(in + out) < in·out). The result is a plain smaller
``nn.Module`` (each factorized layer an ``nn.Sequential`` of two ``nn.Linear``); the ``.nsz`` architecture record
lists ``factorized: {layer: rank}`` so a file rebuilds it, on netsurgeon's models and the user's alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._validation import check_finite_model
from .masks import prunable_layers
from .registry import StageContext, option, register
from .train import TrainConfig, train

__all__ = ["svd_ranks", "factorize_linear", "lowrank_factorize", "LowRankConfig"]


def _energy_rank(s: Tensor, energy: float) -> int:
    """Smallest r with Σ_{i<r} σ_i² >= energy · Σσ²."""
    e = (s.double() ** 2).cumsum(0)
    return int(torch.searchsorted(e, energy * e[-1] * (1 - 1e-12)).item()) + 1


def svd_ranks(spectra: dict[str, tuple[Tensor, int, int]], *, energy: float | None = None,
              params: float | None = None) -> dict[str, int]:
    """Ranks per layer from ``spectra`` ({layer: (singular values, in, out)}) by ``energy`` or a ``params``
    budget (see module doc). A layer whose rank would not save weights keeps its full rank (not factorized)."""
    if (energy is None) == (params is None):
        raise ValueError("svd_ranks: give exactly one of energy or params.")

    def ranks_at(e: float) -> dict[str, int]:
        return {n: _energy_rank(s, e) for n, (s, _, _) in spectra.items()}

    def cost(ranks: dict[str, int]) -> int:
        return sum(min(ranks[n] * (i + o), i * o) for n, (_, i, o) in spectra.items())

    if energy is not None:
        return ranks_at(energy)
    budget = params * sum(i * o for _, i, o in spectra.values())
    lo, hi = 0.0, 1.0
    for _ in range(50):  # bisection on the shared energy threshold
        mid = (lo + hi) / 2
        if cost(ranks_at(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return ranks_at(lo)


def factorize_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """Two Linear layers computing the rank-``rank`` truncated SVD of ``layer`` (bias on the second)."""
    w = layer.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vh[:rank]).float())
        second.weight.copy_((u[:, :rank] * root).float())
        if layer.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second)


@torch.no_grad()
def lowrank_factorize(model: nn.Module, *, energy: float | None = None, params: float | None = None,
                      layers: list[str] | None = None) -> dict[str, Any]:
    """Factorize the Linear layers of ``model`` (or those named in ``layers``) in place; returns a report
    ({layer: {rank, full_rank, energy_kept, weights_before, weights_after}}). Records the ranks on the model."""
    from .models import record_factorized

    check_finite_model("lowrank", model)
    chosen = {n: m for n, m in prunable_layers(model, "lowrank").items()
              if isinstance(m, nn.Linear) and (layers is None or n in layers)}
    if layers is not None and set(layers) - set(chosen):
        raise ValueError(f"lowrank: no Linear layer named {sorted(set(layers) - set(chosen))[:5]}.")
    for name, m in chosen.items():
        if parametrize.is_parametrized(m):
            raise ValueError(f"lowrank: layer {name!r} holds a parametrization (masks or codes); factorize a float "
                             "model.")
    if not chosen:
        raise ValueError("lowrank: the model has no Linear layer to factorize.")
    spectra = {n: (torch.linalg.svdvals(m.weight.double()), m.in_features, m.out_features) for n, m in chosen.items()}
    ranks = svd_ranks(spectra, energy=energy, params=params)
    report, done = {}, {}
    for name, m in chosen.items():
        s, i, o = spectra[name]
        r = ranks[name]
        kept = float((s[:r] ** 2).sum() / (s ** 2).sum()) if float((s ** 2).sum()) > 0 else 1.0
        factor = r * (i + o) < i * o
        report[name] = {"rank": r if factor else min(i, o), "full_rank": min(i, o), "energy_kept": kept if factor
                        else 1.0, "weights_before": i * o, "weights_after": r * (i + o) if factor else i * o}
        if factor:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, factorize_linear(m, r))
            done[name] = r
    if done:
        record_factorized(model, done)
    return report


@dataclass(frozen=True)
class LowRankConfig(TrainConfig):
    owner: ClassVar[str] = "lowrank"
    epochs: int = option(0, "fine-tuning epochs after factorizing (0: none, no data needed)", low=0)
    energy: float | None = option(None, "keep this fraction of each layer's Σσ² (give energy or params)", low=0,
                                  high=1, low_open=True)
    params: float | None = option(0.25, "keep at most this fraction of the Linear layers' weights (one energy "
                                        "threshold for all layers)", low=0, high=1, low_open=True)

    def validate(self) -> None:
        if (self.energy is None) == (self.params is None):
            raise ValueError(f"{self.owner}: give exactly one of energy or params (set the other to null); got "
                             f"energy={self.energy!r}, params={self.params!r}.")


@register("lowrank", kind="oneshot", config=LowRankConfig, needs_data=lambda c: c.epochs > 0,
          citation="Denton et al. 2014, arXiv:1404.0736, Sec. 3.2 and 5 (truncated SVD of fully connected layers)",
          summary="replace Linear layers by rank-r SVD factor pairs (rank by energy or a global weight budget)")
def _run(model: nn.Module, cfg: LowRankConfig, ctx: StageContext) -> dict[str, Any]:
    report = lowrank_factorize(model, energy=cfg.energy, params=cfg.params)
    if cfg.epochs > 0:
        train(model, ctx.require_data("lowrank"), cfg.train_config(), progress=ctx.progress)
    return {"layers": report}
