"""Structured pruning that removes whole filters/neurons (the model gets physically smaller layers).

l1-norm filter pruning (Li, Kadav, Durdanovic, Samet, Graf 2017, "Pruning Filters for Efficient ConvNets",
Sec. 3.1): each filter j of a layer scores ``s_j = sum_l sum |K_l|``, the sum of its absolute kernel weights;
the ``m`` filters with the smallest scores are removed with their feature maps, and the next layer's kernels
that read those maps go with them (the surgery: pruning/channels.py). Where a residual add ties several
layers' feature maps into one channel set (Sec. 3.3 prunes such layers together), a channel's score is the sum
of its filters' scores in every tied layer (our reading; the paper selects them by the shortcut's layer). The
paper retrains afterwards: follow this stage with ``finetune``.

Network slimming (Liu et al. 2017) and structured sparsity learning (Wen et al. 2016) are training-time: they
make channels unimportant (small BatchNorm scales) or exactly zero (group Lasso), then remove them the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._validation import check_positive
from ..changes import arch_of
from ..changes.resized import layer_sizes, record_resized, resized_record
from ..masks import attach_masks, original
from ..plan import oneshot_then_finetuned, trained
from ..registry import MethodConfig, StageContext, option, register
from ..stats import kept_columns, zero_columns
from ..train import Callback, TrainConfig, Trainer, run_training
from .channels import ChannelGroup, channel_groups, remove_channels

log = logging.getLogger(__name__)

__all__ = ["l1_filter_prune", "filter_sensitivity", "FilterReport", "L1FiltersConfig", "SlimmingPenalty", "slim",
           "GroupLassoProximal", "remove_zero_channels"]


@dataclass(frozen=True)
class FilterReport:
    layers: tuple[str, ...]  # the producers of one channel group
    before: int
    after: int
    kept: tuple[int, ...] = ()  # the channels kept (indices before removal)


def filter_sensitivity(model: nn.Module, data: Any, input_shape: tuple[int, ...],
                       fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
                       ) -> dict[str, dict[float, float]]:
    """Li et al. 2017, Sec. 3.2 and Fig. 2(b): prune each removable group alone by each fraction of its
    smallest-l1 filters, without retraining, and record the accuracy on ``data`` (use the validation split:
    the per-layer fractions chosen from it must not see the test split). Keys: the group's producing layers
    joined by '+'. ``model`` is not modified."""
    import copy

    from ..train import evaluate

    _check_plain(model, "filter_sensitivity")
    groups = channel_groups(model, input_shape)
    out: dict[str, dict[float, float]] = {}
    for g in groups:
        if not g.prunable:
            continue
        key = "+".join(g.producers)
        out[key] = {}
        for f in fractions:
            m = copy.deepcopy(model)
            l1_filter_prune(m, {p: f for p in g.producers}, input_shape)
            out[key][f] = evaluate(m, data)[1]
    return out


def _check_plain(model: nn.Module, owner: str) -> None:
    from torch.nn.utils import parametrize

    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError(f"{owner}: the model holds masks or codebooks (parametrized weights); remove whole "
                         "filters first, then prune or share weights.")


def _blocked_reasons(groups: list[ChannelGroup]) -> str:
    return "; ".join(sorted({b for g in groups for b in g.blocked})) or "-"


def _removable(groups: list[ChannelGroup], owner: str, ranked=None, what: str = "what this method ranks"
               ) -> list[ChannelGroup]:
    """The groups that can shrink (and, with ``ranked``, that the method can rank: ``ranked(g)`` true); raises a
    one-line ValueError naming what blocks them when there is none, so no method runs (or trains) for nothing."""
    ok = [g for g in groups if g.prunable]
    if not ok:
        raise ValueError(f"{owner}: no channel group of this model can shrink, so nothing would be removed "
                         f"(blocked by: {_blocked_reasons(groups)}).")
    if ranked is not None and not any(ranked(g) for g in ok):
        raise ValueError(f"{owner}: no removable channel group has {what} (the groups that have one are blocked "
                         f"by: {_blocked_reasons(groups)}); nothing would be removed.")
    return ok


def _has_bn(g: ChannelGroup) -> bool:
    return any(role == "bn" for _, role, _ in g.members)


def _scores(model: nn.Module, g: ChannelGroup) -> torch.Tensor:
    s = torch.zeros(g.size, device="cpu")  # channel scores live on the host
    for name in g.producers:
        w = model.get_submodule(name).weight.detach()
        s += w.abs().reshape(w.shape[0], -1).sum(1).cpu()
    return s


def _rounded(n: int, size: int, round_to: int) -> int:
    """``n`` rounded up to a multiple of ``round_to`` (at most ``size``), for accelerators and kernels that want
    aligned channel counts (on this CPU, 11 -> 14 channels ran no slower per FLOP than 16 -> 16: measured)."""
    return min(size, -(-n // round_to) * round_to)


def l1_filter_prune(model: nn.Module, fraction: float | Mapping[str, float], input_shape: tuple[int, ...], *,
                    min_channels: int = 1, round_to: int = 1) -> list[FilterReport]:
    """Remove ``fraction`` of the channels of every removable group (a mapping: per producing layer name, the
    others untouched) with the smallest l1 scores, in place; each layer keeps a multiple of ``round_to``
    channels. Returns one report per shrunk group."""
    _check_plain(model, "l1_filters")
    groups = channel_groups(model, input_shape)
    if isinstance(fraction, Mapping):
        known = {p for g in groups for p in g.producers}
        unknown = sorted(set(fraction) - known)
        if unknown:
            raise ValueError(f"l1_filters: {unknown[0]!r} is not a layer whose filters can be pruned; "
                             f"choose from {sorted(p for g in groups if g.prunable for p in g.producers)}.")
        for g in groups:
            named = [p for p in g.producers if p in fraction and fraction[p] > 0]
            if named and not g.prunable:
                raise ValueError(f"l1_filters: layer {named[0]!r} cannot lose filters: its channels reach "
                                 f"{'; '.join(g.blocked)}.")
    _removable(groups, "l1_filters")
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
        n_keep = _rounded(max(min(min_channels, g.size), g.size - int(round(f * g.size))), g.size, round_to)
        if n_keep >= g.size:
            continue
        keep[i] = torch.topk(_scores(model, g), n_keep).indices.sort().values
        reports.append(FilterReport(tuple(g.producers), g.size, n_keep, tuple(keep[i].tolist())))
    if not reports:
        log.warning("l1_filters: fraction %r rounds to no channel in any group (min_channels=%d, round_to=%d); "
                    "nothing removed", fraction, min_channels, round_to)
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
    round_to: int = option(1, "keep a multiple of this many channels per layer (aligned sizes)", low=1)


def _input_shape(model: nn.Module, ctx: StageContext) -> tuple[int, ...]:
    arch = arch_of(model) or {}
    if arch.get("input_shape"):
        return tuple(arch["input_shape"])
    shape = getattr(ctx.data, "input_shape", None)
    if shape:
        return tuple(shape)
    raise ValueError("l1_filters: the model records no input shape and no data was given; pass data (or build "
                     "the model with ns.build_model / record_arch with input_shape).")


@register("l1_filters", family="structured",
          compare=oneshot_then_finetuned("l1_filters", fraction=0.5), quick={"fraction": 0.5},
          kind="oneshot", config=L1FiltersConfig, needs_data=False,
          citation="Li, Kadav, Durdanovic, Samet, Graf 2017 (ICLR), Pruning Filters for Efficient ConvNets, Sec. 3.1",
          summary="remove whole filters/neurons with the smallest l1 norms; the model gets smaller layers")
def _run_l1_filters(model: nn.Module, cfg: L1FiltersConfig, ctx: StageContext) -> dict[str, Any]:
    reports = l1_filter_prune(model, cfg.fraction, _input_shape(model, ctx), min_channels=cfg.min_channels,
                              round_to=cfg.round_to)
    return {"groups": [{"layers": list(r.layers), "before": r.before, "after": r.after} for r in reports]}


def _remove_by_score(model: nn.Module, input_shape: tuple[int, ...], score, fraction: float, min_channels: int,
                     owner: str, round_to: int = 1, what: str | None = None) -> list[FilterReport]:
    """Remove the ``fraction`` of all removable channels with the smallest ``score(group)`` values, one
    threshold across every group (channels scoring exactly 0 always go), keeping ``min_channels`` per group.
    ``what`` (what the score ranks): refuse when no removable group has it; None: nothing to remove is fine."""
    _check_plain(model, owner)
    groups = channel_groups(model, input_shape)
    if what is not None:
        _removable(groups, owner, lambda g: score(g) is not None, what)
    scored = {i: score(g) for i, g in enumerate(groups) if g.prunable}
    scored = {i: s for i, s in scored.items() if s is not None}
    if not scored:
        return []
    allv = torch.cat(list(scored.values()))
    k = int(round(fraction * allv.numel()))
    thr = allv.sort().values[k - 1] if k > 0 else torch.tensor(-1.0, device="cpu")
    keep, reports = {}, []
    for i, s in scored.items():
        idx = torch.nonzero((s > thr) & (s > 0)).flatten()
        want = _rounded(max(idx.numel(), min(min_channels, s.numel())), s.numel(), round_to)
        if idx.numel() < want:  # the best-scoring channels up to the count wanted
            idx = torch.topk(s, want).indices.sort().values
        if idx.numel() < s.numel():
            keep[i] = idx
            reports.append(FilterReport(tuple(groups[i].producers), s.numel(), idx.numel(), tuple(idx.tolist())))
    before = layer_sizes(model)
    remove_channels(model, groups, keep)
    record_resized(model, resized_record(model, before))
    return reports


class SlimmingPenalty(Callback):
    """Network slimming's sparsity term (Liu et al. 2017, Eq. 1): λ·Σ|γ| over every BatchNorm scale, added as
    its subgradient λ·sign(γ) to γ's gradient after each backward pass."""

    def __init__(self, lam: float) -> None:
        check_positive("SlimmingPenalty", "lam", lam)
        self.lam = lam
        self._gammas: list[torch.Tensor] = []

    def prepare(self, model: nn.Module, **_: Any) -> None:
        self._gammas = [m.weight for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
                        and m.weight is not None]
        if not self._gammas:
            raise ValueError("slimming: the model has no BatchNorm layer with a scale (affine=True) to make sparse.")

    @torch.no_grad()
    def after_backward(self, trainer: Trainer | None = None) -> None:
        if trainer is not None and not self._gammas:
            self.prepare(trainer.model)
        for g in self._gammas:
            if g.grad is not None:
                g.grad.add_(torch.sign(g), alpha=self.lam)


