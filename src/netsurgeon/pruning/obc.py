"""OBC: exact greedy Optimal Brain Surgeon per output row (Frantar & Alistarh 2022, "Optimal Brain Compression: A
Framework for Accurate Post-Training Quantization and Pruning", arXiv:2208.11580, NeurIPS 2022, Sec. 3 ExactOBS).

Every row w of a layer shares the Hessian H = 2XXᵀ (+ damping). OBC removes one weight at a time per row, the one
with the least loss w_p² / (2 [H⁻¹]_pp), updates the row's remaining weights exactly, w −= (w_p / [H⁻¹]_pp) H⁻¹_{:,p},
and removes p from the row's inverse, H⁻¹ −= H⁻¹_{:,p} H⁻¹_{p,:} / [H⁻¹]_pp (Hassibi & Stork 1993's OBS with
Gauss-Jordan elimination of one row and column). Unstructured: the greedy path of each row is computed to the
end, and the layer's k = round(sparsity · rows · d) smallest step losses decide how many weights each row loses
(OBC's per-layer selection, as its ``prepare_unstr``/``prune_unstr``). N:M: a row stops taking weights from a
group of M once M − N are gone (``nmprune``). Since a sequence of exact OBS removals reaches the optimum for the
removed set, the final row is computed once as the joint OBS update for its set
(:func:`netsurgeon.linalg.obs_update_joint`).

Cost O(rows · d³) time and chunk · d² memory (float64): this exact method is for small layers, and a layer with
more than ``max_columns`` inputs per row (default 256) is skipped and listed. SparseGPT is its fast approximation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..calibration import Target
from ..linalg import damp_layer_hessian, obs_update_joint
from ..masks import parse_nm
from ..plan import pruned_then_finetuned
from ..registry import StageContext, option, register
from ..stats import HessianAccumulator
from .sparsegpt import CalibratedConfig, SweepResult, prune_calibrated

__all__ = ["obc_prune", "OBCConfig"]


def _greedy_paths(w: Tensor, hinv: Tensor, forced: Tensor, nm: tuple[int, int] | None,
                  steps: int) -> tuple[Tensor, Tensor]:
    """Greedy OBS removal order and step losses of a chunk of rows. w (c, d), hinv (d, d), forced (c, d) bool
    (removed first: earlier masks). Returns order (c, steps) long (-1: nothing removed) and loss (c, steps)."""
    c, d = w.shape
    w, Hi = w.clone(), hinv.expand(c, d, d).clone()
    dev = w.device
    removed = torch.zeros(c, d, dtype=torch.bool, device=dev)
    order = torch.full((c, steps), -1, dtype=torch.long, device=dev)
    loss = torch.full((c, steps), torch.inf, dtype=w.dtype, device=dev)
    rows = torch.arange(c, device=dev)
    for s in range(steps):
        diag = Hi.diagonal(dim1=1, dim2=2)
        score = w.square() / diag
        if nm is not None:  # groups that lost M - N weights take no more
            full = removed.view(c, -1, nm[1]).sum(-1, keepdim=True) >= nm[1] - nm[0]
            score[full.expand(-1, -1, nm[1]).reshape(c, d)] = torch.inf
        score[forced & ~removed] = -torch.inf
        score[removed] = torch.inf
        p = score.argmin(1)
        live = score[rows, p] < torch.inf
        if not live.any():
            break
        d_p = torch.where(live, diag[rows, p], 1.0)
        order[live, s] = p[live]
        loss[live, s] = (w[rows, p].square() / d_p / 2)[live]
        col = Hi[rows, :, p] * live.unsqueeze(1)                              # (c, d) = H⁻¹_{:,p}; 0: row done
        w -= col * (w[rows, p] / d_p).unsqueeze(1)
        Hi.baddbmm_(col.unsqueeze(2), (col / d_p.unsqueeze(1)).unsqueeze(1), alpha=-1.0)  # in place: no copies
        removed[rows[live], p[live]] = True
    return order, loss


def obc_prune(W: Tensor, H: Tensor, *, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
              damp_ratio: float = 0.01, keep: Tensor | None = None, chunk: int = 32) -> SweepResult:
    """Prune one layer with exact greedy OBS (OBC), in float64. W (rows, d), H (d, d); ``keep`` (rows, d) bool: an
    earlier mask, whose pruned weights are removed first and stay removed. Returns weight, keep, and the loss per
    row (the summed step losses w_p²/(2[H⁻¹]_pp), equal to ½ δwᵀ(H + λI)δw of the final update)."""
    Hd, dead = damp_layer_hessian(H.double(), damp_ratio)
    W = W.double().clone()
    W[:, dead] = 0
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(Hd))
    rows, d = W.shape
    dev = W.device  # every buffer beside the weights (issue 36 item 5)
    forced = torch.zeros(rows, d, dtype=torch.bool, device=dev) if keep is None else ~keep.to(dev)
    # unstructured: each row's whole greedy path; N:M: M - N per group, plus what earlier masks removed beyond that
    steps = d if nm is None else min(d, d // nm[1] * (nm[1] - nm[0]) + int(forced.sum(1).max()))
    parts = [_greedy_paths(W[i:i + chunk], hinv, forced[i:i + chunk], nm, steps) for i in range(0, rows, chunk)]
    order, loss = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if nm is None:  # the layer's k smallest step losses (earlier masks first) set each row's count
        k = max(int(round(sparsity * rows * d)), int(forced.sum()))
        flat = torch.where(order >= 0, loss, torch.inf)
        flat = torch.where(torch.arange(steps, device=dev) < forced.sum(1, keepdim=True), -torch.inf, flat)
        chosen = torch.zeros(rows * steps, dtype=torch.bool, device=dev)
        chosen[torch.sort(flat.flatten(), stable=True).indices[:k]] = True
        counts = chosen.view(rows, steps).sum(1)
    else:
        counts = (order >= 0).sum(1)
    out, kept = W.clone(), torch.ones(rows, d, dtype=torch.bool, device=dev)
    total = torch.zeros(rows, dtype=torch.float64, device=dev)
    for r in range(rows):
        q = order[r, : int(counts[r])]
        if q.numel():
            prune = torch.zeros(d, dtype=torch.bool, device=dev)
            prune[q] = True
            out[r] += obs_update_joint(W[r], hinv, prune)
            out[r, q] = 0.0
            kept[r, q] = False
            total[r] = loss[r, : q.numel()].sum()
    return SweepResult(out, kept.to(W.device), total)


@dataclass(frozen=True)
class OBCConfig(CalibratedConfig):
    owner: ClassVar[str] = "obc"
    sparsity: float = option(0.5, "fraction of each layer's weights removed (unstructured)", low=0, high=1,
                             high_open=True)
    pattern: str = option("unstructured", "unstructured, or N:M: keep N of every M consecutive inputs of a row "
                                          "(e.g. 2:4; sparsity is 1 - N/M)")
    damp: float = option(0.01, "damping: this fraction of mean(diag H) is added to H's diagonal", low=0,
                         low_open=True)
    max_columns: int = option(256, "skip layers with more inputs per row (exact OBS costs rows x d^3)", low=1,
                              high=4096)

    def validate(self) -> None:
        parse_nm(self.owner, self.pattern)


@register("obc", family="post-training", compare=pruned_then_finetuned("obc"),
          quick={"samples": 8, "sparsity": 0.5},
          kind="oneshot", config=OBCConfig, needs_data=True,
          citation="Frantar & Alistarh 2022, Optimal Brain Compression, arXiv:2208.11580, Sec. 3 (ExactOBS)",
          summary="exact greedy OBS per row on calibration data, for small layers (unstructured or N:M)")
def _run_obc(model: nn.Module, cfg: OBCConfig, ctx: StageContext) -> dict[str, Any]:
    nm = parse_nm(cfg.owner, cfg.pattern)

    def prune(t: Target, W: Tensor, keep: Tensor | None, st: HessianAccumulator) -> SweepResult:
        res = obc_prune(W.cpu(), st.hessian.cpu(), sparsity=cfg.sparsity, nm=nm, damp_ratio=cfg.damp,
                        keep=None if keep is None else keep.cpu())
        return SweepResult(res.weight.to(W.device), res.keep.to(W.device), res.loss)

    def accept(t: Target) -> str | None:
        return (f"{t.columns} inputs per row is above max_columns={cfg.max_columns} (exact OBS)"
                if t.columns > cfg.max_columns else None)

    return prune_calibrated(model, cfg, ctx, prune, nm=nm, accept=accept,
                            workspace=lambda t: 8 * (32 + 2) * t.columns**2)
