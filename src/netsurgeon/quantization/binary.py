"""Binary networks: BinaryConnect, BNN and XNOR-Net / BWN as one training-time method with three settings.

Papers (equation numbers of the arXiv versions; ``../shared/papers/binary.md`` in the project notes):

* **BinaryConnect** (Courbariaux, Bengio, David 2015, arXiv:1511.00363, Sec. 2.2-2.4): the forward and backward
  passes use w_b = sign(w) (deterministic, Eq. (1)) or w_b = +1 with probability σ(w) = clip((w+1)/2, 0, 1)
  (stochastic, Eq. (2)-(3), the "hard sigmoid"); the gradient with respect to w_b updates the real w (an
  identity straight-through estimator), and w is clipped to [-1, 1] after every update (Sec. 2.4). The
  per-layer learning-rate scale of the authors' code (the "Glorot" factor s = 1 / sqrt(1.5 / (fan_in +
  fan_out))) multiplies each binary layer's update. At test time deterministic BinaryConnect runs with the
  binary weights and stochastic BinaryConnect with the real weights (Sec. 2.5, and the official code); the
  stored model is always binary (sign of the real weights), and the benchmark reports both errors.
* **BNN** (Hubara, Courbariaux et al. 2016, arXiv:1602.02830, Sec. 1.1-1.3): weights *and* the inputs of every
  binary layer but the first are binarized; the activation's straight-through estimator cancels the gradient
  where |x| > 1 (Eq. (4): g_r = g_q · 1_{|r| <= 1}). The first layer's input stays real.
* **XNOR-Net** (Rastegari et al. 2016, arXiv:1603.05279): Binary-Weight-Networks approximate W ≈ α·sign(W)
  with one α = ‖W‖₁ / n per output filter (Sec. 3.1, Eq. (4)-(6)); their gradient is the paper's
  ∂C/∂W_i = ∂C/∂W̃_i · (1/n + α·1_{|W_i| <= 1}) (Sec. 3.1, "Training Binary-Weights-Networks"). XNOR-Networks
  also binarize the layer input, sign(I), and scale the output by K = A ∗ k, the mean of |I| over channels
  averaged over each filter window (Eq. (11); for a Linear layer β = mean|x| per sample, Eq. (7)-(10)).
  The first and last layers stay real (Sec. 4.1). The paper's block order BN → BinActiv → BinConv → Pool is
  the model's business (``models.lenet5_bn`` follows it).
* **Loss-aware binarization** (Hou, Yao, Kwok 2017, arXiv:1611.01600, Sec. 3, Prop. 3.1 and Algorithm 1):
  a proximal Newton step with the diagonal Hessian approximated by Adam's second moments, D = diag(√v + ε),
  whose closed form is ŵ_l = α_l·sign(w_l) with α_l = ‖d_l ⊙ w_l‖₁ / ‖d_l‖₁, one α per layer (Eq. (8)-(9));
  the gradient at ŵ updates the real w by Adam (straight through), w is clipped to [-1, 1], and v is Adam's
  own second moment of that gradient (as in the authors' code, which keeps it with β₂ = 0.999 and no bias
  correction, exactly torch.optim.Adam's ``exp_avg_sq``). Loss-aware, where BWN's α = mean|w| is not.

One sign rule everywhere, training and the bit kernels alike: sign(x) = +1 for x >= 0, else −1 (torch.sign(0)
is 0, which no binary code can hold).

Where a layer's input is binarized, forward hooks on that layer do it, so parameter names do not change and a
``.nsz`` file records which layers binarize their input (the architecture record's ``binary_inputs``).
The stored form is :class:`BinaryWeights`: one bit per weight plus one scale per output channel (or one).

A binarized input must be able to be negative: sign(ReLU(x)) = +1 everywhere, and a layer fed that way computes
a constant. BNN's activation is HardTanh with sign taken before any non-negative nonlinearity (Hubara et al.
Sec. 1.1-1.2; the authors' code: BN → HardTanh → sign), so a ReLU or ReLU6 *module* whose output reaches only
binarized inputs (through pooling, flatten or dropout) is replaced by ``nn.Hardtanh`` at :meth:`Binarize.prepare`
and the architecture record lists it (``activations: {name: "hardtanh"}``) so a file rebuilds it. Anything else
that leaves a binarized input non-negative (a functional ``F.relu``, a ReLU that also feeds a real layer, a
sigmoid) is refused by name at the first forward pass, before the first training step.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from .._validation import check_finite_model
from ..changes.activations import NONNEGATIVE, apply_activations
from ..changes.binary_inputs import (
    INPUT_MODES,
    apply_binary_inputs,
    binary_inputs_of,
    install_binary_input,
    sign_pm,
)
from ..forms.binary import BinaryWeights
from ..masks import prunable_layers
from ..plan import trained
from ..registry import StageContext, option, register
from ..train import Callback, TrainConfig, Trainer, recalibrate_batchnorm, run_training

log = logging.getLogger(__name__)

__all__ = ["sign_pm", "BinarizeWeights", "BinaryWeights", "Binarize", "install_binary_input",
           "binary_inputs_of", "apply_binary_inputs", "glorot_lr_scale", "BinaryConnectConfig", "BNNConfig",
           "XNORConfig", "LABConfig", "loss_aware_alpha", "INPUT_MODES", "sign_safe_activations",
           "apply_activations"]

_WEIGHT_MODES = ("sign", "stochastic", "alpha", "loss_aware")


class _SignIdentity(torch.autograd.Function):
    """sign(w) forward, identity backward (BinaryConnect / BNN weights; the clip bounds w)."""

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:  # type: ignore[override]
        return sign_pm(w)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        return g


class _StochasticSign(torch.autograd.Function):
    """+1 with probability hard_sigmoid(w) = clip((w + 1) / 2, 0, 1), else −1 (BinaryConnect Eq. (2)-(3));
    identity backward."""

    @staticmethod
    def forward(ctx, w: Tensor, u: Tensor) -> Tensor:  # type: ignore[override]
        p = ((w + 1) / 2).clamp(0, 1)
        return torch.where(u < p, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return g, None


def _alpha(w: Tensor) -> Tensor:
    """XNOR-Net's α = ‖W_c‖₁ / n per output filter c (Eq. (6)), shaped to broadcast against w."""
    return w.abs().flatten(1).mean(1).view(-1, *([1] * (w.dim() - 1)))


