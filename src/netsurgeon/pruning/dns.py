"""Dynamic Network Surgery (Guo, Yao, Chen, NIPS 2016, "Dynamic Network Surgery for Efficient DNNs",
arXiv:1608.04493).

Each prunable tensor W_k (weights and, by default, biases) carries a binary mask T_k and the network runs
with W_k ⊙ T_k (Eq. (1)). Three ingredients:

* **Straight-through weight update** (Sec. 3.2, the update of W_k following Eq. (1)): the gradient with
  respect to W_k ⊙ T_k is applied to *every* entry of W_k, pruned ones included, so a pruned connection
  keeps learning and can come back. Implemented by :class:`netsurgeon.masks.StraightThroughMask`.
* **Two thresholds with a band** (Eq. (3), h_k): T = 0 where |W| < a_k, T = 1 where |W| >= b_k, unchanged in
  between ("splicing" turns a 0 back into 1). Following the official Caffe code (compress_*_layer.cpp),
  a_k = low·max(μ_k + c·σ_k, 0) and b_k = high·max(μ_k + c·σ_k, 0) with low = 0.9, high = 1.1, where
  μ_k, σ_k are the mean and std of |w| over the layer's nonzero weights and biases, taken once when the
  layer's surgery starts; c is the paper's "crate".
* **Mask updates with decaying probability** (Sec. 3.4): at surgery iteration i a layer's mask is
  re-evaluated with probability σ(i) = (1 + γ·i)^(−power) (one draw per layer per iteration, as in the
  code), and never at or after ``iter_stop``.

Conv and FC layers can be operated on in separate phases (Sec. 3.4, against vanishing gradients): give
``iter_start``/``iter_stop`` per layer type, e.g. :meth:`DNS.separate_phases`. The iteration ``i`` of the
probability counts from a layer's own start.

Not in the paper: a floor on what a layer keeps. Where a layer's weights are near-uniform in magnitude (a
random initialization, a layer whose weights all sit in one band), σ_k is about a third of μ_k and the
default c = 3 puts a_k above every |w|: the whole layer is pruned and the network computes a constant.
``min_per_output`` (default 1) keeps that many of the largest |w| of each output unit (a row of a Linear, a
filter of a convolution) whose mask would keep fewer, and logs a warning naming the layers; with
``min_per_output=0`` a layer about to lose every weight is refused (ValueError) unless
``allow_empty_layers=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._validation import check_finite_model, check_positive
from ..masks import attach_masks, freeze_masks, layer_kind, original, prunable_layers
from ..plan import Plan
from ..registry import StageContext, option, register
from ..train import Callback, TrainConfig, Trainer, run_training

__all__ = ["DNS", "DNSConfig", "dns_update_mask", "dns_thresholds", "surgery_probability", "calibrate_c_rate",
           "keep_per_output"]

log = logging.getLogger(__name__)

OFFICIAL_ITER_STOP = {"conv": 10_000, "fc": 8_000}  # the official Caffe code's mask-update stops per layer type


def dns_update_mask(w: Tensor, mask: Tensor, a: float, b: float) -> Tensor:
    """Return h_k of Eq. (3): 0 where |w| < a, 1 where |w| >= b, ``mask`` in the band [a, b)."""
    absw = w.abs()
    out = mask.clone()
    out[absw < a] = 0
    out[absw >= b] = 1
    return out


def dns_thresholds(tensors: list[Tensor], c: float, low: float = 0.9, high: float = 1.1) -> tuple[float, float]:
    """(a, b) = (low, high)·max(μ + c·σ, 0), μ and σ of |w| over the nonzero entries of ``tensors``.

    This is the official code's rule (the paper leaves the exact form open); ``tensors`` are a layer's
    weights and biases together.
    """
    flat = torch.cat([t.detach().abs().flatten() for t in tensors]).double()
    flat = flat[flat != 0]
    if flat.numel() == 0:
        return 0.0, 0.0
    mu = flat.mean()
    sigma = (flat.pow(2).mean() - mu * mu).clamp_min(0).sqrt()
    theta = float(torch.clamp(mu + c * sigma, min=0))
    return low * theta, high * theta


def calibrate_c_rate(tensors: list[Tensor], kept: float) -> float:
    """The c for which |w| >= μ + c·σ holds for a fraction ``kept`` of the nonzero entries of ``tensors``.

    Not in the paper (its c is set by hand): a starting point for choosing c per layer from the weights of
    the trained dense model alone, with no data. Surgery then keeps training, so the final kept fraction
    differs and is measured, not assumed.
    """
    if not 0 < kept <= 1:
        raise ValueError(f"calibrate_c_rate: kept must be in (0, 1]; got {kept!r}.")
    flat = torch.cat([t.detach().abs().flatten() for t in tensors]).double()
    flat = flat[flat != 0]
    mu = flat.mean()
    sigma = (flat.pow(2).mean() - mu * mu).clamp_min(1e-30).sqrt()
    q = torch.quantile(flat, 1.0 - kept) if flat.numel() < 16_000_000 else flat.sort().values[
        int((1.0 - kept) * (flat.numel() - 1))]
    return float((q - mu) / sigma)


def surgery_probability(iteration: int, gamma: float, power: float) -> float:
    """σ(i) = (1 + γ·i)^(−power), the probability of a mask update at surgery iteration i (Sec. 3.4)."""
    return (1.0 + gamma * iteration) ** (-power)


def keep_per_output(w: Tensor, mask: Tensor, k: int) -> int:
    """Set ``mask`` (in place) to 1 on the ``k`` largest |w| of every output unit (dim 0: a row, a filter) that
    keeps fewer than ``k``; returns how many units that was. Not in the paper: the floor that stops DNS from
    emptying a layer."""
    if k <= 0:
        return 0
    rows = mask.view(mask.shape[0], -1)  # (out, fan_in), a view: writes reach ``mask``
    k = min(k, rows.shape[1])
    short = rows.sum(1) < k
    n = int(short.sum())
    if n:
        top = w.detach().abs().reshape(w.shape[0], -1)[short].topk(k, dim=1).indices
        rows[short] = rows[short].scatter(1, top, 1.0)
    return n


def _module_attr(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    mod, _, attr = fqn.rpartition(".")
    return model.get_submodule(mod), attr


@dataclass
class _LayerState:
    tensors: list[str]
    kind: str
    c: float
    start: int
    stop: int
    a: float | None = None
    b: float | None = None
    pruned: int = 0          # 1 -> 0 transitions so far
    spliced: int = 0         # 0 -> 1 transitions so far
    updates: int = 0
    floored: int = 0         # output units the min_per_output floor kept alive, summed over updates


class DNS(Callback):
    """Dynamic Network Surgery as a training callback: attach it, then train (see module docstring).

    Args:
        c_rate: the paper's crate c; one number, or per layer type ``{"conv": c, "fc": c}`` and/or per layer
            name ``{"fc1": 4.0}`` (a name wins over a type). Larger c prunes more.
        gamma, power: σ(i) = (1 + γ·i)^(−power). Official defaults 1e-3 and 1.
        iter_start, iter_stop: surgery window per layer type (or one int for all), counted in optimizer
            steps of this callback. Default: the official code's stops, 10,000 (conv) and 8,000 (fc).
        low, high: band factors around max(μ + cσ, 0); 0.9 and 1.1 in the official code.
        include_bias: mask biases too (the released models do).
        min_per_output: keep at least this many weights (the largest |w|) in each output unit at every mask
            update, and log a warning naming the layers where this binds (not in the paper; 0 disables).
        allow_empty_layers: with ``min_per_output=0``, let a layer lose every weight instead of raising.
        seed: seed of the callback's own generator (the update draws); saved with its state.
        log_every: record per-layer kept %, pruned and spliced counts every this many iterations.

    Attributes:
        history_: list of ``{"iteration", "layer", "kept", "pruned", "spliced"}`` records.
    """

    def __init__(self, c_rate: float | Mapping[str, float] = 3.0, *, gamma: float = 1e-3, power: float = 1.0,
                 iter_start: int | Mapping[str, int] = 0,
                 iter_stop: int | Mapping[str, int] | None = None,
                 low: float = 0.9, high: float = 1.1, include_bias: bool = True, min_per_output: int = 1,
                 allow_empty_layers: bool = False, seed: int = 0, log_every: int = 100) -> None:
        owner = "DNS"
        iter_stop = dict(OFFICIAL_ITER_STOP) if iter_stop is None else iter_stop
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
            raise ValueError(f"{owner}: gamma must be a number >= 0; got {gamma!r}.")
        check_positive(owner, "power", power)
        check_positive(owner, "log_every", log_every, integer=True)
        if isinstance(min_per_output, bool) or not isinstance(min_per_output, int) or min_per_output < 0:
            raise ValueError(f"{owner}: min_per_output must be an int >= 0; got {min_per_output!r}.")
        if not 0 < low <= 1 <= high:
            raise ValueError(f"{owner}: need 0 < low <= 1 <= high; got low={low!r}, high={high!r}.")
        for name, v in (("iter_start", iter_start), ("iter_stop", iter_stop)):
            vals = v.values() if isinstance(v, Mapping) else [v]
            if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in vals):
                raise ValueError(f"{owner}: {name} must be a non-negative int or {{type: int}}; got {v!r}.")
        cvals = c_rate.values() if isinstance(c_rate, Mapping) else [c_rate]
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in cvals):
            raise ValueError(f"{owner}: c_rate must be a number or a mapping of numbers; got {c_rate!r}.")
        self.c_rate, self.gamma, self.power = c_rate, gamma, power
        self.iter_start, self.iter_stop = iter_start, iter_stop
        self.low, self.high, self.include_bias, self.seed, self.log_every = low, high, include_bias, seed, log_every
        self.min_per_output, self.allow_empty_layers = min_per_output, allow_empty_layers
        self.layers_: dict[str, _LayerState] = {}
        self.iteration_ = 0
        self.history_: list[dict[str, Any]] = []
        self._gen = torch.Generator().manual_seed(seed)
        self._model: nn.Module | None = None
        self._masks: dict[str, Any] = {}
        self._started = False
        self._warned: set[str] = set()  # layers whose floor binding was already logged

    @classmethod
    def separate_phases(cls, conv_iters: int, fc_iters: int, **kwargs: Any) -> DNS:
        """Surgery on conv layers for ``conv_iters`` steps, then on FC layers for ``fc_iters`` (Sec. 3.4)."""
        return cls(iter_start={"conv": 0, "fc": conv_iters},
                   iter_stop={"conv": conv_iters, "fc": conv_iters + fc_iters}, **kwargs)

    # -- setup ---------------------------------------------------------------------------------------
    def _pick(self, value: Any, name: str, kind: str) -> Any:
        if not isinstance(value, Mapping):
            return value
        if name in value:
            return value[name]
        if kind in value:
            return value[kind]
        raise ValueError(f"DNS: no value for layer {name!r} (type {kind!r}) in {dict(value)!r}.")

    def prepare(self, model: nn.Module, **_: Any) -> None:
        """Attach straight-through masks to every Linear/Conv layer and run the surgery of iteration 0
        (thresholds from the current weights, first masks), as before the first training step. In place.

        Raises:
            ValueError: an unsupported layer type, NaN weights, or a c_rate key naming no layer.
        """
        check_finite_model("DNS", model)
        layers = prunable_layers(model, "DNS")
        if isinstance(self.c_rate, Mapping):
            unknown = set(self.c_rate) - set(layers) - {"conv", "fc"}
            if unknown:
                raise ValueError(f"DNS: c_rate names unknown layer(s) {sorted(unknown)}; layers are {list(layers)}.")
        self.layers_ = {}
        for name, m in layers.items():
            kind = layer_kind(m)
            tensors = [f"{name}.weight"]
            if self.include_bias and getattr(m, "bias", None) is not None:
                tensors.append(f"{name}.bias")
            self.layers_[name] = _LayerState(
                tensors, kind, float(self._pick(self.c_rate, name, kind)),
                int(self._pick(self.iter_start, name, kind)), int(self._pick(self.iter_stop, name, kind)))
        # Mask modules are fixed once attached (a resume copies into their buffers), so look them up once.
        tensors = [t for s in self.layers_.values() for t in s.tensors]
        fresh = [t for t in tensors if not parametrize.is_parametrized(*_module_attr(model, t))]
        self._masks = attach_masks(model, tensors, straight_through=True)
        self._model = model
        self._started = False
        try:
            self._begin()
        except ValueError:  # a layer would lose every weight: leave the model as it came
            for t in fresh:
                parametrize.remove_parametrizations(*_module_attr(model, t), leave_parametrized=False)
            self._masks, self._model = {}, None
            raise

    def on_train_start(self, trainer: Trainer) -> None:
        super().on_train_start(trainer)
        self._begin()

    def _begin(self) -> None:
        if not self._started and self.iteration_ == 0:
            self._surgery()  # iteration 0: thresholds and first masks before the first step
        self._started = True

    def after_step(self, trainer: Trainer | None = None) -> None:
        if self._model is None:
            raise ValueError("DNS: call prepare(model) before training.")
        self.iteration_ += 1
        self._surgery()

    def finalize(self, model: nn.Module | None = None) -> nn.Module:
        """End of surgery: masks become plain (pruned weights get no gradient and stay zero from now on)."""
        return freeze_masks(super().finalize(model))

    # -- the surgery ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _surgery(self) -> None:
        assert self._model is not None
        model, i = self._model, self.iteration_
        masks = self._masks
        updates: list[tuple[_LayerState, str, Tensor]] = []  # every new mask first, so a refusal changes nothing
        floored: list[str] = []
        for name, s in self.layers_.items():
            draw = float(torch.rand(1, generator=self._gen, device="cpu"))  # one draw per layer per iteration, always
            if not s.start <= i < s.stop:
                continue
            if s.a is None:  # thresholds from the weights as they are when this layer's surgery starts
                s.a, s.b = dns_thresholds([original(model, t) for t in s.tensors], s.c, self.low, self.high)
            if surgery_probability(i - s.start, self.gamma, self.power) <= draw:
                continue
            for t in s.tensors:
                w = original(model, t)
                new = dns_update_mask(w, masks[t].mask, s.a, s.b)
                if t == s.tensors[0]:  # the weight: the floor, or the refusal to empty the layer
                    n = keep_per_output(w, new, self.min_per_output)
                    if n:
                        s.floored += n
                        floored.append(name)
                    elif not self.allow_empty_layers and not bool(new.any()):
                        raise ValueError(
                            f"dns: layer {name!r} would lose every weight at iteration {i} (every |w| < "
                            f"a = {s.a:.3g}, c_rate = {s.c:g}); lower its c_rate, set min_per_output >= 1, or "
                            "pass allow_empty_layers=True.")
                updates.append((s, t, new))
        for s in {id(s): s for s, _, _ in updates}.values():
            s.updates += 1
        for s, t, new in updates:
            mask = masks[t].mask
            s.pruned += int(((mask == 1) & (new == 0)).sum())
            s.spliced += int(((mask == 0) & (new == 1)).sum())
            mask.copy_(new)
        fresh = [n for n in floored if n not in self._warned]
        if fresh:
            self._warned.update(fresh)
            log.warning("dns: layer(s) %s would lose every weight of some output units (c_rate too large for "
                        "near-uniform weights?); kept the %d largest |w| of each (min_per_output)",
                        ", ".join(repr(n) for n in fresh), self.min_per_output)
        if i % self.log_every == 0:
            for name, s in self.layers_.items():
                kept = sum(float(masks[t].mask.sum()) for t in s.tensors)
                total = sum(masks[t].mask.numel() for t in s.tensors)
                self.history_.append({"iteration": i, "layer": name, "kept": kept / total,
                                      "pruned": s.pruned, "spliced": s.spliced})

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per layer: c, thresholds, mask updates done, connections pruned and spliced back so far."""
        return {n: {"c": s.c, "a": s.a, "b": s.b, "updates": s.updates, "pruned": s.pruned, "spliced": s.spliced,
                    "floored": s.floored, "window": [s.start, s.stop]} for n, s in self.layers_.items()}

    # -- checkpoint state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration_, "generator": self._gen.get_state(), "history": list(self.history_),
                "layers": {n: {"a": s.a, "b": s.b, "pruned": s.pruned, "spliced": s.spliced, "updates": s.updates,
                               "floored": s.floored} for n, s in self.layers_.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration_ = int(state["iteration"])
        self._gen.set_state(state["generator"])
        self.history_ = list(state["history"])
        for n, v in state["layers"].items():
            if n not in self.layers_:
                raise ValueError(f"DNS: checkpoint has layer {n!r} that this model lacks.")
            s = self.layers_[n]
            s.a, s.b, s.pruned, s.spliced, s.updates = v["a"], v["b"], v["pruned"], v["spliced"], v["updates"]
            s.floored = int(v.get("floored", 0))


@dataclass(frozen=True)
class DNSConfig(TrainConfig):
    """DNS's arguments plus the surgery run's training fields (``seed`` also seeds the update draws)."""

    owner: ClassVar[str] = "dns"
    c_rate: float | dict[str, float] = option(3.0, "crate c: one number, or {conv|fc|layer: c}; larger prunes more")
    gamma: float = option(1e-3, "update probability (1 + gamma*i)^-power", low=0)
    power: float = option(1.0, "update probability power", low=0, low_open=True)
    iter_start: int | dict[str, int] = option(0, "first surgery step: one int or {conv|fc|layer: step}", low=0)
    iter_stop: int | dict[str, int] = option(dict(OFFICIAL_ITER_STOP), "no mask updates from this step on: int or "
                                             "{conv|fc|layer: step} (default: the official code's)", low=0)
    low: float = option(0.9, "a_k = low x max(mu + c sigma, 0)", low=0, low_open=True, high=1)
    high: float = option(1.1, "b_k = high x max(mu + c sigma, 0)", low=1)
    include_bias: bool = option(True, "mask biases too (the released models do)")
    min_per_output: int = option(1, "keep at least this many weights per output unit (warns when it binds; 0: off)",
                                 low=0)
    allow_empty_layers: bool = option(False, "with min_per_output=0, let a layer lose every weight")
    log_every: int = option(100, "history record period in steps", low=1)


def _compare_entry(p: Plan) -> list[dict[str, Any]]:
    """DNS in a comparison: the whole budget, masks frozen for its last eighth (bench/dns_mnist.py)."""
    stop = max(1, round(0.875 * p.steps))
    return [{"dns": {**p.train(), "iter_stop": {"conv": stop, "fc": stop}}}]


@register("dns", family="pruning", compare=_compare_entry, quick={"c_rate": 0.5, "epochs": 1, "iter_stop": 3},
          kind="training", config=DNSConfig, needs_data=True,
          citation="Guo, Yao, Chen 2016, arXiv:1608.04493, Eq. (1)-(3), Sec. 3.2-3.4",
          summary="prune and splice while training: band thresholds, straight-through masks")
def _run_dns(model: nn.Module, cfg: DNSConfig, ctx: StageContext) -> dict[str, Any]:
    keys = ("c_rate", "gamma", "power", "iter_start", "iter_stop", "low", "high", "include_bias", "min_per_output",
            "allow_empty_layers", "log_every")
    surgery = DNS(**{k: getattr(cfg, k) for k in keys}, seed=cfg.seed)
    report = run_training(model, ctx, cfg, surgery)
    return {**report, "surgery": surgery.summary(), "surgery_history": surgery.history_}
