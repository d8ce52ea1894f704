"""Data-free neuron pruning: merge near-duplicate neurons of fully connected layers, with no data at all.

Srinivas & Babu 2015 (BMVC), "Data-free parameter pruning for Deep Neural Networks", Sec. 3. Take two neurons
``i`` and ``j`` of one hidden layer, with incoming weight sets ``W_i``, ``W_j`` (rows of the layer's weight
matrix, here with the bias appended as the weight of a constant input) and outgoing weights ``a_i``, ``a_j``
(columns of the next layer). If ``W_i = W_j`` the two neurons compute the same activation ``h``, so the next
layer receives ``a_i h + a_j h = (a_i + a_j) h``: neuron ``j`` can be removed and its outgoing weights added to
``i``'s (the "surgery") without changing the function. When they differ by ``ε = W_j − W_i``, the squared
change of the next layer's input is bounded by a quantity proportional to the *saliency*

    s_ij = ⟨a_j²⟩ · ‖ε‖²,      ⟨a_j²⟩ = the mean of the squares of a_j's elements,

for a Lipschitz-1 activation (ReLU) and inputs of bounded norm. The algorithm removes neurons one at a time:
find the pair (i, j) of smallest saliency, remove ``j`` and add ``a_j`` to ``a_i``, and repeat; since ``a_i``
changed, the saliencies of every pair whose removed member would be ``i`` change with it (the incoming
weights, and hence every ``‖ε‖²``, do not). The paper chooses how many neurons to remove from the curve of
saliencies (the neuron count where it rises sharply); :func:`merge_neurons` returns that curve.

No data is read: this needs only the weights. The removed neurons are physically removed (the layers get
smaller, recorded in the ``.nsz`` file as shrunk shapes, see pruning/channels.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..changes.resized import layer_sizes, record_resized, resized_record
from ..plan import oneshot_then_finetuned
from ..registry import MethodConfig, StageContext, option, register
from .channels import ChannelGroup, channel_groups, remove_channels
from .structured import _check_plain, _input_shape

log = logging.getLogger(__name__)

__all__ = ["pair_saliency", "greedy_merge_order", "merge_neurons", "MergeReport", "DataFreeConfig",
           "mergeable_layers"]


@dataclass(frozen=True)
class MergeReport:
    layer: str
    before: int
    after: int
    saliencies: tuple[float, ...]  # saliency of each merge done, in order
    curve: tuple[float, ...] = ()  # the saliency of every greedy merge down to one neuron (the paper's Fig.)
    merges: tuple[tuple[int, int], ...] = field(default=(), repr=False)  # (kept i, removed j), original indices


def _sq_distances(w_in: Tensor) -> Tensor:
    """‖W_i − W_j‖² for every pair of rows of ``w_in`` (float64)."""
    w = w_in.double()
    sq = (w * w).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * w @ w.T).clamp_min(0)


def pair_saliency(w_in: Tensor, a_out: Tensor) -> Tensor:
    """The matrix ``s[i, j] = ⟨a_j²⟩ ‖W_i − W_j‖²`` (Srinivas & Babu 2015, Sec. 3.2) for incoming weight sets
    ``w_in`` (n, d) (append the bias as a column) and outgoing weights ``a_out`` (m, n) (the next layer's
    weight; several consumers concatenated along dim 0). The diagonal is +inf (a neuron cannot merge into
    itself)."""
    s = _sq_distances(w_in) * a_out.double().pow(2).mean(0)[None, :]
    s.fill_diagonal_(float("inf"))
    return s


def greedy_merge_order(w_in: Tensor, a_out: Tensor, count: int | None = None, zero_partner: bool = False
                       ) -> tuple[list[tuple[int, int]], list[float], Tensor]:
    """The paper's greedy removal: ``count`` merges (default: down to one neuron), each of the pair with the
    smallest current saliency. Returns the merges (kept i, removed j), their saliencies, and the outgoing
    weights after the surgery (``a_i += a_j`` for each merge; removed columns are left in place).

    ``zero_partner`` (ours, not the paper's): a virtual all-zero neuron is also a candidate partner, so a
    neuron whose own weights are small may simply be dropped (saliency ⟨a_j²⟩‖W_j‖², merge (-1, j)) instead of
    being added to a neuron that differs from it more than it differs from nothing."""
    n = w_in.shape[0]
    count = n - 1 if count is None else count
    if not 0 <= count < n:
        raise ValueError(f"data-free merge: cannot remove {count} of {n} neurons (at least one must stay).")
    if zero_partner:
        w_in = torch.cat([w_in, w_in.new_zeros(1, w_in.shape[1])])
        a_out = torch.cat([a_out, a_out.new_zeros(a_out.shape[0], 1)], 1)
    dist = _sq_distances(w_in)
    size = dist.shape[0]
    # blocked[i, j]: j cannot be removed into i (i = j, either one already gone, or j the virtual neuron);
    # masked explicitly, since inf * 0 (a neuron with all-zero outgoing weights) would be NaN
    blocked = torch.eye(size, dtype=torch.bool, device=dist.device)
    if zero_partner:
        blocked[:, n] = True
    a = a_out.detach().clone().double()
    m = a.pow(2).mean(0)
    merges: list[tuple[int, int]] = []
    sal: list[float] = []
    for _ in range(count):
        s = (dist * m[None, :]).masked_fill(blocked, float("inf"))
        flat = int(torch.argmin(s))
        i, j = divmod(flat, size)
        merges.append((-1 if i == n else i, j))
        sal.append(float(s[i, j]))
        a[:, i] += a[:, j]
        m[i] = a[:, i].pow(2).mean()
        blocked[j, :] = True  # j is gone: neither kept nor removed again
        blocked[:, j] = True
    return merges, sal, a[:, :n].to(a_out.dtype)


def mergeable_layers(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ChannelGroup]]:
    """Linear layers whose neurons can be merged: the layer alone produces its outputs, which reach only other
    Linear layers through element-wise ops (no BatchNorm between: a per-neuron scale would break a_i + a_j).
    Maps the layer name to (group index, group)."""
    out = {}
    for gi, g in enumerate(channel_groups(model, input_shape)):
        if not g.prunable or len(g.producers) != 1 or g.spans:  # merging needs a layer's whole input
            continue
        prod = model.get_submodule(g.producers[0])
        consumers = [(n, f) for n, role, f in g.members if role == "in"]
        if not isinstance(prod, nn.Linear) or not consumers or any(role in ("bn", "dw", "scale")
                                                                          for _, role, _ in g.members):
            continue
        if all(f == 1 and isinstance(model.get_submodule(n), nn.Linear) for n, f in consumers):
            out[g.producers[0]] = (gi, g)
    return out


@torch.no_grad()
def merge_neurons(model: nn.Module, fraction: float | Mapping[str, float], input_shape: tuple[int, ...], *,
                  surgery: bool = True, curve: bool = False, zero_partner: bool = False) -> list[MergeReport]:
    """Remove ``fraction`` of the neurons of every mergeable Linear layer (a mapping: per layer name, others
    untouched) by the greedy pairwise merge, in place; ``surgery=False`` removes the same neurons without
    adding their outgoing weights to their partners (the ablation). ``curve=True`` also reports the saliency
    of every merge down to one neuron; ``zero_partner`` lets a neuron be dropped rather than merged when that
    is cheaper (see :func:`greedy_merge_order`; ours, off by default). Layers are processed from the input
    side; each layer's merge reads the weights as the earlier merges left them (the incoming weights of a later
    layer do change)."""
    _check_plain(model, "datafree")
    layers = mergeable_layers(model, input_shape)
    if isinstance(fraction, Mapping):
        unknown = sorted(set(fraction) - set(layers))
        if unknown:
            raise ValueError(f"datafree: {unknown[0]!r} is not a Linear layer whose neurons can be merged; "
                             f"choose from {sorted(layers) or 'none (this model has no such layer)'}.")
    elif not layers:
        raise ValueError("datafree: the model has no hidden Linear layer feeding only Linear layers (the paper "
                         "merges neurons of fully connected layers); nothing to prune.")
    reports: list[MergeReport] = []
    for name in list(layers):  # names in graph order; groups recomputed after every removal
        f = fraction.get(name) if isinstance(fraction, Mapping) else fraction
        if not f:
            continue
        gi, g = mergeable_layers(model, input_shape)[name]
        prod = model.get_submodule(name)
        n = g.size
        count = min(n - 1, int(round(f * n)))
        if count <= 0:
            continue
        w_in = prod.weight.detach()
        if prod.bias is not None:
            w_in = torch.cat([w_in, prod.bias.detach()[:, None]], 1)
        consumers = [model.get_submodule(c) for c, role, _ in g.members if role == "in"]
        a_out = torch.cat([c.weight.detach() for c in consumers], 0)
        merges, sal, a_new = greedy_merge_order(w_in, a_out, None if curve else count, zero_partner)
        merges, sal_done = merges[:count], sal[:count]
        if surgery:
            if curve:  # the full run went past `count`: redo the surgery for the merges kept
                a_new = a_out.detach().clone()
                for i, j in merges:
                    if i >= 0:
                        a_new[:, i] += a_new[:, j]
            row = 0
            for c in consumers:
                c.weight.copy_(a_new[row:row + c.weight.shape[0]])
                row += c.weight.shape[0]
        removed = {j for _, j in merges}
        keep = torch.tensor([k for k in range(n) if k not in removed], device="cpu")
        before = layer_sizes(model)
        remove_channels(model, [g], {0: keep})
        record_resized(model, resized_record(model, before))
        reports.append(MergeReport(name, n, keep.numel(), tuple(sal_done), tuple(sal) if curve else (),
                                   tuple(merges)))
        log.info("datafree: %s %d -> %d neurons (largest saliency merged %.3g)", name, n, keep.numel(),
                 max(sal_done))
    return reports


@dataclass(frozen=True)
class DataFreeConfig(MethodConfig):
    owner: ClassVar[str] = "datafree"
    fraction: float | dict[str, float] = option(
        0.5, "fraction of the neurons of each hidden Linear layer to merge away: a number, or {layer: fraction}",
        low=0, high=1, high_open=True)
    surgery: bool = option(True, "add a removed neuron's outgoing weights to its partner's (the paper); false: "
                                 "just remove it (ablation)")
    zero_partner: bool = option(False, "also allow dropping a neuron (partner: the zero neuron) when that has the "
                                       "smaller saliency (ours, not the paper's)")


@register("datafree", family="structured",
          compare=oneshot_then_finetuned("datafree", fraction=0.5), quick={"fraction": 0.5},
          kind="oneshot", config=DataFreeConfig, needs_data=False,
          citation="Srinivas & Babu 2015 (BMVC), Data-free parameter pruning for Deep Neural Networks, Sec. 3 "
                   "(saliency s_ij = <a_j^2> ||W_i - W_j||^2, surgery a_i += a_j)",
          summary="merge near-duplicate neurons of fully connected layers, no data needed; layers get smaller")
def _run_datafree(model: nn.Module, cfg: DataFreeConfig, ctx: StageContext) -> dict[str, Any]:
    reports = merge_neurons(model, cfg.fraction, _input_shape(model, ctx), surgery=cfg.surgery,
                            zero_partner=cfg.zero_partner)
    return {"layers": [{"layer": r.layer, "before": r.before, "after": r.after,
                        "max_saliency": max(r.saliencies) if r.saliencies else 0.0} for r in reports]}
