"""Neural networks with few multiplications (Lin, Courbariaux, Memisevic, Bengio 2016, arXiv:1510.03009).

Two parts, each removing multiplications from training:

* **Stochastic binary / ternary weights in the forward pass** (Sec. 2): with the real weights clipped to
  [-W0, W0], *binary connect* samples w_b = +W0 with probability (w/W0 + 1)/2, else −W0; *ternary connect*
  samples w_t = sign(w)·W0 with probability |w|/W0, else 0 (Eq. (2)-(3)). W0 is one scale per layer, half the
  Glorot initialisation bound, sqrt(6 / (fan_in + fan_out)) / 2, as in the authors' code (the paper writes the
  weights as ±1 and 0; the scale keeps activations in range without BatchNorm). Multiplications by weights
  become sign changes (and skips). The gradient at the sampled weights updates the real weights (straight
  through), as in BinaryConnect.
* **Quantized back-propagation** (Sec. 3): in the weight gradient ∂E/∂W = δ xᵀ, each layer input x is
  replaced by a power of two, sign(x)·2^k with k = floor(log2|x|) rounded up with probability
  |x|/2^k − 1 (unbiased stochastic rounding in the exponent, as the authors' code does), so the products
  become bit shifts; the error propagated to the layer below (Wᵀδ) is not quantized. ``max_exponents``
  (ours, optional) keeps only that many exponents below the largest, to bound the shift width.

At test time (eval mode) the weights are the deterministic ternary/binary values (ternary: sign(w)·W0 where
|w| > W0/2, else 0; binary: sign(w)·W0), which is what :meth:`FewMultiplications.finalize` stores: a codebook
{−W0, +W0} with index 0 for zero (2-bit codes), or the 1-bit binary codec with W0 as the layer's scale.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._validation import check_finite_model
from ..forms.binary import BinaryWeights
from ..forms.shared import SharedWeights
from ..masks import prunable_layers
from ..plan import trained
from ..registry import StageContext, option, register
from ..train import Callback, TrainConfig, Trainer, run_training
from .binary import glorot_lr_scale, sign_pm

__all__ = ["pow2_stochastic", "FewMultiplications", "FewMultConfig", "WEIGHT_MODES"]

WEIGHT_MODES = ("ternary", "binary")


def pow2_stochastic(x: Tensor, generator: torch.Generator | None = None, max_exponents: int = 0) -> Tensor:
    """sign(x)·2^k with k = floor(log2|x|) or k + 1, up with probability |x|/2^k − 1 (unbiased); 0 stays 0.
    ``max_exponents`` > 0 keeps the exponents within that many of the largest (smaller values go to zero)."""
    a = x.abs()
    nz = a > 0
    k = torch.floor(torch.log2(torch.where(nz, a, torch.ones_like(a))))
    p_up = a / torch.exp2(k) - 1
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    k = k + (u < p_up).to(k.dtype)
    q = torch.sign(x) * torch.exp2(k)
    if max_exponents > 0 and bool(nz.any()):
        top = float(k[nz].max())
        q = torch.where(k > top - max_exponents, q, torch.zeros_like(q))
    return torch.where(nz, q, torch.zeros_like(q))


def weight_scale(layer: nn.Module) -> float:
    """W0 = sqrt(6 / (fan_in + fan_out)) / 2, the authors' per-layer binary/ternary weight magnitude."""
    w = layer.weight
    receptive = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    return math.sqrt(6.0 / (w.shape[1] * receptive + w.shape[0] * receptive)) / 2


