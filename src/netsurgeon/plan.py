"""A comparison's training budget, and the helpers methods use to declare their entry in ``netsurgeon compare``.

Every method declares, where it registers, the pipeline it runs as in a comparison: a function of the
:class:`Plan` (the optimizer steps every entry gets, the sparsity pruning entries aim for) returning stages, e.g.
``compare=trained("dns")`` or ``compare=pruned_then_finetuned("woodfisher", num_grads=500)``. ``compare.py`` builds
its suite from these declarations; nothing lists the methods by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Plan", "Stages", "FAMILIES", "CODEBOOK", "finetune_stage", "trained", "pruned_then_finetuned",
           "oneshot_then_finetuned"]

Stages = Callable[["Plan"], list[dict[str, Any]]]

# the order of families in a comparison's table and plots
FAMILIES = ("pruning", "second order", "post-training", "structured", "low rank", "quantization", "binary",
            "sharing", "pipeline")

# A shared value's gradient sums over every weight of its cluster (thousands in a large layer), so plain SGD steps
# on codebooks diverge: at LR 0.01 on digits (91% error), and Hessian k-means on LeNet-5 even at 0.001 (NaN at
# step 25). Adam scales each value's step by its own gradient history: codebooks are fine-tuned with Adam at 1e-4.
CODEBOOK = {"optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0}


@dataclass(frozen=True)
class Plan:
    """The training budget of every entry: ``steps`` optimizer steps of ``batch_size`` (``steps_per_epoch`` per
    pass over the training split), and the sparsity that pruning entries aim for."""

    steps: int
    steps_per_epoch: int
    sparsity: float = 0.9
    batch_size: int = 64

    @staticmethod
    def epoch_steps(data: Any, batch_size: int = 64) -> int:
        """Optimizer steps in one pass over ``data``'s training split."""
        return max(1, -(-len(data.train) // batch_size))

    def train(self, fraction: float = 1.0) -> dict[str, Any]:
        """The training options of a stage that spends ``fraction`` of the budget."""
        steps = max(1, round(fraction * self.steps))
        epochs = -(-steps // self.steps_per_epoch)
        opts: dict[str, Any] = {"epochs": epochs, "batch_size": self.batch_size}
        if steps < epochs * self.steps_per_epoch:
            opts["max_steps"] = steps
        return opts


def finetune_stage(p: Plan, fraction: float = 1.0, **opts: Any) -> dict[str, Any]:
    """A ``finetune`` stage spending ``fraction`` of the budget."""
    return {"finetune": {**p.train(fraction), **opts}}


def trained(method: str, sparse: bool = False, **opts: Any) -> Stages:
    """``method`` spending the whole budget; ``sparse``: aiming at the plan's sparsity."""
    return lambda p: [{method: {**({"sparsity": p.sparsity} if sparse else {}), **opts, **p.train()}}]


def pruned_then_finetuned(method: str, **opts: Any) -> Stages:
    """A one-shot pruning ``method`` at the plan's sparsity, then fine-tuning on the whole budget."""
    return lambda p: [{method: {"sparsity": p.sparsity, **opts}}, finetune_stage(p)]


def oneshot_then_finetuned(method: str, ft: dict[str, Any] | None = None, **opts: Any) -> Stages:
    """A one-shot ``method`` (its own options), then fine-tuning on the whole budget with ``ft``'s options."""
    return lambda p: [{method: dict(opts)}, finetune_stage(p, **(ft or {}))]
