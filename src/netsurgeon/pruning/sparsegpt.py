"""SparseGPT: one-shot pruning by approximate layer-wise OBS reconstruction (Frantar & Alistarh 2023, "SparseGPT:
Massive Language Models Can Be Accurately Pruned in One-Shot", arXiv:2301.00774, ICML 2023).

Each layer solves min ||W X − Ŵ X||² over Ŵ with a sparsity pattern (Sec. 3, the layer-wise problem), whose Hessian
in every output row is the same H = 2XXᵀ. Removing weight i of a row and updating only the weights to its right
(columns j > i) is an exact OBS step on that row restricted to those columns (Sec. 3.1, "optimal partial updates"):
the error err = (w_i − q_i)/U_ii is spread as w_{i:} −= err · U_{i, i:}, with U the upper Cholesky factor of H⁻¹
(UᵀU = H⁻¹), which holds the inverse Hessians of every column suffix at once ("Hessian synchronization"). Columns
are processed in blocks of B: the updates of a block reach the columns after it in one matmul (lazy batch
updates, as GPTQ). The mask is chosen adaptively per block of B columns from w²/U_ii² with one threshold for the
whole block (Sec. 3.2, "adaptive mask selection"), or for N:M per group of M columns of each row, at the group's
first column (Sec. 3.3). Algorithm 1 of the paper is this loop; damping is 1% of mean(diag H).

What equality holds (tested): with a mask fixed in advance, the result for a row equals the exact OBS
reconstruction of that row (the optimum of ||(w − ŵ) X||² + damping over ŵ with the mask's zeros) whenever every
pruned weight of the row lies to the left of every kept one; otherwise kept weights left of a pruned one are not
updated for it and the loss is at least the exact one (``obc`` computes that one). The loss reported per row,
Σ (w_i − q_i)²/U_ii² / 2, equals ½ (w − ŵ)ᵀ (H + λI) (w − ŵ) exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from ..calibration import (
    CalibratedConfig,
    Target,
    attach_target_masks,
    compress_sequentially,
    draw_samples,
    target_keep,
    target_weight,
)
from ..linalg import damp_layer_hessian, inverse_cholesky_upper
from ..masks import nm_mask, parse_nm
from ..plan import pruned_then_finetuned
from ..registry import StageContext, option, register
from ..stats import HessianAccumulator

__all__ = ["ColumnQuantizer", "SweepResult", "obs_sweep", "sparsegpt_prune", "CalibratedConfig", "SparseGPTConfig",
           "prune_calibrated"]

log = logging.getLogger(__name__)


class ColumnQuantizer(Protocol):
    """What :func:`obs_sweep` needs to quantize (GPTQ): the group width (None: one group per row), a hook when a
    group starts (its columns as they are then, pruned entries zeroed), and the rounding of one column."""

    group_size: int | None

    def start_group(self, j: int, cols: Tensor) -> None: ...

    def __call__(self, j: int, w: Tensor) -> Tensor: ...


@dataclass
class SweepResult:
    """weight (rows, d): the new weights; keep (rows, d) bool: the mask; loss (rows,): Σ (w_i − q_i)²/U_ii² / 2."""

    weight: Tensor
    keep: Tensor
    loss: Tensor


def _select_block(W1: Tensor, diag: Tensor, keep1: Tensor, sparsity: float) -> None:
    """SparseGPT's adaptive mask for one block: prune the round(sparsity·numel) lowest w²/U_ii² of the whole block
    (already pruned entries first). W1, keep1: (block columns, rows); modifies ``keep1`` (a view) in place."""
    score = W1.square() / diag.square().unsqueeze(1)
    score[~keep1] = -torch.inf
    k = int(round(sparsity * score.numel()))
    idx = torch.sort(score.flatten(), stable=True).indices[:k]
    keep1[idx // score.shape[1], idx % score.shape[1]] = False


def obs_sweep(W: Tensor, U: Tensor, *, block_size: int = 128, keep: Tensor | None = None, sparsity: float = 0.0,
              nm: tuple[int, int] | None = None, quantizer: ColumnQuantizer | None = None) -> SweepResult:
    """The column-by-column OBS loop of SparseGPT (Algorithm 1) and GPTQ (Algorithm 1), with lazy block updates.

    Args:
        W: (rows, d) weights (not modified); U: (d, d) upper Cholesky factor of the damped H⁻¹.
        block_size: B, columns per lazy update and per unstructured mask selection; a multiple of M (N:M) and of
            the quantizer's group size.
        keep: (rows, d) bool, weights that may stay (a previous mask); pruned ones stay pruned.
        sparsity: unstructured: the fraction of each block pruned (0: prune nothing).
        nm: (N, M): keep N of every M columns of a row, chosen at each group's first column.
        quantizer: round every kept weight (GPTQ; with a mask: SparseGPT's joint sparsify-and-quantize, Sec. 3.5).
    """
    rows, d = W.shape
    g = quantizer.group_size if quantizer is not None else None
    if (nm is not None and block_size % nm[1]) or (g is not None and g < d and block_size % g):
        raise ValueError(f"obs_sweep: block_size {block_size} must be a multiple of M and of the group size.")
    # Work on Wᵀ (d, rows): a column of W is then contiguous, and the rank-1 updates run ~10x faster on CPU.
    Wt = W.t().clone(memory_format=torch.contiguous_format)
    keep_t = (torch.ones(d, rows, dtype=torch.bool, device=W.device) if keep is None
              else keep.t().clone(memory_format=torch.contiguous_format))
    loss = W.new_zeros(rows)
    if quantizer is not None and (g is None or g >= d):
        quantizer.start_group(0, (Wt * keep_t).t())  # one grid per row, from the weights before any update (GPTQ)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        W1, keep1, U1 = Wt[i1:i2], keep_t[i1:i2], U[i1:i2, i1:i2]                # views: (count, rows)
        err1 = torch.empty_like(W1)
        diag = U1.diagonal()
        if sparsity > 0 and nm is None:
            _select_block(W1, diag, keep1, sparsity)
        for i in range(i2 - i1):
            j = i1 + i
            if nm is not None and j % nm[1] == 0:
                n, m = nm
                score = W1[i:i + m].square() / diag[i:i + m].square().unsqueeze(1)
                score[~keep1[i:i + m]] = -torch.inf
                keep1[i:i + m] &= nm_mask(score.t(), n, m).t().bool()
            if g is not None and g < d and j % g == 0:
                quantizer.start_group(j, (W1[i:i + g] * keep1[i:i + g]).t())  # type: ignore[union-attr]
            w = W1[i].clone()
            q = w * keep1[i]
            if quantizer is not None:
                q = quantizer(j, q) * keep1[i]
            err = (w - q) / diag[i]
            loss += err.square() / 2
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)
            W1[i] = q  # exactly q (the update leaves it there up to rounding)
            err1[i] = err
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), err1, alpha=-1.0)
    return SweepResult(Wt.t().contiguous(), keep_t.t().contiguous(), loss)


def sparsegpt_prune(W: Tensor, H: Tensor, *, sparsity: float = 0.5, nm: tuple[int, int] | None = None,
                    block_size: int = 128, damp_ratio: float = 0.01, keep: Tensor | None = None) -> SweepResult:
    """Prune one layer with SparseGPT. W: (rows, d) weights; H: (d, d) Hessian 2XXᵀ (computed in H's dtype).

    Inputs that never fired (H_ii = 0) get their weights zeroed and H_ii = 1; then H += damp_ratio·mean(diag H)·I.
    With ``nm`` the block size is rounded down to a multiple of M (at least M). Returns a :class:`SweepResult`.
    """
    Hd, dead = damp_layer_hessian(H, damp_ratio)
    W = W.to(H.dtype).clone()
    W[:, dead] = 0
    if nm is not None:
        block_size = max(block_size // nm[1], 1) * nm[1]
    return obs_sweep(W, inverse_cholesky_upper(Hd), block_size=block_size, keep=keep, sparsity=sparsity, nm=nm)


# -- calibrated pruning: shared by sparsegpt, obc and wanda (their draw options: calibration.CalibratedConfig) ----
_PATTERN_HELP = "unstructured, or N:M: keep N of every M consecutive inputs of a row (e.g. 2:4; sparsity is 1 - N/M)"


@dataclass(frozen=True)
class SparseGPTConfig(CalibratedConfig):
    owner: ClassVar[str] = "sparsegpt"
    sparsity: float = option(0.5, "fraction of each layer's weights removed (unstructured)", low=0, high=1,
                             high_open=True)
    pattern: str = option("unstructured", _PATTERN_HELP)
    block_size: int = option(128, "columns per lazy update and per mask-selection block (B)", low=1)
    damp: float = option(0.01, "damping: this fraction of mean(diag H) is added to H's diagonal", low=0,
                         low_open=True)

    def validate(self) -> None:
        parse_nm(self.owner, self.pattern)


# prune(target, W, keep, statistics) -> the target's result
Prune = Callable[[Target, Tensor, "Tensor | None", HessianAccumulator], SweepResult]


def prune_calibrated(model: nn.Module, cfg: CalibratedConfig, ctx: StageContext, prune: Prune, *,
                     nm: tuple[int, int] | None, diagonal_only: bool = False,
                     accept: Callable[[Target], str | None] | None = None,
                     workspace: Callable[[Target], int] | None = None) -> dict[str, Any]:
    """Run a calibrated pruning method over ``model`` block by block (see :mod:`netsurgeon.calibration`) and attach
    its masks (pruned weights are exact zeros). In place; returns the method's report."""
    owner = cfg.owner
    samples = draw_samples(ctx.require_data(owner).train, cfg.samples, cfg.seed, owner)
    keeps: dict[Target, Tensor] = {}
    losses: dict[str, float] = {}

    def ok(t: Target) -> str | None:
        if nm is not None and t.columns % nm[1]:
            return f"{t.columns} inputs per row is not a multiple of M={nm[1]}"
        return accept(t) if accept is not None else None

    def compress(layer: str, targets: list[Target], stats: list[HessianAccumulator]) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for t, st in zip(targets, stats, strict=True):
            res = prune(t, target_weight(model, t), target_keep(model, t), st)
            keeps[t] = res.keep
            losses[layer] = losses.get(layer, 0.0) + float(res.loss.sum())
            out.append(res.weight)
        return out

    run = compress_sequentially(model, samples, compress, owner=owner, batch_size=cfg.batch_size, accept=ok,
                                diagonal_only=diagonal_only, workspace=workspace)
    attach_target_masks(model, keeps)
    per: dict[str, list[int]] = {}
    for t, k in keeps.items():
        c = per.setdefault(t.layer, [0, 0])
        c[0] += int(k.sum())
        c[1] += k.numel()
    total = [sum(c[0] for c in per.values()), sum(c[1] for c in per.values())]
    return {"kept": total[0] / total[1] if total[1] else 1.0,
            "kept_per_layer": {n: c[0] / c[1] for n, c in per.items()},
            "loss_per_layer": losses, "skipped": run.skipped, "samples": run.samples, "chained": run.chained,
            "memory_estimate": run.memory}


def _workspace(t: Target) -> int:
    """The solver's memory (float32): the damped H, its Cholesky factor, their inverse and its upper Cholesky
    factor U (d² each, alive together in ``linalg.inverse_cholesky_upper``) and a few copies of W."""
    return 4 * (4 * t.columns**2 + 4 * (t.rows[1] - t.rows[0]) * t.columns)


@register("sparsegpt", family="post-training", compare=pruned_then_finetuned("sparsegpt"),
          quick={"samples": 8, "sparsity": 0.5},
          kind="oneshot", config=SparseGPTConfig, needs_data=True,
          citation="Frantar & Alistarh 2023, SparseGPT, arXiv:2301.00774, Sec. 3 and Algorithm 1",
          summary="one-shot pruning by layer-wise OBS reconstruction on calibration data (unstructured or N:M)")
def _run_sparsegpt(model: nn.Module, cfg: SparseGPTConfig, ctx: StageContext) -> dict[str, Any]:
    nm = parse_nm(cfg.owner, cfg.pattern)

    def prune(t: Target, W: Tensor, keep: Tensor | None, st: HessianAccumulator) -> SweepResult:
        return sparsegpt_prune(W, st.hessian, sparsity=cfg.sparsity, nm=nm, block_size=cfg.block_size,
                               damp_ratio=cfg.damp, keep=keep)

    return prune_calibrated(model, cfg, ctx, prune, nm=nm, workspace=_workspace)
