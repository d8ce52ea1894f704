"""GPTQ: one-shot weight quantization by approximate second-order error compensation (Frantar, Ashkboos, Hoefler,
Alistarh 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
arXiv:2210.17323, ICLR 2023, Sec. 4 and Algorithm 1).

GPTQ quantizes a layer's columns one at a time in a fixed order for all rows ("arbitrary order insight", Sec. 4
step 1): column i is rounded to the grid, q = quant(w_i), and the rounding error is spread over the columns not yet
quantized with the OBS update w_{i:} −= ((w_i − q)/U_ii) · U_{i, i:}, U the upper Cholesky factor of the damped
H⁻¹ (step 3, "Cholesky reformulation"); updates reach later blocks of B columns lazily (step 2). The loop is
:func:`netsurgeon.pruning.sparsegpt.obs_sweep`, shared with SparseGPT. Grids: per row, computed from the weights
before any update, or per group of ``group_size`` columns, computed when the loop reaches the group's first
column from the weights as updated by then (the official code reads a group that starts inside a block from the
block's start; here the block size is a multiple of the group size, so the group's columns are up to date).
``act_order`` processes columns by decreasing diag(H) (the official ``--act-order``): the stored codes stay in that
order with the permutation beside them, and groups are consecutive in it. A parameter that several Hessians
share (cross-attention's packed in_proj, a grouped convolution) gets one order, from their diagonals each divided
by its mean and summed.

After ``sparsegpt`` (or any pruning) the mask is kept exactly: a pruned weight's quantized value is forced to 0,
its whole value counts as error to compensate (SparseGPT's joint mode, Sec. 3.5 of arXiv:2301.00774), and 0 is
always on the grid (:mod:`netsurgeon.quantization.groupwise`), so it is stored as the zero point's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..calibration import Target, compress_sequentially, draw_samples, target_keep, target_weight
from ..forms.grouped import groups_of
from ..linalg import damp_layer_hessian, inverse_cholesky_upper
from ..pruning.sparsegpt import CalibratedConfig, obs_sweep
from ..registry import StageContext, option, register
from ..stats import HessianAccumulator
from .groupwise import (
    GroupQuantConfig,
    GroupQuantWeights,
    dequantize,
    grid_params,
    install_group_quant,
    quantize,
)

__all__ = ["GPTQResult", "gptq_quantize", "act_order_permutation", "GPTQConfig"]


class _GroupGrid:
    """The quantizer :func:`obs_sweep` calls: one grid per group, codes recorded as columns are rounded."""

    def __init__(self, rows: int, d: int, bits: int, group_size: int | None, symmetric: bool, like: Tensor) -> None:
        self.group_size = None if group_size is None or group_size >= d else group_size
        self.bits, self.symmetric, self.maxq = bits, symmetric, 2**bits - 1
        self.codes_t = torch.zeros(d, rows, dtype=torch.uint8, device=like.device)  # column j is row j: contiguous
        self.scales = like.new_zeros(rows, groups_of(d, group_size))
        self.zeros = like.new_zeros(rows, groups_of(d, group_size))

    def start_group(self, j: int, cols: Tensor) -> None:
        gi = 0 if self.group_size is None else j // self.group_size
        self.scales[:, gi], self.zeros[:, gi] = grid_params(cols, self.bits, self.symmetric)
        self._grid = self.scales[:, gi], self.zeros[:, gi]

    def __call__(self, j: int, w: Tensor) -> Tensor:
        q = quantize(w, *self._grid, self.maxq)
        self.codes_t[j] = q.to(torch.uint8)
        return dequantize(q, *self._grid)


@dataclass
class GPTQResult:
    """weight: dequantized (rows, d) in input order; codes (rows, d) uint8 in processing order; scales and zeros
    (rows, groups); perm (d,) or None; keep (rows, d) bool; loss (rows,): Σ (w_i − q_i)²/U_ii² / 2."""

    weight: Tensor
    codes: Tensor
    scales: Tensor
    zeros: Tensor
    perm: Tensor | None
    keep: Tensor
    loss: Tensor


def act_order_permutation(hessians: list[Tensor]) -> Tensor:
    """Columns by decreasing Hessian diagonal (one Hessian), or by the sum of the diagonals each divided by its mean
    (several Hessians over the same columns). Stable on ties."""
    score = sum(h.diagonal() / h.diagonal().mean().clamp_min(1e-30) for h in hessians) if len(hessians) > 1 \
        else hessians[0].diagonal()
    return torch.sort(score, descending=True, stable=True).indices  # type: ignore[union-attr]


def gptq_quantize(W: Tensor, H: Tensor, *, bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
                  act_order: bool = False, perm: Tensor | None = None, block_size: int = 128,
                  damp_ratio: float = 0.01, keep: Tensor | None = None) -> GPTQResult:
    """Quantize one layer with GPTQ. W (rows, d), H (d, d) = 2XXᵀ (computed in H's dtype); ``keep`` (rows, d) bool:
    a mask whose pruned weights become exact zeros; ``perm``: a column order to use (else act-order's own, if
    asked). The block size is rounded to a multiple of the group size."""
    Hd, dead = damp_layer_hessian(H, damp_ratio)
    W = W.to(H.dtype).clone()
    W[:, dead] = 0
    rows, d = W.shape
    if perm is None and act_order:
        perm = act_order_permutation([H])
    if perm is not None:
        W, Hd = W[:, perm], Hd[perm][:, perm]
        keep = None if keep is None else keep[:, perm]
    grid = _GroupGrid(rows, d, bits, group_size, symmetric, W)
    if grid.group_size is not None:
        block_size = max(block_size // grid.group_size, 1) * grid.group_size
    res = obs_sweep(W, inverse_cholesky_upper(Hd), block_size=block_size, keep=keep, quantizer=grid)
    weight, kept = res.weight, res.keep
    if perm is not None:
        inv = torch.argsort(perm)
        weight, kept = weight[:, inv], kept[:, inv]
    return GPTQResult(weight, grid.codes_t.t().contiguous(), grid.scales, grid.zeros, perm, kept, res.loss)


@dataclass(frozen=True)
class GPTQConfig(GroupQuantConfig, CalibratedConfig):
    owner: ClassVar[str] = "gptq"
    act_order: bool = option(False, "quantize columns by decreasing diag(H) (GPTQ's --act-order)")
    block_size: int = option(128, "columns per lazy update (B)", low=1)
    damp: float = option(0.01, "damping: this fraction of mean(diag H) is added to H's diagonal", low=0,
                         low_open=True)


def _install(model: nn.Module, results: dict[Target, GPTQResult], cfg: GPTQConfig) -> None:
    by_tensor: dict[str, list[Target]] = {}
    for t in results:
        by_tensor.setdefault(t.tensor, []).append(t)
    for fqn, ts in by_tensor.items():
        ts.sort(key=lambda t: t.rows)
        rs = [results[t] for t in ts]
        mod, _, attr = fqn.rpartition(".")
        shape = tuple(getattr(model.get_submodule(mod) if mod else model, attr).shape)
        zeros = None if cfg.symmetric else torch.cat([r.zeros for r in rs]).round().to(torch.uint8)
        install_group_quant(model, fqn, GroupQuantWeights(
            torch.cat([r.codes for r in rs]), torch.cat([r.scales for r in rs]).float(), zeros, cfg.bits,
            cfg.group_size, rs[0].perm, shape, transposed=ts[0].kind == "transposed"))


@register("gptq", family="post-training", compare=lambda p: [{"gptq": {}}],
          quick={"samples": 8, "bits": 4, "group_size": 16},
          kind="quantizer", config=GPTQConfig, gives="grouped", needs_data=True,
          citation="Frantar et al. 2023, GPTQ, arXiv:2210.17323, Sec. 4 and Algorithm 1",
          summary="weight-only quantization with second-order error compensation on calibration data (group scales)")
def _run_gptq(model: nn.Module, cfg: GPTQConfig, ctx: StageContext) -> dict[str, Any]:
    samples = draw_samples(ctx.require_data(cfg.owner).train, cfg.samples, cfg.seed, cfg.owner)
    results: dict[Target, GPTQResult] = {}

    def compress(layer: str, targets: list[Target], stats: list[HessianAccumulator]) -> list[Tensor | None]:
        perms: dict[str, Tensor] = {}
        if cfg.act_order:  # one column order per parameter
            for fqn in {t.tensor for t in targets}:
                perms[fqn] = act_order_permutation([s.hessian for t, s in zip(targets, stats, strict=True)
                                                    if t.tensor == fqn])
        out: list[Tensor | None] = []
        for t, st in zip(targets, stats, strict=True):
            res = gptq_quantize(target_weight(model, t), st.hessian, bits=cfg.bits, group_size=cfg.group_size,
                                symmetric=cfg.symmetric, perm=perms.get(t.tensor), block_size=cfg.block_size,
                                damp_ratio=cfg.damp, keep=target_keep(model, t))
            results[t] = res
            out.append(res.weight)
        return out

    def workspace(t: Target) -> int:
        return 4 * (4 * t.columns**2 + 5 * (t.rows[1] - t.rows[0]) * t.columns)  # as sparsegpt._workspace

    run = compress_sequentially(model, samples, compress, owner=cfg.owner, batch_size=cfg.batch_size,
                                workspace=workspace)
    _install(model, results, cfg)
    layer_loss: dict[str, float] = {}
    for t, r in results.items():
        layer_loss[t.layer] = layer_loss.get(t.layer, 0.0) + float(r.loss.sum())
    zeros_kept = sum(int((~r.keep).sum()) for r in results.values())
    return {"bits": cfg.bits, "group_size": cfg.group_size, "loss_per_layer": layer_loss,
            "pruned_zeros_kept": zeros_kept, "skipped": run.skipped, "samples": run.samples,
            "chained": run.chained, "memory_estimate": run.memory}

