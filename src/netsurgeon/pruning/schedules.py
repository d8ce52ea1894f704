"""Sparsity schedules and gradual pruning as a training callback.

The polynomial schedule is Zhu & Gupta 2017 ("To prune, or not to prune", arXiv:1710.01878, Eq. (1)),
which WoodFisher's gradual experiments also use (cubic, degree 3):

    s_t = s_f − (s_f − s_i)·(1 − (t − t_0)/(t_end − t_0))^degree,   t_0 <= t <= t_end
"""

from __future__ import annotations

import logging
from typing import Any

from .._validation import check_fraction, check_positive
from ..train import Callback, Trainer
from .woodfisher import FisherConfig, OneShotPruner

__all__ = ["polynomial_sparsity", "GradualPruning"]

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
        self.method, self.initial, self.degree, self.fisher = method, initial, degree, fisher
        self.steps_done_: list[dict[str, Any]] = []

    def _maybe_prune(self, trainer: Trainer) -> None:
        t = trainer.step
        if t < self.start or t > self.end or (t - self.start) % self.every:
            return
        s = polynomial_sparsity(t, self.initial, self.target, self.start, self.end, self.degree)
        pruner = OneShotPruner(self.method, self.fisher).fit(trainer.model, trainer.data.train)
        rep = pruner.prune(trainer.model, s)
        self.steps_done_.append({"step": t, "sparsity": rep["sparsity"], "per_layer": rep["per_layer"]})
        log.info("step %d: pruned to %.3f with %s", t, rep["sparsity"], self.method)

    def on_train_start(self, trainer: Trainer) -> None:
        self._maybe_prune(trainer)

    def after_step(self, trainer: Trainer) -> None:
        self._maybe_prune(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": list(self.steps_done_)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done_ = list(state["steps_done"])