class _ScaledSign(torch.autograd.Function):
    """α·sign(W) forward; the paper's gradient ∂C/∂W_i = ∂C/∂W̃_i · (1/n + α·1_{|W_i| <= 1}) backward
    (XNOR-Net Sec. 3.1; autograd through α would instead couple every weight of a filter)."""

    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:  # type: ignore[override]
        a = _alpha(w)
        ctx.save_for_backward(w, a)
        return a * sign_pm(w)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        w, a = ctx.saved_tensors
        n = w[0].numel()
        return g * (1.0 / n + a * (w.abs() <= 1).to(g.dtype))


class _LayerScaledSign(torch.autograd.Function):
    """α·sign(w) forward with a given per-layer α; identity backward (LAB: the gradient at ŵ updates w)."""

    @staticmethod
    def forward(ctx, w: Tensor, a: Tensor) -> Tensor:  # type: ignore[override]
        return a * sign_pm(w)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return g, None


def loss_aware_alpha(w: Tensor, d: Tensor | None) -> Tensor:
    """LAB's α = ‖d ⊙ w‖₁ / ‖d‖₁ (Hou et al. 2017, Eq. (9)); d = None (no curvature yet) gives mean|w|."""
    if d is None:
        return w.detach().abs().mean()
    return (d * w.detach().abs()).sum() / d.sum()


