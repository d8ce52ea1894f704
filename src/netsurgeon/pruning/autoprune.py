"""AutoPrune (Xiao, Wang, Rajasekaran, NeurIPS 2019, "AutoPrune: Automatic Network Pruning by Regularizing
Auxiliary Parameters"). No public code exists and the paper's equations could not be read for this
implementation: every choice below is an interpretation of the abstract and the reviews, documented with its
reasoning in docs/autoprune.md, and each rule is a switch so its contribution can be measured.

* Each prunable weight w_ij has an auxiliary parameter m_ij; the network uses T = W ⊙ h(M) with the step
  indicator h(m) = 1[m > 0]. The weights are never regularized; the sparsity regularizer μ·R(M) acts on M.
* h has no useful derivative: the backward pass uses a surrogate h'(m) (straight-through estimator):
  identity (1), leaky ReLU (1 for m > 0, α else) or softplus' (sigmoid(m/τ)). A surrogate that is nonzero
  for m ≤ 0 keeps pruning recoverable: a pruned weight keeps its value and its m keeps moving.
* Bi-level optimization: W minimizes the training loss (the trainer's optimizer, training batches); M
  minimizes the validation loss + μ·R(M) with its own optimizer on validation batches, alternating.
* Update rules for M, each switchable (our reading of the paper's three "consistency" rules):
  - ``sensitivity``: the update of m_ij scales with |w_ij| relative to its layer's mean |w|, so layers with
    small weights are not frozen and important weights move their m more;
  - ``direction``: the sign of the m update follows the direction in which |w_ij| would move (sgn(w)
    instead of w in the chain rule). With ``sensitivity`` on it adds nothing: sgn(w)·|w|/mean|w| is
    w/mean|w|, so the rules are two, not three, unless sensitivity is off (measured: the ablation's
    "no direction" row equals the default);
  - ``correlation``: W gets the straight-through gradient dL/dT for every entry, so a pruned weight keeps
    learning and its m sees the weight's current importance (as DNS does for W).
  With all three off, dL/dm is the plain chain rule dL/dT · w · h'(m).
* No hand-set threshold: which weights are pruned is whatever sign M settles at.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import distributed as ddp
from .._validation import check_finite_model, check_positive
from ..data import Split, batches
from ..masks import Mask, sites_of
from ..plan import trained
from ..registry import StageContext, option, register
from ..train import Callback, TrainConfig, Trainer, run_training

__all__ = ["STE_KINDS", "ste_derivative", "AuxGate", "AutoPrune", "AutoPruneConfig"]

log = logging.getLogger(__name__)
STE_KINDS = ("identity", "leaky_relu", "softplus")


def ste_derivative(m: Tensor, kind: str, alpha: float = 0.1, tau: float = 1.0) -> Tensor:
    """The surrogate h'(m) used in the backward pass of the step indicator h(m) = 1[m > 0]."""
    if kind == "identity":
        return torch.ones_like(m)
    if kind == "leaky_relu":
        return torch.where(m > 0, torch.ones_like(m), torch.full_like(m, alpha))
    if kind == "softplus":
        return torch.sigmoid(m / tau)
    raise ValueError(f"ste_derivative: kind must be one of {STE_KINDS}; got {kind!r}.")


class _Gate(torch.autograd.Function):
    """T = W ⊙ h(M) with custom gradients (see module docstring)."""

    @staticmethod
    def forward(ctx, w: Tensor, m: Tensor, gate: AuxGate) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(w, m)
        ctx.gate = gate
        return w * (m > 0).to(w.dtype)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        w, m = ctx.saved_tensors
        gate: AuxGate = ctx.gate
        gw = g if gate.correlation else g * (m > 0).to(g.dtype)
        if gate.direction:
            phi = torch.sign(w)
            if gate.sensitivity:
                phi = w / w.abs().mean().clamp_min(1e-12)
        else:
            phi = w / w.abs().mean().clamp_min(1e-12) if gate.sensitivity else w
        gm = g * phi * ste_derivative(m, gate.ste, gate.alpha, gate.tau)
        return gw, gm, None


class AuxGate(nn.Module):
    """Parametrization ``W -> W ⊙ h(M)``; ``m`` is a buffer that requires grad (so the trainer's optimizer,
    which takes ``model.parameters()``, never updates it) and travels with ``state_dict``."""

    def __init__(self, m: Tensor, ste: str = "leaky_relu", alpha: float = 0.1, tau: float = 1.0,
                 sensitivity: bool = True, correlation: bool = True, direction: bool = True) -> None:
        super().__init__()
        self.register_buffer("m", m.clone().requires_grad_(True))
        self.ste, self.alpha, self.tau = ste, alpha, tau
        self.sensitivity, self.correlation, self.direction = sensitivity, correlation, direction

    def forward(self, w: Tensor) -> Tensor:
        return _Gate.apply(w, self.m, self)