class _StochasticWeights(nn.Module):
    """Training parametrization: sampled ternary/binary weights of magnitude ``w0`` (straight-through);
    deterministic in eval mode."""

    def __init__(self, mode: str, w0: float, generator: torch.Generator) -> None:
        super().__init__()
        self.mode, self.w0, self.generator = mode, w0, generator

    def forward(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            if not self.training:
                q = _deterministic(w, self.mode, self.w0)
            elif self.mode == "ternary":
                u = torch.rand(w.shape, generator=self.generator, dtype=w.dtype, device="cpu").to(w.device)
                q = self.w0 * torch.sign(w) * (u < w.abs() / self.w0).to(w.dtype)
            else:
                u = torch.rand(w.shape, generator=self.generator, dtype=w.dtype, device="cpu").to(w.device)
                q = self.w0 * torch.where(u < ((w / self.w0 + 1) / 2).clamp(0, 1), 1.0, -1.0).to(w.dtype)
        return w + (q - w).detach()  # the value of q, the gradient of w


def _deterministic(w: Tensor, mode: str, w0: float) -> Tensor:
    if mode == "ternary":
        return w0 * torch.sign(w) * (w.abs() > w0 / 2).to(w.dtype)
    return w0 * sign_pm(w)


class _QuantizedBackprop(torch.autograd.Function):
    """y = layer(x, W, b) with ∂E/∂W computed from the power-of-two quantized input (Lin et al. Sec. 3)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, module: nn.Module, qx: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w, qx)
        ctx.module, ctx.has_bias = module, b is not None
        if isinstance(module, nn.Linear):
            return F.linear(x, w, b)
        conv = F.conv2d if isinstance(module, nn.Conv2d) else F.conv1d
        return conv(x, w, b, module.stride, module.padding, module.dilation, module.groups)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, w, qx = ctx.saved_tensors
        m = ctx.module
        if isinstance(m, nn.Linear):
            gx = g @ w
            gw = g.reshape(-1, g.shape[-1]).T @ qx.reshape(-1, qx.shape[-1])
            gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias else None
        else:
            grad = torch.nn.grad
            cin, cw = (grad.conv2d_input, grad.conv2d_weight) if isinstance(m, nn.Conv2d) else \
                (grad.conv1d_input, grad.conv1d_weight)
            gx = cin(x.shape, w, g, m.stride, m.padding, m.dilation, m.groups)
            gw = cw(qx, w.shape, g, m.stride, m.padding, m.dilation, m.groups)
            gb = g.sum([d for d in range(g.dim()) if d != 1]) if ctx.has_bias else None
        return gx, gw, gb, None, None


def _qbp_forward(self: nn.Module, x: Tensor) -> Tensor:
    cb = self._netsurgeon_qbp  # type: ignore[attr-defined]
    if not self.training:
        return type(self).forward(self, x)
    with torch.no_grad():
        qx = pow2_stochastic(x, cb.generator, cb.max_exponents)
    return _QuantizedBackprop.apply(x, self.weight, self.bias, self, qx)


class FewMultiplications(Callback):
    """Train with stochastic ternary/binary weights and (optionally) quantized back-propagation.

    In the user's own loop: ``prepare(model)``, create the optimizer, ``after_backward()`` before each
    ``optimizer.step()``, ``after_step()`` after it, ``finalize()`` at the end.
    """

    def __init__(self, weights: str = "ternary", quantized_backprop: bool = True, *, max_exponents: int = 0,
                 lr_scale: bool = False, seed: int = 0) -> None:
        if weights not in WEIGHT_MODES:
            raise ValueError(f"fewmult: weights must be one of {list(WEIGHT_MODES)}; got {weights!r}.")
        self.weights, self.qbp, self.max_exponents, self.lr_scale = weights, quantized_backprop, max_exponents, lr_scale
        self.generator = torch.Generator().manual_seed(seed)
        self.layers: dict[str, nn.Module] = {}
        self._before: dict[str, Tensor] = {}

    def prepare(self, model: nn.Module, **_: Any) -> None:
        check_finite_model("fewmult", model)
        self._model = model
        for name, m in prunable_layers(model, "fewmult").items():
            if parametrize.is_parametrized(m, "weight"):
                if any(isinstance(p, _StochasticWeights) for p in m.parametrizations["weight"]):
                    self.layers[name] = m
                    continue
                raise ValueError(f"fewmult: layer {name!r} already holds parametrized weights; start from float.")
            w0 = weight_scale(m)
            with torch.no_grad():
                m.weight.clamp_(-w0, w0)
            parametrize.register_parametrization(m, "weight", _StochasticWeights(self.weights, w0, self.generator))
            if self.qbp:
                object.__setattr__(m, "_netsurgeon_qbp", self)
                m.forward = types.MethodType(_qbp_forward, m)
            self.layers[name] = m

    def _real(self, name: str) -> Tensor:
        return self.layers[name].parametrizations["weight"].original

    def after_backward(self, trainer: Trainer | None = None) -> None:
        if self.lr_scale:
            self._before = {n: self._real(n).detach().clone() for n in self.layers}

    @torch.no_grad()
    def after_step(self, trainer: Trainer | None = None) -> None:
        for name, m in self.layers.items():
            w = self._real(name)
            before = self._before.get(name)
            if before is not None:  # the update scaled by the layer's Glorot factor (BinaryConnect's code)
                w.sub_(before).mul_(glorot_lr_scale(m)).add_(before)
            w0 = next(p for p in m.parametrizations["weight"] if isinstance(p, _StochasticWeights)).w0
            w.clamp_(-w0, w0)
        self._before = {}

    def finalize(self, model: nn.Module | None = None) -> nn.Module:
        """Store the deterministic weights: ternary as codebook {−1, +1} + index (0 = zero), binary as 1 bit."""
        out = super().finalize(model)
        for m in prunable_layers(out, "fewmult").values():
            if "forward" in m.__dict__:
                del m.forward
            m.__dict__.pop("_netsurgeon_qbp", None)
            if not parametrize.is_parametrized(m, "weight") or not any(
                    isinstance(p, _StochasticWeights) for p in m.parametrizations["weight"]):
                continue
            real = m.parametrizations["weight"].original.detach().clone()
            w0 = next(p for p in m.parametrizations["weight"] if isinstance(p, _StochasticWeights)).w0
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            q = _deterministic(real, self.weights, w0)
            with torch.no_grad():
                m.weight.copy_(q)
            if self.weights == "ternary":
                index = torch.where(q > 0, 2, torch.where(q < 0, 1, 0)).long()
                par: nn.Module = SharedWeights(torch.tensor([-w0, w0], device=q.device), index)
            else:
                par = BinaryWeights(torch.sign(q).to(torch.int8), torch.tensor(w0, device=q.device))
            parametrize.register_parametrization(m, "weight", par, unsafe=True)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


@dataclass(frozen=True)
class FewMultConfig(TrainConfig):
    owner: ClassVar[str] = "fewmult"
    weights: str = option("ternary", "stochastic weights in the forward pass: ternary or binary connect",
                          choices=WEIGHT_MODES)
    quantized_backprop: bool = option(True, "weight gradients from power-of-two layer inputs (bit shifts)")
    max_exponents: int = option(0, "quantized back-propagation: keep this many exponents below the largest "
                                   "(0: all, as the authors' code)", low=0, high=64)
    lr_scale: bool = option(False, "scale each layer's update by 1/sqrt(1.5/(fan_in+fan_out)) (BinaryConnect's "
                                   "code; Lin et al.'s scales the weights by W0 instead)")
    weight_decay: float = option(0.0, "L2 weight decay", low=0)


def _fewmult_gives(cfg: FewMultConfig) -> str:
    return "shared" if cfg.weights == "ternary" else "binary"


@register("fewmult", family="binary", compare=trained("fewmult"), quick={"epochs": 1},
          kind="training", config=FewMultConfig, needs_data=True, gives=_fewmult_gives,
          citation="Lin, Courbariaux, Memisevic, Bengio 2016 (ICLR), Neural Networks with Few Multiplications, "
                   "arXiv:1510.03009, Sec. 2-3",
          summary="stochastic ternary/binary weights forward, power-of-two quantized back-propagation")
def _run_fewmult(model: nn.Module, cfg: FewMultConfig, ctx: StageContext) -> dict[str, Any]:
    cb = FewMultiplications(cfg.weights, cfg.quantized_backprop, max_exponents=cfg.max_exponents,
                            lr_scale=cfg.lr_scale, seed=cfg.seed)
    return run_training(model, ctx, cfg, cb)