class BinarizeWeights(nn.Module):
    """Training parametrization: the layer computes with binary weights, the real ones learn.

    ``mode``: ``sign`` (BinaryConnect deterministic, BNN), ``stochastic`` (BinaryConnect stochastic: sampled in
    training, the real weights in eval mode, as the paper evaluates), ``alpha`` (XNOR-Net / BWN: α·sign(W)),
    ``loss_aware`` (LAB: α·sign(W) with α weighted by the curvature ``d``, set after each step).
    """

    def __init__(self, mode: str, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if mode not in _WEIGHT_MODES:
            raise ValueError(f"BinarizeWeights: mode must be one of {_WEIGHT_MODES}; got {mode!r}.")
        self.mode, self.generator = mode, generator
        self.curvature: Tensor | None = None  # loss_aware: √v + ε of the real weights (Adam's second moments)

    def forward(self, w: Tensor) -> Tensor:
        if self.mode == "alpha":
            return _ScaledSign.apply(w)
        if self.mode == "loss_aware":
            return _LayerScaledSign.apply(w, loss_aware_alpha(w, self.curvature))
        if self.mode == "stochastic":
            if not self.training:
                return w
            u = torch.rand(w.shape, generator=self.generator, dtype=w.dtype, device=w.device)
            return _StochasticSign.apply(w, u)
        return _SignIdentity.apply(w)


# ops between an activation and a binarized input that keep it a per-element function of the activation's output
_PATH_MODULES = (nn.Flatten, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_PATH_FUNCTIONS = {torch.flatten, F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}
_PATH_METHODS = {"flatten", "view", "reshape", "contiguous"}
_SHAPE_METHODS = {"size", "dim"}  # read only the shape: x.view(x.size(0), -1)


class _LayerTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)) or \
            super().is_leaf_module(m, qualname)


def sign_safe_activations(model: nn.Module, layers: set[str]) -> dict[str, str]:
    """Replace, in place, every ReLU/ReLU6 module whose output reaches only the inputs of ``layers`` (through
    pooling, flatten, reshape or dropout) by ``nn.Hardtanh``, BNN's activation: sign(ReLU(x)) is +1 everywhere,
    sign(HardTanh(x)) = sign(x). A module called more than once, or whose output also reaches anything else, is
    left alone (:class:`Binarize` then refuses the layer at the first forward pass). Returns ``{module name:
    "hardtanh"}``, the record that rebuilds the change (:func:`apply_activations`); ``{}`` when torch.fx cannot
    trace the model."""
    try:
        graph = _LayerTracer().trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model keeps its modules; the first-batch check still runs
        return {}
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")

    def on_path(u: fx.Node, n: fx.Node) -> bool:
        if not u.args or u.args[0] is not n:
            return False
        if u.op == "call_module":
            return isinstance(model.get_submodule(str(u.target)), _PATH_MODULES)
        return (u.op == "call_function" and u.target in _PATH_FUNCTIONS) or \
            (u.op == "call_method" and u.target in _PATH_METHODS)

    def readers(n: fx.Node) -> list[fx.Node]:
        out = []
        for u in n.users:
            if u.op == "call_method" and u.target in _SHAPE_METHODS:
                continue
            out += readers(u) if on_path(u, n) else [u]
        return out

    replaced = {}
    for n in graph.nodes:
        if n.op != "call_module" or calls[str(n.target)] != 1:
            continue
        if not isinstance(model.get_submodule(str(n.target)), NONNEGATIVE):
            continue
        ends = readers(n)
        if ends and all(u.op == "call_module" and str(u.target) in layers for u in ends):
            model.set_submodule(str(n.target), nn.Hardtanh())
            replaced[str(n.target)] = "hardtanh"
    return replaced


def _batchnorm_follows(model: nn.Module, name: str) -> bool:
    """Whether layer ``name``'s output goes only to a BatchNorm module (False when torch.fx cannot tell)."""
    try:
        graph = _LayerTracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable: assume not
        return False
    for n in graph.nodes:
        if n.op == "call_module" and str(n.target) == name:
            users = list(n.users)
            return len(users) == 1 and users[0].op == "call_module" and isinstance(
                model.get_submodule(str(users[0].target)), (nn.BatchNorm1d, nn.BatchNorm2d))
    return False