class AutoPrune(Callback):
    """AutoPrune as a training callback (bi-level: W on training batches, M on validation batches).

    Args:
        mu: strength of R(M) = Σ h(m) / N, the network's kept fraction (via the surrogate gradient).
        ste: "identity", "leaky_relu" (default, the paper's recommendation) or "softplus".
        alpha: leaky slope; tau: softplus temperature.
        m_lr: learning rate of M's optimizer (Adam). m_init: initial value of every m (> 0: start dense).
        m_every: update M after every ``m_every`` weight steps; val_batch: validation batch size.
        sensitivity, correlation, direction: the three update rules (see module docstring).
        stop: no more M updates after this many weight steps (None: never stop), so the last part of
            training fine-tunes a fixed sparse network.
        seed: seed of the validation-batch sampler (saved with the state).

    Attributes:
        history_: per ``log_every`` steps, the kept fraction of every layer.
    """

    def __init__(self, mu: float = 1.0, *, ste: str = "leaky_relu", alpha: float = 0.1, tau: float = 1.0,
                 m_lr: float = 1e-2, m_init: float = 0.05, m_every: int = 1, val_batch: int = 128,
                 sensitivity: bool = True, correlation: bool = True, direction: bool = True,
                 stop: int | None = None, seed: int = 0, log_every: int = 100) -> None:
        owner = "AutoPrune"
        if ste not in STE_KINDS:
            raise ValueError(f"{owner}: ste must be one of {STE_KINDS}; got {ste!r}.")
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or mu < 0:
            raise ValueError(f"{owner}: mu must be a number >= 0; got {mu!r}.")
        check_positive(owner, "m_lr", m_lr)
        check_positive(owner, "m_init", m_init)
        check_positive(owner, "m_every", m_every, integer=True)
        check_positive(owner, "val_batch", val_batch, integer=True)
        self.mu, self.ste, self.alpha, self.tau = float(mu), ste, alpha, tau
        self.m_lr, self.m_init, self.m_every, self.val_batch = m_lr, m_init, m_every, val_batch
        self.rules = {"sensitivity": sensitivity, "correlation": correlation, "direction": direction}
        self.stop, self.seed, self.log_every = stop, seed, log_every
        self.history_: list[dict[str, Any]] = []
        self._gen = torch.Generator().manual_seed(seed)
        self._gates: dict[str, AuxGate] = {}
        self._where: dict[str, tuple[str, str]] = {}
        self._opt: torch.optim.Optimizer | None = None
        self._model: nn.Module | None = None
        self._val: Any = None
        self._split_val = True
        self._val_iter: Iterator[tuple[Tensor, Tensor]] | None = None
        self.step_ = 0

    def prepare(self, model: nn.Module, *, val_data: Any = None, **_: Any) -> None:
        """Attach an :class:`AuxGate` to every Linear/Conv weight. Modifies ``model`` in place.

        ``val_data`` (a Split or any iterable of ``(x, y)`` batches, e.g. a DataLoader) trains M.
        """
        check_finite_model("AutoPrune", model)
        layers = sites_of(model, "AutoPrune")
        if val_data is None or (isinstance(val_data, Split) and len(val_data) == 0):
            raise ValueError("AutoPrune: needs a validation split (bi-level optimization); pass val_data.")
        self._val, self._val_iter = val_data, None
        self._split_val = not ddp.rank_local(val_data)  # a DistributedSampler loader: each rank its own batch
        self._gates, self._where = {}, {}
        for site, mod in layers:
            w = getattr(mod, site.attr).detach()
            if parametrize.is_parametrized(mod, site.attr):
                parametrize.remove_parametrizations(mod, site.attr, leave_parametrized=True)
            m0 = torch.where(w != 0, torch.full_like(w, self.m_init), torch.full_like(w, -self.m_init))
            gate = AuxGate(m0, self.ste, self.alpha, self.tau, **self.rules)
            parametrize.register_parametrization(mod, site.attr, gate, unsafe=True)
            key = site.module if site.attr == "weight" else site.fqn
            self._gates[key] = gate
            self._where[key] = (site.module, site.attr)
        self._opt = torch.optim.Adam([g.m for g in self._gates.values()], lr=self.m_lr)
        self._model = model

    def regularizer(self) -> Tensor:
        """R(M) = Σ h(m) / N over all N prunable weights (the kept fraction), differentiated through h'.

        One normalization for the whole network, so every weight feels the same pressure; a per-layer mean
        over-prunes small layers (measured: LeNet-300-100's fc3 fell to 0.7% first).
        """
        total, count = torch.zeros((), device=next((g.m.device for g in self._gates.values()), "cpu")), 0
        for g in self._gates.values():
            hard = (g.m > 0).float()
            soft = ste_derivative(g.m.detach(), g.ste, g.alpha, g.tau) * g.m
            total = total + (hard + soft - soft.detach()).sum()
            count += g.m.numel()
        return total / count

    def kept(self) -> dict[str, float]:
        return {n: float((g.m > 0).float().mean()) for n, g in self._gates.items()}

    def on_train_start(self, trainer: Trainer) -> None:
        super().on_train_start(trainer)
        if not self.history_:
            self.history_.append({"step": self.step_, "kept": self.kept()})

    def _val_batch(self) -> tuple[Tensor, Tensor]:
        if isinstance(self._val, Split):
            idx = torch.randint(len(self._val), (self.val_batch,), generator=self._gen, device="cpu")
            return self._val.x[idx], self._val.y[idx]
        for _ in range(2):  # a loader is cycled through
            if self._val_iter is None:
                self._val_iter = batches(self._val)
            try:
                return next(self._val_iter)
            except StopIteration:
                self._val_iter = None
        raise ValueError("AutoPrune: the validation loader yielded no batch.")

    def after_step(self, trainer: Trainer | None = None) -> None:
        if self._opt is None or self._model is None:
            raise ValueError("AutoPrune: call prepare(model, val_data=...) before training.")
        self.step_ += 1
        step = self.step_
        model = self._model
        if step % self.log_every == 0:
            self.history_.append({"step": step, "kept": self.kept()})
        for g in self._gates.values():
            g.m.grad = None  # the W step also produced dL_train/dm: M follows the validation loss only
        if (self.stop is not None and step > self.stop) or step % self.m_every:
            return
        xv, yv = self._val_batch()
        if self._split_val:  # under torchrun: this rank's rows of the batch; the gradients are summed below
            xv, yv = ddp.shard_rows(xv, yv)
        was = model.training
        model.train()
        loss = self.mu * self.regularizer()
        if len(yv):
            loss = loss + F.cross_entropy(model(xv), yv)
        params = [g.m for g in self._gates.values()]
        grads = torch.autograd.grad(loss, params)
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr
        ddp.sum_weighted_grads(params, len(yv))  # the validation gradient of the whole batch, on every rank
        self._opt.step()
        for p in params:
            p.grad = None
        model.train(was)

    def state_dict(self) -> dict[str, Any]:
        assert self._opt is not None
        return {"generator": self._gen.get_state(), "optimizer": self._opt.state_dict(),
                "history": list(self.history_), "step": self.step_}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self._opt is not None
        self._gen.set_state(state["generator"])
        self._opt.load_state_dict(state["optimizer"])
        self.history_ = list(state["history"])
        self.step_ = int(state.get("step", 0))

    @torch.no_grad()
    def finalize(self, model: nn.Module | None = None) -> nn.Module:
        """Replace each gate by a plain mask 1[m > 0] over W ⊙ h(M): pruned weights stay zero in any later
        training. Modifies ``model`` in place."""
        model = super().finalize(model)
        for name, gate in list(self._gates.items()):
            module_name, attr = self._where[name]
            mod = model.get_submodule(module_name)
            keep = (gate.m > 0).to(getattr(mod, attr).dtype)
            parametrize.remove_parametrizations(mod, attr, leave_parametrized=True)
            parametrize.register_parametrization(mod, attr, Mask(keep.detach().clone()), unsafe=True)
        self._gates = {}
        return model


