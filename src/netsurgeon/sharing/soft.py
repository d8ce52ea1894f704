"""Soft weight sharing (Ullrich, Meeds, Welling 2017, "Soft Weight-Sharing for Neural Network Compression",
arXiv:1702.04008).

A pretrained network is retrained under a Gaussian-mixture prior over all its weights (Eq. (5)):
p(w) = Π_i Σ_{j=0..J} π_j N(w_i | μ_j, σ_j²), minimising L = L^E + τ·L^C with L^C = −log p(w, θ) (Eq. (6)-(7)).
Component 0 is fixed at μ_0 = 0 with a fixed high mixing proportion π_0 (0.999 in Sec. 4.1); the other means,
every variance and the other proportions are learned jointly with the weights (Adam; each group its own
learning rate, as the authors' code), with Gamma hyper-priors on the precisions that stop components from
collapsing (Sec. 2, 6.1; the code's form and values: Σ_j (1−α_j)·log λ_j + β_j·λ_j, zero component α 5000 /
β 2, others α 250 / β 0.1). The per-batch objective is mean cross-entropy + (τ/N)·L^C with N the training-set
size: a summed L^E with weight τ, divided by N (the code's scaling).

After training (Sec. 4.3): components whose symmetric KL divergence falls below ``merge_kl`` merge (Eq. (8): π
adds, μ and σ² are π-weighted means); each weight takes the mean of its most responsible component,
argmax_k π_k N(w | μ_k, σ_k²), so weights of component 0 become exactly zero. The result is one codebook for
all layers plus an index per weight (the k-means ``shared`` form), stored sparse + Huffman-coded in ``.nsz``.

Choices not fixed by the paper, written down: the means start evenly spread over the pretrained weights' range
(the paper; the code uses ±0.6); all standard deviations start at ``init_std`` = 0.02, the mean of the code's
Gamma hyper-priors (precision α/β = 2500 for the zero and the other components alike), where the code starts
at 0.25: with the fixed π_0 = 0.999 a weight leaves the zero component only when it sits several σ_0 from zero,
and at the code's learning rates a 0.25 start is still ~0.1 after 30 epochs of digits, so every weight was
quantized to zero (the network then computes a constant; :meth:`SoftWeightSharing.finalize` now refuses that).
The merge threshold is ours (the code merges only at KL < 1e-10, i.e. identical components); biases are left out
of the prior and stay float (the code regularises and quantizes them; our tables count weights).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._validation import check_finite_model
from ..forms.shared import SharedWeights
from ..masks import prunable_layers
from ..plan import trained
from ..registry import StageContext, option, register
from ..train import Callback, TrainConfig, Trainer, evaluate, run_training

log = logging.getLogger(__name__)

__all__ = ["GaussianMixturePrior", "SoftWeightSharing", "SoftSharingConfig", "merge_components"]

_LOG_2PI = math.log(2 * math.pi)


class GaussianMixturePrior(nn.Module):
    """The mixture of Eq. (5): fixed zero component (μ_0 = 0, π_0), J learned means, J+1 log-precisions
    γ_j = log λ_j, J mixing logits (π_j = (1−π_0)·softmax(logits)_j)."""

    def __init__(self, components: int, pi0: float, weights: Tensor, init_std: float = 0.02,
                 gamma_zero: tuple[float, float] = (5000.0, 2.0), gamma_other: tuple[float, float] = (250.0, 0.1)
                 ) -> None:
        super().__init__()
        if components < 2:
            raise ValueError(f"GaussianMixturePrior: need at least 2 components (zero + one); got {components}.")
        lo, hi = float(weights.min()), float(weights.max())
        dev = weights.device  # beside the weights it is trained with
        self.means = nn.Parameter(torch.linspace(lo, hi, components - 1, device=dev))
        self.log_precision = nn.Parameter(torch.full((components,), -2 * math.log(init_std), device=dev))
        self.mix_logits = nn.Parameter(torch.zeros(components - 1, device=dev))
        self.register_buffer("pi0", torch.tensor(float(pi0), device=dev))
        self.register_buffer("alpha", torch.tensor([gamma_zero[0]] + [gamma_other[0]] * (components - 1), device=dev))
        self.register_buffer("beta", torch.tensor([gamma_zero[1]] + [gamma_other[1]] * (components - 1), device=dev))

    def mixture(self) -> tuple[Tensor, Tensor, Tensor]:
        """(μ, λ, log π) of all components, the zero component first."""
        mu = torch.cat([self.means.new_zeros(1), self.means])
        log_pi = torch.cat([self.pi0.log().view(1), torch.log1p(-self.pi0) + torch.log_softmax(self.mix_logits, 0)])
        return mu, self.log_precision.exp(), log_pi

    def log_responsibility(self, w: Tensor) -> Tensor:
        """log π_j N(w_i | μ_j, 1/λ_j) for every weight i (rows) and component j (columns)."""
        mu, lam, log_pi = self.mixture()
        return log_pi + 0.5 * (self.log_precision - _LOG_2PI) - 0.5 * lam * (w.unsqueeze(1) - mu) ** 2

    def nll(self, w: Tensor, chunk: int = 1 << 18) -> Tensor:
        """−log p(w) summed over the weights (chunked: a 431k x 17 matrix at a time is 29 MB)."""
        return -sum(torch.logsumexp(self.log_responsibility(w[i:i + chunk]), 1).sum()
                    for i in range(0, w.numel(), chunk))

    def hyperprior(self) -> Tensor:
        """−log Gamma(λ | α, β) up to a constant, as the authors' code writes it."""
        return ((1 - self.alpha) * self.log_precision + self.beta * self.log_precision.exp()).sum()


