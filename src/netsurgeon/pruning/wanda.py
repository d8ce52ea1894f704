"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter 2024, "A Simple and Effective Pruning Approach
for Large Language Models", arXiv:2306.11695, ICLR 2024, Sec. 3).

The score of weight W_ij is S_ij = |W_ij| · ||X_j||₂, the norm of input feature j over every calibration token
(Eq. (1) of the paper), compared within each output row ("per output" comparison group): each row loses its
round(sparsity · d) lowest scores, or for N:M the M − N lowest of every M consecutive inputs (``group: layer``:
one ranking over the whole layer, the alternative of the paper's comparison-group ablation, Sec. 5). No weight
update, no Hessian: the only statistic is diag(XXᵀ) (:class:`~netsurgeon.stats.HessianAccumulator` with
``diagonal_only``), and ||X_j||₂ is its square root up to one factor per layer, which no row's ranking sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..calibration import Target
from ..masks import nm_mask, parse_nm
from ..plan import pruned_then_finetuned
from ..registry import StageContext, option, register
from ..stats import HessianAccumulator
from .sparsegpt import CalibratedConfig, SweepResult, prune_calibrated

__all__ = ["wanda_scores", "wanda_mask", "WandaConfig"]


def wanda_scores(W: Tensor, x_norm: Tensor) -> Tensor:
    """S = |W| · ||X_j||₂ (Eq. (1)). Shapes: W (rows, d), x_norm (d,) -> (rows, d)."""
    return W.abs() * x_norm.unsqueeze(0)


def wanda_mask(W: Tensor, x_norm: Tensor, *, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
               keep: Tensor | None = None, group: str = "row") -> Tensor:
    """Wanda's keep mask (bool (rows, d)): per row, drop the round(sparsity·d) lowest scores, or N:M within each
    group of M inputs. Entries an earlier ``keep`` pruned rank lowest and stay pruned. Ties: earlier input first.
    ``group="layer"``: one ranking over the whole layer (the per-layer group of the paper's ablation, Sec. 5)."""
    S = wanda_scores(W, x_norm)
    if keep is not None:
        S[~keep] = -torch.inf
    if nm is not None:
        new = nm_mask(S, *nm).bool()
    elif group == "layer":
        k = int(round(sparsity * S.numel()))
        new = torch.ones(S.numel(), dtype=torch.bool, device=W.device)
        new[torch.sort(S.flatten(), stable=True).indices[:k]] = False
        new = new.view_as(S)
    else:
        k = int(round(sparsity * W.shape[1]))
        new = torch.ones_like(W, dtype=torch.bool)
        new.scatter_(1, torch.sort(S, dim=1, stable=True).indices[:, :k], False)
    return new if keep is None else new & keep


@dataclass(frozen=True)
class WandaConfig(CalibratedConfig):
    owner: ClassVar[str] = "wanda"
    sparsity: float = option(0.5, "fraction of each output row's weights removed (unstructured)", low=0, high=1,
                             high_open=True)
    pattern: str = option("unstructured", "unstructured, or N:M: keep N of every M consecutive inputs of a row "
                                          "(e.g. 2:4; sparsity is 1 - N/M)")
    group: str = option("row", "comparison group of the unstructured scores: row (each output row loses the same "
                               "fraction, the paper's choice for LLMs) or layer (one ranking per layer, its "
                               "ablation)", choices=("row", "layer"))

    def validate(self) -> None:
        parse_nm(self.owner, self.pattern)


@register("wanda", family="post-training", compare=pruned_then_finetuned("wanda"),
          quick={"samples": 8, "sparsity": 0.5},
          kind="oneshot", config=WandaConfig, needs_data=True,
          citation="Sun, Liu, Bair, Kolter 2024, Wanda, arXiv:2306.11695, Sec. 3, Eq. (1)",
          summary="prune the lowest |W| x ||X||2 of each output row, from one forward pass (unstructured or N:M)")
def _run_wanda(model: nn.Module, cfg: WandaConfig, ctx: StageContext) -> dict[str, Any]:
    nm = parse_nm(cfg.owner, cfg.pattern)

    def prune(t: Target, W: Tensor, keep: Tensor | None, st: HessianAccumulator) -> SweepResult:
        mask = wanda_mask(W, st.hessian.sqrt().to(W.dtype), sparsity=cfg.sparsity, nm=nm, keep=keep, group=cfg.group)
        return SweepResult(W * mask, mask, W.new_zeros(W.shape[0]))

    report = prune_calibrated(model, cfg, ctx, prune, nm=nm, diagonal_only=True)
    report.pop("loss_per_layer")  # no reconstruction, no loss
    return report