def slim(model: nn.Module, fraction: float, input_shape: tuple[int, ...], *, min_channels: int = 1,
         round_to: int = 1) -> list[FilterReport]:
    """Remove the ``fraction`` of BatchNorm-scaled channels with the smallest |γ|, one global threshold (Liu et
    al. 2017, Sec. 4: "a global threshold across all layers"); a residual group's score sums its |γ|s."""
    def score(g: ChannelGroup):
        bns = [(n, f) for n, role, f in g.members if role == "bn"]
        if not bns:
            return None
        # a BatchNorm1d after a flatten holds f scales per channel: the channel's score sums them
        return sum(g.channels(n, model.get_submodule(n).weight.detach().abs().cpu(), f).reshape(g.size, -1).sum(1)
                   for n, f in bns)

    return _remove_by_score(model, input_shape, score, fraction, min_channels, "slimming", round_to,
                            what="a BatchNorm scale")


class GroupLassoProximal(Callback):
    """Structured sparsity learning's group Lasso (Wen et al. 2016, Eq. 2; Lebedev & Lempitsky 2016) on
    filter-wise groups (a producer's output rows) and channel-wise groups (a consumer's input columns), applied
    as proximal steps after each optimizer step: ``w_g <- w_g · max(0, 1 − lr·λ/‖w_g‖₂)``, exact zeros, with
    ``lr`` the learning rate of the optimizer's parameter group that holds the weight.

    In the user's own loop pass the optimizer: ``prepare(model, optimizer=opt)`` (the step size is lr·λ; without
    it :meth:`after_step` raises rather than take no step)."""

    def __init__(self, lam_filter: float, lam_channel: float, input_shape: tuple[int, ...],
                 lam_shape: float = 0.0) -> None:
        self.lam_filter, self.lam_channel, self.input_shape = lam_filter, lam_channel, input_shape
        self.lam_shape = lam_shape
        self._groups: list[ChannelGroup] = []
        self._convs: list[nn.Module] = []
        self._optimizer: torch.optim.Optimizer | None = None

    def prepare(self, model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None, **_: Any) -> None:
        _check_plain(model, "ssl")
        self._model = model
        if optimizer is not None:
            self._optimizer = optimizer
        self._groups = [g for g in channel_groups(model, self.input_shape) if g.prunable]
        # shape-wise groups (Wen et al. Sec. 3.3): one group per (input channel, kernel position) of a
        # convolution, across all its filters: a column of the lowered (im2col) weight matrix
        self._convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1]

    def _learning_rates(self, trainer: Trainer | None) -> dict[int, float]:
        """id(parameter) -> its learning rate now (schedules change it every step)."""
        opt = trainer.optimizer if trainer is not None else self._optimizer
        if opt is None:
            raise ValueError("ssl: the proximal step is lr·λ and no optimizer was given; in your own loop call "
                             "prepare(model, optimizer=opt) before training.")
        return {id(p): float(group["lr"]) for group in opt.param_groups for p in group["params"]}

    @torch.no_grad()
    def after_step(self, trainer: Trainer | None = None) -> None:
        if trainer is not None and not self._groups:
            self.prepare(trainer.model)
        lrs = self._learning_rates(trainer)

        def lr(w: torch.Tensor) -> float:
            return lrs.get(id(w), 0.0)  # a weight the optimizer does not train takes no step

        for g in self._groups:
            for name, role, factor in g.members:
                w = self._model.get_submodule(name).weight
                if role == "out" and self.lam_filter > 0:
                    _group_shrink(w.reshape(w.shape[0], -1), lr(w) * self.lam_filter)
                elif role == "in" and self.lam_channel > 0:
                    cols = g.channels(name, w, factor)  # (channel, out, k); after a flatten, k = its H·W columns
                    _group_shrink(cols.reshape(cols.shape[0], -1), lr(w) * self.lam_channel, view_of=cols)
        if self.lam_shape > 0:
            for m in self._convs:
                _group_shrink(m.weight.view(m.weight.shape[0], -1).t(), lr(m.weight) * self.lam_shape)