class _FirstInputCheck:
    """A one-time forward pre-hook (run before the binarizer's): a binarized input with no negative entry gives
    sign = +1 everywhere, a constant layer; refuse it, naming the layer."""

    def __init__(self, layer: nn.Module, name: str, method: str) -> None:
        self.name, self.method = name, method
        self.handle = layer.register_forward_pre_hook(self, prepend=True)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.handle.remove()
        x = args[0]
        if isinstance(x, Tensor) and x.numel() > 1 and not bool((x < 0).any()):
            raise ValueError(
                f"{self.method}: layer {self.name!r} binarizes its input, which has no negative value (it follows "
                "a non-negative activation this method cannot replace, e.g. a functional relu): sign() would be +1 "
                "everywhere and the layer constant; use a ReLU module there (it becomes HardTanh, BNN's "
                "activation) or HardTanh, or keep the layer real (keep_first/keep_last).")


def glorot_lr_scale(layer: nn.Module) -> float:
    """BinaryConnect's per-layer update scale 1 / sqrt(1.5 / (fan_in + fan_out)) (the authors' code; for a
    convolution both fans include the kernel size)."""
    w = layer.weight
    receptive = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    return 1.0 / math.sqrt(1.5 / (w.shape[1] * receptive + w.shape[0] * receptive))