@dataclass(frozen=True)
class AutoPruneConfig(TrainConfig):
    """AutoPrune's arguments plus the training fields of the run (``seed`` also seeds validation batches)."""

    owner: ClassVar[str] = "autoprune"
    mu: float = option(1.0, "strength of R(M), the network's kept fraction", low=0)
    ste: str = option("leaky_relu", "surrogate derivative of the step indicator", choices=STE_KINDS)
    alpha: float = option(0.1, "leaky slope of the leaky_relu STE", low=0)
    tau: float = option(1.0, "softplus STE temperature", low=0, low_open=True)
    m_lr: float = option(1e-2, "Adam learning rate of the auxiliary parameters M", low=0, low_open=True)
    m_init: float = option(0.05, "initial |m| (sign: kept or already pruned)", low=0, low_open=True)
    m_every: int = option(1, "update M after every this many weight steps", low=1)
    val_batch: int = option(128, "validation batch size for M's updates", low=1)
    sensitivity: bool = option(True, "update rule: scale m's update by |w| / mean|w| of its layer")
    correlation: bool = option(True, "update rule: straight-through gradient to pruned weights")
    direction: bool = option(True, "update rule: m follows sgn(w) (only without sensitivity)")
    stop: int | None = option(None, "no M updates after this many steps (null: never stop)", low=0)
    log_every: int = option(100, "history record period in steps", low=1)


@register("autoprune", family="pruning", compare=trained("autoprune"),
          quick={"mu": 5.0, "epochs": 1, "val_batch": 16},
          kind="training", config=AutoPruneConfig, needs_data=True,
          citation="Xiao, Wang, Rajasekaran 2019, NeurIPS (interpretation: docs/autoprune.md)",
          summary="prune by regularizing auxiliary gate parameters trained on the validation split")
def _run_autoprune(model: nn.Module, cfg: AutoPruneConfig, ctx: StageContext) -> dict[str, Any]:
    keys = ("mu", "ste", "alpha", "tau", "m_lr", "m_init", "m_every", "val_batch", "sensitivity", "correlation",
            "direction", "stop", "log_every")
    ap = AutoPrune(**{k: getattr(cfg, k) for k in keys}, seed=cfg.seed)
    report = run_training(model, ctx, cfg, ap)
    return {**report, "kept_per_layer": {k: v for k, v in ap.history_[-1]["kept"].items()},
            "pruning_history": ap.history_}