def _group_shrink(rows: torch.Tensor, t: float, view_of: torch.Tensor | None = None) -> None:
    norms = rows.norm(dim=1, keepdim=True)
    factor = (1 - t / norms.clamp_min(1e-12)).clamp_min(0)
    if view_of is None:
        rows.mul_(factor)
    else:
        view_of.mul_(factor.reshape(-1, *([1] * (view_of.dim() - 1))))


def remove_zero_channels(model: nn.Module, input_shape: tuple[int, ...], *, min_channels: int = 1
                         ) -> list[FilterReport]:
    """Remove every channel whose removal leaves the function unchanged: its columns in every consumer are zero
    (what reads it ignores it), or, in a group without BatchNorm, its filters and biases are zero in every
    producer (it carries zeros)."""
    def col_norms(g: ChannelGroup, name: str, factor: int) -> torch.Tensor:
        return g.channels(name, model.get_submodule(name).weight.detach().cpu(), factor).abs().sum((1, 2))

    def score(g: ChannelGroup):
        consumers = [col_norms(g, n, f) for n, role, f in g.members if role == "in"]
        read = sum(consumers) if consumers else torch.full((g.size,), float("inf"), device="cpu")
        if any(role in ("bn", "dw", "scale") for _, role, _ in g.members):  # a per-channel shift on the way
            return read
        carried = torch.zeros(g.size, device="cpu")
        for n in g.producers:
            m = model.get_submodule(n)
            carried += m.weight.detach().abs().reshape(g.size, -1).sum(1).cpu()
            if m.bias is not None:
                carried += m.bias.detach().abs().cpu()
        return torch.minimum(read, carried)

    return _remove_by_score(model, input_shape, score, 0.0, min_channels, "ssl")