class Binarize(Callback):
    """Binary training as a callback (BinaryConnect, BNN, XNOR-Net / BWN; see the module docstring).

    Args:
        weights: ``sign``, ``stochastic`` or ``alpha`` (see :class:`BinarizeWeights`).
        inputs: None (weights only), ``sign`` (BNN) or ``scaled`` (XNOR-Net): binarize the input of every binary
            layer except the first (whose input is the data).
        keep_first, keep_last: leave the first / last Linear-or-conv layer (in module order) real. ``keep_last=None``
            (the default): real when the weights are unscaled ±1 (``sign``, ``stochastic``) and no BatchNorm follows
            the last layer (the papers' nets have one: an unnormalized ±1 output layer cannot scale its logits, and
            training collapses) and another layer is binarized, logged as a warning; binary otherwise.
        lr_scale: multiply each binary layer's update by :func:`glorot_lr_scale` (BinaryConnect, BNN).
        clip: clip the real weights to [-1, 1] after every update.
        seed: seed of the stochastic binarization draws (saved in checkpoints).
        recalibrate_bn: at :meth:`finalize`, re-estimate BatchNorm statistics with the stored binary weights on
            training batches (the running averages were taken with moving, or sampled, weights; BinaryConnect's
            code re-estimates them too). Needs ``train_data`` at :meth:`prepare` (``ns.train`` passes it).

    In the user's own loop: ``prepare(model)``, create the optimizer, then per step ``after_backward()``
    before ``optimizer.step()`` and ``after_step()`` after it; ``finalize()`` leaves :class:`BinaryWeights`.
    """

    def __init__(self, weights: str = "sign", inputs: str | None = None, *, keep_first: bool = False,
                 keep_last: bool | None = None, lr_scale: bool = True, clip: bool = True, seed: int = 0,
                 recalibrate_bn: bool = True) -> None:
        if weights not in _WEIGHT_MODES:
            raise ValueError(f"Binarize: weights must be one of {_WEIGHT_MODES}; got {weights!r}.")
        if inputs is not None and inputs not in INPUT_MODES:
            raise ValueError(f"Binarize: inputs must be None or one of {INPUT_MODES}; got {inputs!r}.")
        self.weights, self.inputs = weights, inputs
        self.keep_first, self.keep_last, self.lr_scale, self.clip = keep_first, keep_last, lr_scale, clip
        self.recalibrate_bn, self._train_data, self._optimizer = recalibrate_bn, None, None
        self.generator = torch.Generator().manual_seed(seed)
        self.layers: dict[str, nn.Module] = {}
        self.scales: dict[str, float] = {}
        self._before: dict[str, Tensor] = {}
        self._checks: list[_FirstInputCheck] = []

    def prepare(self, model: nn.Module, *, train_data: Any = None,
                optimizer: torch.optim.Optimizer | None = None, **_: Any) -> None:
        check_finite_model("binary", model)
        self._train_data, self._optimizer = train_data, optimizer
        layers = prunable_layers(model, "binary")
        names = list(layers)
        keep_last = self._keep_last(model, names[-1]) if len(names) > (2 if self.keep_first else 1) else bool(
            self.keep_last)  # the only layer left is binarized unless asked otherwise
        chosen = names[1 if self.keep_first else 0:len(names) - 1 if keep_last else len(names)]
        if not chosen:
            raise ValueError(f"binary: no layer left to binarize (the model has {len(names)} layer(s) and "
                             f"keep_first={self.keep_first}, keep_last={keep_last}).")
        binarized = [n for n in chosen if n != names[0]] if self.inputs is not None else []  # the data stays real
        if binarized:  # sign(ReLU(x)) = +1: a ReLU feeding a binarized input becomes HardTanh (BNN's activation)
            replaced = sign_safe_activations(model, set(binarized))
            if replaced:
                from ..changes.activations import record_activations

                record_activations(model, replaced)
                log.info("binary: %s fed binarized inputs; replaced by HardTanh", ", ".join(replaced))
        for name in chosen:
            m = layers[name]
            if parametrize.is_parametrized(m, "weight"):
                kinds = [type(p).__name__ for p in m.parametrizations["weight"]]
                if any(k in ("BinarizeWeights", "BinaryWeights") for k in kinds):
                    continue  # resumed or prepared twice
                raise ValueError(f"binary: layer {name!r} already holds {', '.join(kinds)} weights; binarize a "
                                 "float model (sign(0) = +1 would undo pruning).")
            with torch.no_grad():
                if self.clip:
                    m.weight.clamp_(-1, 1)
            parametrize.register_parametrization(m, "weight", BinarizeWeights(self.weights, self.generator))
            self.layers[name] = m
            self.scales[name] = glorot_lr_scale(m) if self.lr_scale else 1.0
        for name in binarized:
            install_binary_input(layers[name], self.inputs)  # type: ignore[arg-type]
            self._checks.append(_FirstInputCheck(layers[name], name, "binary"))
        self._model = model

    def _keep_last(self, model: nn.Module, last: str) -> bool:
        if self.keep_last is not None:
            return self.keep_last
        if self.weights not in ("sign", "stochastic") or _batchnorm_follows(model, last):
            return False
        log.warning("binary: the last layer %r stays real: with ±1 weights and no BatchNorm after it its outputs "
                    "cannot be scaled (BinaryConnect's and BNN's nets end with one); keep_last=False binarizes it "
                    "anyway", last)
        return True

    def _real(self, name: str) -> Tensor:
        return self.layers[name].parametrizations["weight"].original

    def _binarizer(self, name: str) -> BinarizeWeights:
        return next(p for p in self.layers[name].parametrizations["weight"] if isinstance(p, BinarizeWeights))

    def after_backward(self, trainer: Trainer | None = None) -> None:
        if self.lr_scale:
            self._before = {n: self._real(n).detach().clone() for n in self.layers if self.scales[n] != 1.0}

    @torch.no_grad()
    def after_step(self, trainer: Trainer | None = None) -> None:
        for name in self.layers:
            w = self._real(name)
            before = self._before.get(name)
            if before is not None:  # w <- w_before + s·(w - w_before): the update scaled by s
                w.sub_(before).mul_(self.scales[name]).add_(before)
            if self.clip:
                w.clamp_(-1, 1)
            if self.weights == "loss_aware":
                self._binarizer(name).curvature = self._curvature(w, trainer)
        self._before = {}

    def _curvature(self, w: Tensor, trainer: Trainer | None) -> Tensor:
        """LAB's d = √v + 1e-8 from Adam's second moment of ``w`` (the authors' ε)."""
        opt = trainer.optimizer if trainer is not None else self._optimizer
        state = opt.state.get(w, {}) if opt is not None else {}
        if "exp_avg_sq" not in state:
            raise ValueError("lab: needs Adam's second moments (optimizer='adam'): the diagonal Hessian "
                             f"approximation is sqrt(v); got {type(opt).__name__ if opt else 'no optimizer'}.")
        return state["exp_avg_sq"].detach().sqrt() + 1e-8

    def finalize(self, model: nn.Module | None = None) -> nn.Module:
        """Replace the training parametrizations by :class:`BinaryWeights` (sign of the real weights, scale 1,
        or α per output filter for ``alpha``) and record the binary inputs on the model."""
        out = super().finalize(model)
        for check in self._checks:  # a check that never saw a forward pass must not fire at inference
            check.handle.remove()
        self._checks = []
        from ..changes.binary_inputs import record_binary_inputs

        for m in prunable_layers(out, "binary").values():
            if not parametrize.is_parametrized(m, "weight"):
                continue
            if not any(isinstance(p, BinarizeWeights) for p in m.parametrizations["weight"]):
                continue
            real = m.parametrizations["weight"].original.detach()
            if self.weights == "loss_aware":
                b = next(p for p in m.parametrizations["weight"] if isinstance(p, BinarizeWeights))
                scale = loss_aware_alpha(real, b.curvature).reshape(())
            else:
                scale = _alpha(real).flatten() if self.weights == "alpha" else torch.ones((), device=real.device)
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            signs = sign_pm(real).to(torch.int8)
            with torch.no_grad():
                m.weight.copy_(real)
            parametrize.register_parametrization(m, "weight", BinaryWeights(signs, scale), unsafe=True)
        inputs = binary_inputs_of(out)
        if inputs:
            record_binary_inputs(out, inputs)
        if self.recalibrate_bn and self._train_data is not None:
            recalibrate_batchnorm(out, self._train_data)
        return out

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"generator": self.generator.get_state()}
        if self.weights == "loss_aware":  # resume exactly: α needs the curvature of the last step
            out["curvature"] = {n: self._binarizer(n).curvature for n in self.layers}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        for n, d in state.get("curvature", {}).items():
            if n in self.layers:
                self._binarizer(n).curvature = d


