"""Sparsity schedules and gradual pruning as a training callback.

The polynomial schedule is Zhu & Gupta 2017 ("To prune, or not to prune", arXiv:1710.01878, Eq. (1)),
which WoodFisher's gradual experiments also use (cubic, degree 3):

    s_t = s_f − (s_f − s_i)·(1 − (t − t_0)/(t_end − t_0))^degree,   t_0 <= t <= t_end
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from .._validation import check_fraction, check_positive
from ..plan import Plan
from ..registry import StageContext, option, register
from ..train import Callback, TrainConfig, Trainer, run_training
from .woodfisher import METHODS, FisherConfig, OneShotPruner

__all__ = ["polynomial_sparsity", "GradualPruning", "GradualConfig"]

log = logging.getLogger(__name__)


def polynomial_sparsity(t: int, s_i: float, s_f: float, t0: int, t_end: int, degree: int = 3) -> float:
    """Target sparsity at step ``t`` (constant s_i before t0 and s_f after t_end)."""
    if t <= t0:
        return s_i if t == t0 else 0.0
    if t >= t_end:
        return s_f
    return s_f - (s_f - s_i) * (1 - (t - t0) / (t_end - t0)) ** degree


class GradualPruning(Callback):
    """Prune every ``every`` steps from ``start`` to ``end`` following the cubic schedule, fine-tuning between.

    Each pruning step fits the chosen one-shot method (magnitude, WoodFisher, ...) on the training split
    and prunes the model globally to the scheduled sparsity; masks keep pruned weights at zero meanwhile,
    so methods can be compared under the same schedule.
    """

    def __init__(self, target: float, start: int, end: int, every: int, *, method: str = "woodfisher",
                 initial: float = 0.05, degree: int = 3, fisher: FisherConfig | None = None) -> None:
        check_fraction("GradualPruning", "target", target)
        check_fraction("GradualPruning", "initial", initial)
        check_positive("GradualPruning", "every", every, integer=True)
        if not 0 <= start < end:
            raise ValueError(f"GradualPruning: need 0 <= start < end; got start={start}, end={end}.")
        self.target, self.start, self.end, self.every = target, start, end, every
        if method not in METHODS:
            raise ValueError(f"GradualPruning: method must be one of {METHODS}; got {method!r}.")
        self.method, self.initial, self.degree, self.fisher = method, initial, degree, fisher
        self.steps_done_: list[dict[str, Any]] = []
        self.step_ = 0
        self._train: Any = None

    def prepare(self, model: nn.Module, *, train_data: Any = None, **_: Any) -> None:
        """``train_data`` (a Split or a DataLoader) feeds the gradient statistics of each pruning step."""
        if train_data is None and self.method != "magnitude":
            raise ValueError(f"GradualPruning: method {self.method!r} needs train_data for its statistics.")
        self._model, self._train = model, train_data

    def _maybe_prune(self) -> None:
        t = self.step_
        if self._model is None:
            raise ValueError("GradualPruning: call prepare(model, train_data=...) before training.")
        if t < self.start or t > self.end or (t - self.start) % self.every:
            return
        s = polynomial_sparsity(t, self.initial, self.target, self.start, self.end, self.degree)
        pruner = OneShotPruner(self.method, self.fisher).fit(self._model, self._train)
        rep = pruner.prune(self._model, s)
        self.steps_done_.append({"step": t, "sparsity": rep["sparsity"], "per_layer": rep["per_layer"]})
        log.info("step %d: pruned to %.3f with %s", t, rep["sparsity"], self.method)

    def on_train_start(self, trainer: Trainer) -> None:
        super().on_train_start(trainer)
        if not self.steps_done_ or self.steps_done_[-1]["step"] != self.step_:
            self._maybe_prune()

    def after_step(self, trainer: Trainer | None = None) -> None:
        self.step_ += 1
        self._maybe_prune()

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": list(self.steps_done_), "step": self.step_}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done_ = list(state["steps_done"])
        self.step_ = int(state.get("step", self.steps_done_[-1]["step"] if self.steps_done_ else 0))


@dataclass(frozen=True)
class GradualConfig(TrainConfig):
    owner: ClassVar[str] = "gradual"
    target: float = option(0.9, "final global sparsity", low=0, high=1, high_open=True)
    initial: float = option(0.05, "sparsity at the first pruning step", low=0, high=1, high_open=True)
    start: int = option(0, "first pruning step", low=0)
    end: int = option(1000, "last pruning step (then fine-tuning with masks fixed)", low=1)
    every: int = option(100, "steps between pruning steps", low=1)
    degree: int = option(3, "degree of the polynomial schedule (3: cubic)", low=1)
    scorer: str = option("magnitude", "one-shot method ranking the weights at each step", choices=METHODS)
    num_grads: int = option(1000, "second-order scorers: gradients in the Fisher", low=1)
    grad_batch: int = option(1, "second-order scorers: samples per gradient", low=1)
    damp: float = option(1e-5, "second-order scorers: dampening lambda", low=0, low_open=True)
    block_size: int | None = option(2000, "second-order scorers: Fisher block size (null: full)", low=1)

    def validate(self) -> None:
        if self.start >= self.end:
            raise ValueError(f"{self.owner}: need start < end; got start={self.start}, end={self.end}.")


def _compare_entry(p: Plan) -> list[dict[str, Any]]:
    """Gradual pruning in a comparison: prune over the first 3/4 of the budget, recover in the rest (Zhu & Gupta)."""
    end = max(1, round(0.75 * p.steps))
    return [{"gradual": {**p.train(), "target": p.sparsity, "end": end, "every": max(1, end // 10)}}]


@register("gradual", family="pruning", compare=_compare_entry,
          quick={"target": 0.5, "start": 0, "end": 2, "every": 1, "epochs": 1},
          kind="training", config=GradualConfig, needs_data=True,
          citation="Zhu & Gupta 2017, arXiv:1710.01878, Eq. (1); Singh & Alistarh 2020 Sec. 6 (gradual WoodFisher)",
          summary="prune on a cubic schedule while training, ranking by magnitude or a second-order scorer")
def _run_gradual(model: nn.Module, cfg: GradualConfig, ctx: StageContext) -> dict[str, Any]:
    fisher = FisherConfig(cfg.num_grads, cfg.grad_batch, cfg.damp, cfg.block_size, cfg.seed)
    cb = GradualPruning(cfg.target, cfg.start, cfg.end, cfg.every, method=cfg.scorer, initial=cfg.initial,
                        degree=cfg.degree, fisher=fisher)
    report = run_training(model, ctx, cfg, cb)
    return {**report, "pruning_steps": len(cb.steps_done_),
            "sparsity": cb.steps_done_[-1]["sparsity"] if cb.steps_done_ else 0.0}