@torch.no_grad()
def merge_components(mu: Tensor, var: Tensor, pi: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Merge components (zero component first, kept first and at μ = 0) whose symmetric KL divergence is below
    ``threshold``, transitively, by Eq. (8). Returns the merged (μ, σ², π)."""
    j = mu.numel()
    kl = 0.5 * (var.unsqueeze(1) / var + (mu.unsqueeze(1) - mu) ** 2 / var - 1 + (var / var.unsqueeze(1)).log())
    sym = torch.maximum(kl, kl.t())
    parent = list(range(j))

    def root(a: int) -> int:
        while parent[a] != a:
            a = parent[a]
        return a

    for a in range(j):
        for b in range(a + 1, j):
            if float(sym[a, b]) < threshold:
                ra, rb = root(a), root(b)
                parent[max(ra, rb)] = min(ra, rb)  # the zero component (0) stays the root of its group
    groups: dict[int, list[int]] = {}
    for a in range(j):
        groups.setdefault(root(a), []).append(a)
    out_mu, out_var, out_pi = [], [], []
    for r in sorted(groups):
        g = torch.tensor(groups[r], device=pi.device)
        p = pi[g].sum()
        out_pi.append(p)
        out_mu.append(torch.zeros((), device=mu.device) if r == 0 else (pi[g] * mu[g]).sum() / p)
        out_var.append((pi[g] * var[g]).sum() / p)
    return torch.stack(out_mu), torch.stack(out_var), torch.stack(out_pi)


def _trainable_weight(m: nn.Module) -> Tensor:
    """The tensor training updates: the weight, or the original under a pruning mask (its zeros stay zero)."""
    return m.parametrizations["weight"].original if parametrize.is_parametrized(m, "weight") else m.weight


class SoftWeightSharing(Callback):
    """Soft weight sharing as a training callback (module docstring). Its mixture has its own Adam optimizer
    (stepped in :meth:`after_step`), so it runs in ``ns.train`` and in the user's own loop alike (there, give
    ``n_train``, the training-set size that scales τ). A model with pruning masks keeps them: pruned weights
    stay zero and count in component 0 (e.g. DNS, then soft sharing)."""

    def __init__(self, components: int = 17, pi0: float = 0.999, tau: float = 0.05, init_std: float = 0.02,
                 lr_means: float = 1e-4, lr_log_precision: float = 3e-3, lr_mix: float = 3e-3,
                 hyperprior: bool = True, merge_kl: float = 1e-3, n_train: int | None = None) -> None:
        self.components, self.pi0, self.tau, self.init_std = components, pi0, tau, init_std
        self.lrs = (lr_means, lr_log_precision, lr_mix)
        self.use_hyperprior, self.merge_kl, self.n_train = hyperprior, merge_kl, n_train
        self.prior: GaussianMixturePrior | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.layers: dict[str, nn.Module] = {}
        self.report: dict[str, Any] = {}
        self._val_data: Any = None

    def prepare(self, model: nn.Module, *, train_data: Any = None, val_data: Any = None, **_: Any) -> None:
        check_finite_model("soft_sharing", model)
        self._val_data = val_data
        self.layers = prunable_layers(model, "soft_sharing")
        for name, m in self.layers.items():
            kinds = [type(p).__name__ for p in m.parametrizations["weight"]] if parametrize.is_parametrized(
                m, "weight") else []
            if any(k not in ("Mask", "StraightThroughMask") for k in kinds):  # a pruned model is fine: zeros stay
                raise ValueError(f"soft_sharing: layer {name!r} already holds "
                                 f"{', '.join(type(p).__name__ for p in m.parametrizations['weight'])} weights; "
                                 "start from a float model.")
        if self.n_train is None and train_data is not None:
            try:
                self.n_train = len(train_data.x) if hasattr(train_data, "x") else None
            except TypeError:
                self.n_train = None
        if self.prior is None:
            w = self._weights().detach()
            self.prior = GaussianMixturePrior(self.components, self.pi0, w, self.init_std)
            p = self.prior
            self.opt = torch.optim.Adam([{"params": [p.means], "lr": self.lrs[0]},
                                         {"params": [p.log_precision], "lr": self.lrs[1]},
                                         {"params": [p.mix_logits], "lr": self.lrs[2]}])
        self._model = model

    def on_train_start(self, trainer: Trainer) -> None:
        if self.n_train is None:
            self.n_train = len(trainer.data.train) * (1 if hasattr(trainer.data.train, "x") else
                                                      trainer.config.batch_size)
        super().on_train_start(trainer)

    def _weights(self) -> Tensor:
        return torch.cat([m.weight.reshape(-1) for m in self.layers.values()])

    def loss(self, outputs: Tensor, batch: tuple[Tensor, Tensor], trainer: Trainer | None = None) -> Tensor:
        assert self.prior is not None
        if not self.n_train:
            raise ValueError("soft_sharing: the training-set size is unknown; pass n_train=... in your own loop.")
        lc = self.prior.nll(self._weights())
        if self.use_hyperprior:
            lc = lc + self.prior.hyperprior()
        return (self.tau / self.n_train) * lc

    def after_step(self, trainer: Trainer | None = None) -> None:
        assert self.opt is not None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def assignments(self) -> tuple[Tensor, dict[str, Tensor]]:
        """The post-processing of Sec. 4.3 without touching the model: the merged means (zero component first)
        and, per layer, each weight's component, argmax_k π_k N(w | μ_k, σ_k²) (an exact zero, a pruned
        weight, stays in component 0)."""
        assert self.prior is not None
        mu, lam, log_pi = self.prior.mixture()
        mu, var, pi = merge_components(mu.detach(), 1 / lam.detach(), log_pi.detach().exp(), self.merge_kl)
        out = {}
        for name, m in self.layers.items():
            w = m.weight.detach().reshape(-1)
            resp = torch.log(pi) - 0.5 * var.log() - 0.5 * (w.unsqueeze(1) - mu) ** 2 / var
            out[name] = torch.where(w == 0, 0, resp.argmax(1)).reshape(m.weight.shape)
        self._merged = (mu, var, pi)
        return mu, out

    @contextmanager
    def quantized(self) -> Iterator[nn.Module]:
        """Within the block the model computes with the weights :meth:`finalize` would store (each weight its
        component's mean); the trained weights come back after it. For choosing an epoch, or checking the
        quantization, on validation data."""
        mu, index = self.assignments()
        saved = {}
        with torch.no_grad():
            for name, k in index.items():
                w = _trainable_weight(self.layers[name])
                saved[name] = w.detach().clone()
                w.copy_(mu[k])
        try:
            yield self._model
        finally:
            with torch.no_grad():
                for name, w0 in saved.items():
                    _trainable_weight(self.layers[name]).copy_(w0)

    @contextmanager
    def stored(self) -> Iterator[None]:
        """Epochs are compared as the file will hold them (``select="best_val"``): quantized, as in
        :meth:`quantized`."""
        with self.quantized():
            yield

    @torch.no_grad()
    def finalize(self, model: nn.Module | None = None) -> nn.Module:
        """Merge components, give each weight its component's mean (zero for component 0), and leave one shared
        codebook (SharedWeights) on every layer. With validation data (given to :meth:`prepare`), the report
        gains the validation accuracy before and after this quantization, and a drop of more than 10 points is
        logged as a warning.

        Raises:
            ValueError: every weight of a layer falls to the zero component (the network would compute a
                constant); nothing is changed.
        """
        out = super().finalize(model)
        acc = {}
        if self._val_data is not None:  # what quantizing to the component means costs, on validation data
            acc["val_acc_retrained"] = evaluate(out, self._val_data)[1]
            with self.quantized():
                acc["val_acc_quantized"] = evaluate(out, self._val_data)[1]
            if acc["val_acc_quantized"] < acc["val_acc_retrained"] - 0.1:
                log.warning("soft_sharing: quantizing to the component means drops validation accuracy from %.3f "
                            "to %.3f (the mixture has not fit the weights yet); train longer",
                            acc["val_acc_retrained"], acc["val_acc_quantized"])
        mu, index = self.assignments()
        empty = [name for name, k in index.items() if not bool((k != 0).any())]
        if empty:
            _, var, _ = self._merged
            raise ValueError(
                f"soft_sharing: every weight of layer(s) {', '.join(map(repr, empty))} falls to the zero component, "
                f"so the network would compute a constant (the mixture has not fit the weights yet: widest σ "
                f"{float(var.sqrt().max()):.3g}); train longer, or raise lr_log_precision / lower init_std. Nothing "
                "was quantized.")
        _, var, pi = self._merged
        book = nn.Parameter(mu[1:].clone())
        kept_total = 0
        used = torch.zeros(mu.numel(), dtype=torch.bool, device=mu.device)
        for name, m in self.layers.items():
            k = index[name]
            used[k.unique()] = True
            kept_total += int((k != 0).sum())
            if parametrize.is_parametrized(m, "weight"):  # a pruning mask: its zeros are in component 0 already
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            p = SharedWeights(book.detach(), k)
            p.codebook = book  # one codebook for every layer, as in the paper
            parametrize.register_parametrization(m, "weight", p, unsafe=True)
        n = sum(m.weight.numel() for m in self.layers.values())
        self.report = {"components_trained": int(self.components), "components_after_merge": int(mu.numel()),
                       "components_used": int(used.sum()), "kept": kept_total / max(n, 1),
                       "means": [round(float(v), 6) for v in mu], "stds": [round(float(v), 6) for v in var.sqrt()],
                       "mixing": [float(v) for v in pi], **acc}
        return out

    def state_dict(self) -> dict[str, Any]:
        assert self.prior is not None and self.opt is not None
        return {"prior": self.prior.state_dict(), "opt": self.opt.state_dict(), "n_train": self.n_train}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.prior is not None and self.opt is not None
        self.prior.load_state_dict(state["prior"])
        self.opt.load_state_dict(state["opt"])
        self.n_train = state["n_train"]


_CITE = ("Ullrich, Meeds, Welling 2017, Soft Weight-Sharing for Neural Network Compression, arXiv:1702.04008, "
         "Eq. (5)-(8), Sec. 4")


@dataclass(frozen=True)
class SoftSharingConfig(TrainConfig):
    owner: ClassVar[str] = "soft_sharing"
    optimizer: str = option("adam", "sgd (with momentum) or adam", choices=("sgd", "adam"))
    lr: float = option(5e-4, "learning rate of the weights (the code's 5e-4)", low=0, low_open=True)
    weight_decay: float = option(0.0, "L2 weight decay (the prior replaces it)", low=0)
    components: int = option(17, "mixture components, the zero component included (paper: 17)", low=2, high=256)
    pi0: float = option(0.999, "fixed mixing proportion of the zero component", low=0, high=1, low_open=True,
                        high_open=True)
    tau: float = option(0.05, "weight of the prior, τ (Eq. (6)); the loss adds (τ/N)·(−log prior)", low=0)
    init_std: float = option(0.02, "initial standard deviation of every component (the hyper-priors' mean; the "
                                   "code's 0.25 needs hundreds of epochs to shrink)", low=0, low_open=True)
    lr_means: float = option(1e-4, "Adam LR of the means", low=0, low_open=True)
    lr_log_precision: float = option(3e-3, "Adam LR of the log precisions", low=0, low_open=True)
    lr_mix: float = option(3e-3, "Adam LR of the mixing logits", low=0, low_open=True)
    hyperprior: bool = option(True, "Gamma hyper-priors on the precisions (the code's values)")
    merge_kl: float = option(1e-3, "merge components whose symmetric KL divergence is below this", low=0)


@register("soft_sharing", family="sharing", compare=trained("soft_sharing"),
          quick={"epochs": 1, "tau": 0.5, "init_std": 0.005},  # random weights: narrow, or all go to zero
          kind="training", config=SoftSharingConfig, gives="shared", needs_data=True,
          citation=_CITE, summary="retrain under a learned Gaussian-mixture prior, then quantize each weight to its "
                                  "component's mean (zero component: pruned)")
def _run(model: nn.Module, cfg: SoftSharingConfig, ctx: StageContext) -> dict[str, Any]:
    cb = SoftWeightSharing(cfg.components, cfg.pi0, cfg.tau, cfg.init_std, cfg.lr_means, cfg.lr_log_precision,
                           cfg.lr_mix, cfg.hyperprior, cfg.merge_kl)
    out = run_training(model, ctx, cfg, cb)
    return {**out, **cb.report}