# -- registered methods ----------------------------------------------------------------------------------
_BC = "Courbariaux, Bengio, David 2015, BinaryConnect, arXiv:1511.00363, Sec. 2 (Eq. (1)-(3))"
_BNN = "Hubara, Courbariaux, Soudry, El-Yaniv, Bengio 2016, Binarized Neural Networks, arXiv:1602.02830, Sec. 1"
_XNOR = "Rastegari, Ordonez, Redmon, Farhadi 2016, XNOR-Net, arXiv:1603.05279, Sec. 3 (Eq. (1)-(11))"
_LAB = "Hou, Yao, Kwok 2017 (ICLR), Loss-aware Binarization of Deep Networks, arXiv:1611.01600, Prop. 3.1, Eq. (8)-(9)"


@dataclass(frozen=True)
class _BinaryTrain(TrainConfig):
    owner: ClassVar[str] = "binary"
    optimizer: str = option("adam", "sgd (with momentum) or adam", choices=("sgd", "adam"))
    lr: float = option(1e-3, "learning rate", low=0, low_open=True)
    weight_decay: float = option(0.0, "L2 weight decay (the papers use none on binary weights)", low=0)
    keep_first: bool = option(False, "leave the first Linear/conv layer real")
    keep_last: bool | None = option(None, "leave the last Linear/conv layer real (default: real for unscaled ±1 "
                                          "weights when no BatchNorm follows it, else binary)")
    lr_scale: bool = option(True, "scale each binary layer's update by 1/sqrt(1.5/(fan_in+fan_out)) (the "
                                  "authors' code)")


@dataclass(frozen=True)
class BinaryConnectConfig(_BinaryTrain):
    owner: ClassVar[str] = "binaryconnect"
    stochastic: bool = option(False, "stochastic binarization (hard sigmoid) instead of sign")


@dataclass(frozen=True)
class BNNConfig(_BinaryTrain):
    owner: ClassVar[str] = "bnn"