def _train_then_remove(model: nn.Module, cfg: TrainConfig, ctx: StageContext, callback, remove,
                       check=None) -> dict[str, Any]:
    """A training-time structured method's stage: ``check(groups)`` (refuse before training when nothing could
    be removed), train with ``callback(shape)``, then ``remove(shape)``."""
    shape = _input_shape(model, ctx)
    if check is not None:
        check(channel_groups(model, shape))
    report = run_training(model, ctx, cfg, callback(shape))
    return {**report, "groups": [{"layers": list(r.layers), "before": r.before, "after": r.after}
                                 for r in remove(shape)]}


@dataclass(frozen=True)
class SlimmingConfig(TrainConfig):
    owner: ClassVar[str] = "slimming"
    lam: float = option(1e-4, "lambda of the l1 penalty on BatchNorm scales (paper: 1e-4, 1e-5)", low=0,
                        low_open=True)
    fraction: float = option(0.5, "fraction of BatchNorm-scaled channels removed after training (global)",
                             low=0, high=1, high_open=True)
    min_channels: int = option(1, "never keep fewer channels than this in a layer", low=1)
    round_to: int = option(1, "keep a multiple of this many channels per layer (aligned sizes)", low=1)


@register("slimming", family="structured",
          compare=trained("slimming", fraction=0.5), quick={"lam": 1e-3, "fraction": 0.3, "epochs": 1},
          kind="training", config=SlimmingConfig, needs_data=True,
          citation="Liu, Li, Shen, Huang, Yan, Zhang 2017 (ICCV), Learning Efficient Convolutional Networks "
                   "through Network Slimming, Eq. 1 and Sec. 4",
          summary="train with l1 on BatchNorm scales, then remove the channels with the smallest scales")
