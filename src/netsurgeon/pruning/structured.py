"""Structured pruning that removes whole filters/neurons (the model gets physically smaller layers).

l1-norm filter pruning (Li, Kadav, Durdanovic, Samet, Graf 2017, "Pruning Filters for Efficient ConvNets",
Sec. 3.1): each filter j of a layer scores ``s_j = sum_l sum |K_l|``, the sum of its absolute kernel weights;
the ``m`` filters with the smallest scores are removed with their feature maps, and the next layer's kernels
that read those maps go with them (the surgery: pruning/channels.py). Where a residual add ties several
layers' feature maps into one channel set (Sec. 3.3 prunes such layers together), a channel's score is the sum
of its filters' scores in every tied layer (our reading; the paper selects them by the shortcut's layer). The
paper retrains afterwards: follow this stage with ``finetune``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..models import arch_of, layer_sizes, record_resized, resized_record
from ..registry import MethodConfig, StageContext, option, register
from .channels import ChannelGroup, channel_groups, remove_channels

__all__ = ["l1_filter_prune", "FilterReport", "L1FiltersConfig"]


@dataclass(frozen=True)
class FilterReport:
    layers: tuple[str, ...]  # the producers of one channel group
    before: int
    after: int


def _scores(model: nn.Module, g: ChannelGroup) -> torch.Tensor:
    s = torch.zeros(g.size)
    for name in g.producers:
        w = model.get_submodule(name).weight.detach()
        s += w.abs().reshape(w.shape[0], -1).sum(1).cpu()
    return s


def l1_filter_prune(model: nn.Module, fraction: float | Mapping[str, float], input_shape: tuple[int, ...], *,
                    min_channels: int = 1) -> list[FilterReport]:
    """Remove ``fraction`` of the channels of every removable group (a mapping: per producing layer name, the
    others untouched) with the smallest l1 scores, in place. Returns one report per shrunk group."""
    from torch.nn.utils import parametrize

    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError("l1_filters: the model holds masks or codebooks (parametrized weights); remove whole "
                         "filters first, then prune or share weights.")
    groups = channel_groups(model, input_shape)
    keep, reports = {}, []
    for i, g in enumerate(groups):
        if not g.prunable:
            continue
        if isinstance(fraction, Mapping):
            given = [fraction[p] for p in g.producers if p in fraction]
            if not given:
                continue
            f = max(given)
        else:
            f = fraction
        n_keep = max(min(min_channels, g.size), g.size - int(round(f * g.size)))
        if n_keep >= g.size:
            continue
        keep[i] = torch.topk(_scores(model, g), n_keep).indices.sort().values
        reports.append(FilterReport(tuple(g.producers), g.size, n_keep))
    if isinstance(fraction, Mapping):
        known = {p for g in groups for p in g.producers}
        unknown = sorted(set(fraction) - known)
        if unknown:
            raise ValueError(f"l1_filters: {unknown[0]!r} is not a layer whose filters can be pruned; "
                             f"choose from {sorted(known)}.")
    before = layer_sizes(model)
    remove_channels(model, groups, keep)
    record_resized(model, resized_record(model, before))
    return reports


@dataclass(frozen=True)
class L1FiltersConfig(MethodConfig):
    owner: ClassVar[str] = "l1_filters"
    fraction: float | dict[str, float] = option(0.5, "fraction of filters (channels) to remove per layer: a number, or "
                                "{layer: fraction} for the producing layers named", low=0, high=1, high_open=True)
    min_channels: int = option(1, "never keep fewer channels than this in a layer", low=1)


def _input_shape(model: nn.Module, ctx: StageContext) -> tuple[int, ...]:
    arch = arch_of(model) or {}
    if arch.get("input_shape"):
        return tuple(arch["input_shape"])
    shape = getattr(ctx.data, "input_shape", None)
    if shape:
        return tuple(shape)
    raise ValueError("l1_filters: the model records no input shape and no data was given; pass data (or build "
                     "the model with ns.build_model / record_arch with input_shape).")


@register("l1_filters", kind="oneshot", config=L1FiltersConfig, needs_data=False,
          citation="Li, Kadav, Durdanovic, Samet, Graf 2017 (ICLR), Pruning Filters for Efficient ConvNets, Sec. 3.1",
          summary="remove whole filters/neurons with the smallest l1 norms; the model gets smaller layers")
def _run_l1_filters(model: nn.Module, cfg: L1FiltersConfig, ctx: StageContext) -> dict[str, Any]:
    reports = l1_filter_prune(model, cfg.fraction, _input_shape(model, ctx), min_channels=cfg.min_channels)
    return {"groups": [{"layers": list(r.layers), "before": r.before, "after": r.after} for r in reports]}
