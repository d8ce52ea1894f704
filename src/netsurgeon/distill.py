"""Knowledge distillation (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network",
arXiv:1503.02531, Sec. 2): the student is trained on a weighted average of the cross-entropy with the hard
labels and the cross-entropy with the teacher's soft targets, both softmaxes at temperature T (Eq. (1)). The
soft term's gradients scale as 1/T², so it is multiplied by T² (Sec. 2) to keep the balance when T changes.

Loss per batch: (1 − α)·CE(y, z) + α·T²·KL(softmax(v/T) ‖ softmax(z/T)), v the teacher's logits, z the student's;
KL differs from the soft cross-entropy by the teacher's entropy, a constant, so the gradient is the paper's
(Eq. (2): ∂C/∂z_i = (1/T)(q_i − p_i)). The student predicts at T = 1.

As the ``distill`` stage of a pipeline the teacher is the model as the pipeline received it (the dense model
before compression), so distillation is the fine-tuning stage of any pipeline: ``--method dns,distill``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .plan import Plan
from .registry import StageContext, option, register
from .train import Callback, TrainConfig, Trainer, run_training

__all__ = ["Distillation", "DistillConfig", "distillation_loss"]


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch: over the samples of a
    classifier's (B, C) logits, over every next-token prediction of a language model's (B, T, V) (the softmax
    over the vocabulary, the last dimension; the mean over B·T predictions, as the hard-label loss is)."""
    t = temperature
    if student.dim() > 2:
        student, teacher = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    return t * t * F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
                            log_target=True)


class Distillation(Callback):
    """Train against a teacher's soft targets too (module docstring). ``hard_loss_weight`` (1 − α) tells the
    training loop how much of the hard-label loss to keep; in your own loop, compute
    ``(1 - alpha) * F.cross_entropy(out, y) + method.loss(out, (x, y))``."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9) -> None:
        if temperature <= 0 or not 0 <= alpha <= 1:
            raise ValueError(f"Distillation: need temperature > 0 and alpha in [0, 1]; got {temperature!r}, "
                             f"{alpha!r}.")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha
        self.hard_loss_weight = 1.0 - alpha

    def loss(self, outputs: Tensor, batch: tuple[Tensor, Tensor], trainer: Trainer | None = None) -> Tensor:
        with torch.no_grad():
            target = self.teacher(batch[0])
        return self.alpha * distillation_loss(outputs, target, self.temperature)


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    owner: ClassVar[str] = "distill"
    temperature: float = option(4.0, "softmax temperature T of the soft targets (paper's MNIST: 20)", low=0,
                                low_open=True)
    alpha: float = option(0.9, "weight of the soft-target term (1 - alpha on the hard labels)", low=0, high=1)


def _magnitude_distill(p: Plan) -> list[dict[str, Any]]:
    """Magnitude pruning without retraining, then distillation from the dense model on the whole budget."""
    return [{"magnitude": {"sparsity": p.sparsity, "rounds": 1, "epochs": 0}}, {"distill": p.train()}]


@register("distill", family="pipeline", compare={"magnitude_distill": _magnitude_distill}, quick={"epochs": 1},
          not_compared="the fine-tuning stage of magnitude_distill",
          needs_teacher=True,
          kind="training", config=DistillConfig, accepts=("float", "shared", "hashed", "pq"),
          needs_data=True,
          citation="Hinton, Vinyals, Dean 2015, Distilling the Knowledge in a Neural Network, arXiv:1503.02531, "
                   "Sec. 2 (Eq. (1)-(2))",
          summary="fine-tune against the soft targets of the model the pipeline started from (masks and codebooks "
                  "kept)")
def _run(model: nn.Module, cfg: DistillConfig, ctx: StageContext) -> dict[str, Any]:
    teacher = ctx.teacher if ctx.teacher is not None else copy.deepcopy(model)
    return run_training(model, ctx, cfg, Distillation(teacher, cfg.temperature, cfg.alpha))