def _run_slimming(model: nn.Module, cfg: SlimmingConfig, ctx: StageContext) -> dict[str, Any]:
    def check(groups: list[ChannelGroup]) -> None:
        if not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.weight is not None for m in model.modules()):
            raise ValueError("slimming: the model has no BatchNorm layer with a scale (affine=True) to make sparse.")
        _removable(groups, "slimming", _has_bn, "a BatchNorm scale")

    return _train_then_remove(model, cfg, ctx, lambda shape: SlimmingPenalty(cfg.lam),
                              lambda shape: slim(model, cfg.fraction, shape, min_channels=cfg.min_channels,
                                                 round_to=cfg.round_to), check)


@dataclass(frozen=True)
class SSLConfig(TrainConfig):
    owner: ClassVar[str] = "ssl"
    lam_filter: float = option(1e-3, "group-Lasso strength on whole filters (output rows)", low=0)
    lam_channel: float = option(1e-3, "group-Lasso strength on whole input channels (columns)", low=0)
    lam_shape: float = option(0.0, "group-Lasso strength on filter shapes: one group per (input channel, kernel "
                                   "position) across a conv's filters; zeroed ones are masked (kept zero by later "
                                   "training) and skipped by the runtime's column form",
                              low=0)
    min_channels: int = option(1, "never keep fewer channels than this in a layer", low=1)


@register("ssl", family="structured", compare=trained("ssl"),
          quick={"lam_filter": 0.5, "lam_channel": 0.5, "epochs": 1, "lr": 0.5},
          kind="training", config=SSLConfig, needs_data=True,
          citation="Wen, Wu, Wang, Chen, Li 2016 (NeurIPS), Learning Structured Sparsity in Deep Neural Networks, "
                   "Eq. 2 (filter-wise and channel-wise groups; shape-wise groups, Sec. 3.3); Lebedev & Lempitsky "
                   "2016",
          summary="train with a group Lasso on filters and channels (proximal steps), then remove zeroed ones")
def _run_ssl(model: nn.Module, cfg: SSLConfig, ctx: StageContext) -> dict[str, Any]:
    def check(groups: list[ChannelGroup]) -> None:
        if cfg.lam_shape == 0:  # shape-wise groups need no removable channel
            _removable(groups, "ssl")

    report = _train_then_remove(
        model, cfg, ctx, lambda shape: GroupLassoProximal(cfg.lam_filter, cfg.lam_channel, shape, cfg.lam_shape),
        lambda shape: remove_zero_channels(model, shape, min_channels=cfg.min_channels), check)
    if cfg.lam_shape > 0:
        report["masked_shapes"] = mask_zero_shapes(model)  # a later fine-tuning stage keeps them zero
    report["zero_shapes_pct"] = zero_shapes(model)
    return report


@torch.no_grad()
def mask_zero_shapes(model: nn.Module) -> list[str]:
    """Hold every all-zero shape-wise group of a convolution (a column of its lowered weight) at zero with a
    pruning mask, so later training keeps the structure the runtime's column form (``ColumnConv2d``) skips.
    Returns the masked tensors."""
    names = [f"{n}.weight" for n, m in model.named_modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1 and zero_columns(m.weight) > 0]
    for fqn, p in attach_masks(model, names).items():
        p.mask.view(p.mask.shape[0], -1).mul_(kept_columns(original(model, fqn)).to(p.mask.dtype))
    return names


def zero_shapes(model: nn.Module) -> dict[str, float]:
    """% of each convolution's shape-wise groups (input channel x kernel position, across its filters) that are
    all zero: the columns a lowered (im2col) convolution would skip."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1:
            out[name] = 100.0 * zero_columns(m.weight) / m.weight[0].numel()
    return out
