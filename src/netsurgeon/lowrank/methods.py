"""The registered methods of this package: ``lowrank`` (Linear and Conv2d factorization under one energy
threshold or weight budget) and ``separable`` (compact filters: every convolution as a depthwise-separable pair).
Both optionally fit each replacement to the original layer's outputs (``match_steps``) and fine-tune
(``epochs``); a following ``distill`` stage fine-tunes against the model the pipeline started from."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._validation import check_finite_model
from ..plan import trained
from ..registry import StageContext, option, register
from ..train import TrainConfig, run_training
from .conv import CONV_KINDS, conv_cost
from .factorize import candidate_layers, factorize_layers, lowrank_factorize, match_outputs

__all__ = ["LowRankConfig", "SeparableConfig"]


@dataclass(frozen=True)
class _FactorTraining(TrainConfig):
    """What both methods do after replacing layers."""

    epochs: int = option(0, "fine-tuning epochs after factorizing (0: none)", low=0)
    match_steps: int = option(0, "mini-batches of layer-wise output matching before fine-tuning (0: none)", low=0)
    match_lr: float = option(1e-3, "Adam learning rate of the output matching", low=0, low_open=True)


def _after(model: nn.Module, cfg: _FactorTraining, ctx: StageContext, originals: dict[str, nn.Module],
           report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"layers": report}
    originals = {n: m for n, m in originals.items() if report[n]["rank"] is not None}
    if cfg.match_steps > 0 and originals:
        out["matched_rel_error"] = match_outputs(model, originals, ctx.require_data(cfg.owner), steps=cfg.match_steps,
                                                 lr=cfg.match_lr, batch_size=cfg.batch_size, seed=cfg.seed)
    if cfg.epochs > 0:
        out["finetune"] = run_training(model, ctx, cfg)
    return out


def _needs_data(cfg: _FactorTraining) -> bool:
    return cfg.epochs > 0 or cfg.match_steps > 0


@dataclass(frozen=True)
class LowRankConfig(_FactorTraining):
    owner: ClassVar[str] = "lowrank"
    energy: float | None = option(None, "keep this fraction of each layer's Σσ² (give energy or params)", low=0,
                                  high=1, low_open=True)
    params: float | None = option(0.25, "keep at most this fraction of the factorized layers' weights (one energy "
                                        "threshold for all layers)", low=0, high=1, low_open=True)
    conv: str = option("spatial", "Conv2d layers: none (Linear only), spatial (Jaderberg k×1 + 1×k), cp (Lebedev), "
                                  "tucker (Kim, Tucker-2) or separable (depthwise + 1x1)",
                       choices=("none", *CONV_KINDS))

    def validate(self) -> None:
        if (self.energy is None) == (self.params is None):
            raise ValueError(f"{self.owner}: give exactly one of energy or params (set the other to null); got "
                             f"energy={self.energy!r}, params={self.params!r}.")


@register("lowrank", family="low rank", compare=trained("lowrank", params=0.25),
          quick={"params": 0.3, "epochs": 1, "match_steps": 2},
          kind="oneshot", config=LowRankConfig, needs_data=_needs_data,
          citation="Denton et al. 2014, arXiv:1404.0736, Sec. 3.2 (SVD of fully connected layers); Jaderberg et al. "
                   "2014, BMVC, scheme 2 with Tai et al. 2016's closed form; Lebedev et al. 2015, ICLR, Eq. (3)-(4) "
                   "(CP); Kim et al. 2016, ICLR, Eq. (2)-(5) (Tucker-2)",
          summary="replace Linear and Conv2d layers by low-rank factor layers (rank by energy or a global weight "
                  "budget)")
def _run_lowrank(model: nn.Module, cfg: LowRankConfig, ctx: StageContext) -> dict[str, Any]:
    originals = {n: copy.deepcopy(m) for n, (m, _) in candidate_layers(model, "lowrank", cfg.conv, None).items()} \
        if cfg.match_steps > 0 else {}
    report = lowrank_factorize(model, energy=cfg.energy, params=cfg.params, conv=cfg.conv, seed=cfg.seed)
    return _after(model, cfg, ctx, originals, report)


@dataclass(frozen=True)
class SeparableConfig(_FactorTraining):
    owner: ClassVar[str] = "separable"
    multiplier: int = option(1, "depthwise filters per input channel (MobileNet's depth multiplier)", low=1)


@torch.no_grad()
def separable_factorize(model: nn.Module, multiplier: int = 1) -> dict[str, Any]:
    """Replace every Conv2d where it saves weights by a depthwise k_h x k_w (``multiplier`` filters per input
    channel, at most min(N, k_h·k_w)) + 1x1 pair, each channel's slice by its truncated SVD; returns the report."""
    check_finite_model("separable", model)
    report, plan = {}, {}
    for name, (m, _) in candidate_layers(model, "separable", "separable", None).items():
        r = min(multiplier, m.out_channels, m.kernel_size[0] * m.kernel_size[1])
        before, after = m.weight.numel(), conv_cost(m, "separable", r)
        w = m.weight.detach().double().transpose(0, 1).reshape(m.in_channels, m.out_channels, -1)
        s2 = torch.linalg.svdvals(w).pow(2)
        factor = after < before
        report[name] = {"kind": "separable", "rank": r if factor else None, "weights_before": before,
                        "weights_after": after if factor else before,
                        "energy_kept": float(s2[:, :r].sum() / s2.sum()) if factor and float(s2.sum()) > 0 else 1.0}
        if factor:
            plan[name] = ("separable", r)
    factorize_layers(model, plan)
    return report


@register("separable", family="low rank", compare=trained("separable"), quick={"epochs": 1, "match_steps": 2},
          kind="oneshot", config=SeparableConfig, needs_data=_needs_data,
          citation="compact filters (Cheng et al. survey Sec. 4): depthwise-separable convolution, Howard et al. 2017 "
                   "(MobileNets), Sec. 3.1-3.3; each channel's filters by their truncated SVD",
          summary="replace each Conv2d by a depthwise + 1x1 pair fitted to it (then match outputs / fine-tune)")
def _run_separable(model: nn.Module, cfg: SeparableConfig, ctx: StageContext) -> dict[str, Any]:
    originals = {n: copy.deepcopy(m) for n, (m, _) in candidate_layers(model, "separable", "separable", None).items()} \
        if cfg.match_steps > 0 else {}
    return _after(model, cfg, ctx, originals, separable_factorize(model, cfg.multiplier))