@dataclass(frozen=True)
class XNORConfig(_BinaryTrain):
    owner: ClassVar[str] = "xnor"
    keep_first: bool = option(True, "leave the first Linear/conv layer real (the paper does)")
    keep_last: bool = option(True, "leave the last Linear/conv layer real (the paper does)")
    lr_scale: bool = option(False, "scale each binary layer's update by 1/sqrt(1.5/(fan_in+fan_out))")
    binarize_inputs: bool = option(True, "XNOR-Network (binary inputs too); false: Binary-Weight-Network")
    input_scale: bool = option(True, "scale binary-input outputs by K / β (Eq. (11)); the official code drops it")


@dataclass(frozen=True)
class LABConfig(_BinaryTrain):
    owner: ClassVar[str] = "lab"
    optimizer: str = option("adam", "adam only: its second moments are LAB's diagonal Hessian", choices=("adam",))
    lr_scale: bool = option(False, "scale each binary layer's update by 1/sqrt(1.5/(fan_in+fan_out)) (the LAB "
                                   "code does not)")


@register("binaryconnect", family="binary", compare=trained("binaryconnect"), quick={"epochs": 1},
          kind="training", config=BinaryConnectConfig, gives="binary", needs_data=True,
          citation=_BC, summary="train with ±1 weights (deterministic or stochastic), real weights clipped to [-1, 1]")
def _run_bc(model: nn.Module, cfg: BinaryConnectConfig, ctx: StageContext) -> dict[str, Any]:
    cb = Binarize("stochastic" if cfg.stochastic else "sign", None, keep_first=cfg.keep_first,
                  keep_last=cfg.keep_last, lr_scale=cfg.lr_scale, seed=cfg.seed)
    return {**run_training(model, ctx, cfg, cb), "binary_layers": list(cb.layers)}


@register("bnn", family="binary", compare=trained("bnn"), quick={"epochs": 1},
          kind="training", config=BNNConfig, gives="binary", needs_data=True, citation=_BNN,
          summary="binary weights and binary layer inputs (sign, straight-through with |x| <= 1)")
def _run_bnn(model: nn.Module, cfg: BNNConfig, ctx: StageContext) -> dict[str, Any]:
    cb = Binarize("sign", "sign", keep_first=cfg.keep_first, keep_last=cfg.keep_last, lr_scale=cfg.lr_scale,
                  seed=cfg.seed)
    return {**run_training(model, ctx, cfg, cb), "binary_layers": list(cb.layers)}


@register("xnor", family="binary", compare=trained("xnor"), quick={"epochs": 1},
          kind="training", config=XNORConfig, gives="binary", needs_data=True, citation=_XNOR,
          summary="XNOR-Net: α·sign(W) per filter, binary inputs scaled by K (binarize_inputs=false: BWN)")
def _run_xnor(model: nn.Module, cfg: XNORConfig, ctx: StageContext) -> dict[str, Any]:
    inputs = ("scaled" if cfg.input_scale else "sign") if cfg.binarize_inputs else None
    cb = Binarize("alpha", inputs, keep_first=cfg.keep_first, keep_last=cfg.keep_last, lr_scale=cfg.lr_scale,
                  seed=cfg.seed)
    return {**run_training(model, ctx, cfg, cb), "binary_layers": list(cb.layers)}


@register("lab", family="binary", compare=trained("lab"), quick={"epochs": 1},
          kind="training", config=LABConfig, gives="binary", needs_data=True, citation=_LAB,
          summary="loss-aware binarization: alpha·sign(W) per layer, alpha weighted by Adam's second moments")
def _run_lab(model: nn.Module, cfg: LABConfig, ctx: StageContext) -> dict[str, Any]:
    cb = Binarize("loss_aware", None, keep_first=cfg.keep_first, keep_last=cfg.keep_last, lr_scale=cfg.lr_scale,
                  seed=cfg.seed)
    return {**run_training(model, ctx, cfg, cb), "binary_layers": list(cb.layers)}
