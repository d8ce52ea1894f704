"""Half-wave Gaussian quantization of activations (Cai, He, Sun, Vasconcelos 2017, "Deep Learning with Low
Precision by Half-wave Gaussian Quantization", arXiv:1702.00953, Sec. 3-4).

Forward (Sec. 3.2): a ReLU whose output is quantized to ``2^b`` values, Q(x) = 0 for x <= 0 and, for x > 0,
the uniform levels q_i = i·Δ (i = 1 .. 2^b − 1) with thresholds halfway between levels. After BatchNorm the
pre-activations are close to N(0, 1), so Δ is the one that minimises E[(Q(x) − x)²] over the positive half of
the Gaussian (computed here by numerical integration; it reproduces the paper's values: 1 bit 0.798 =
E[x | x > 0], 2 bits 0.538).

Backward (Sec. 4): Q's derivative is zero almost everywhere, so the gradient is that of a ReLU approximation:
``relu`` (1 for x > 0), ``clipped`` (1 for 0 < x <= q_max, the paper's choice, Eq. (11)), or ``log_tailed``
(the clipped ReLU continued by a logarithm beyond q_max, derivative 1 / (x − τ) with τ = q_max − 1,
Eq. (12)).

Where: the input of every Linear/Conv layer but the first (whose input is the data) is quantized by a forward
pre-hook, the place where a ReLU's (or max-pool's: they commute with the monotone Q) output arrives; parameter
names do not change and the ``.nsz`` architecture record lists the layers and their bits (``hwgq_inputs``), so
the quantizers are rebuilt on load. The paper pairs HWGQ with binary weights (BW, Sec. 5): the method's
``binary_weights`` option trains BWN weights (one α per output channel) alongside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..changes.hwgq_inputs import (
    BACKWARDS,
    apply_hwgq_inputs,
    half_gaussian_step,
    hwgq,
    hwgq_inputs_of,
    install_hwgq_input,
    record_hwgq_inputs,
)
from ..masks import prunable_layers
from ..plan import trained
from ..registry import StageContext, option, register
from ..train import Callback, TrainConfig, Trainer, run_training
from .binary import Binarize

__all__ = ["half_gaussian_step", "hwgq", "install_hwgq_input", "hwgq_inputs_of", "apply_hwgq_inputs", "HWGQ",
           "HWGQConfig", "BACKWARDS"]


class HWGQ(Callback):
    """Train with HWGQ activations (the input of every layer but the first), optionally with BWN weights.

    Args:
        bits: activation bits (the paper: 2).
        backward: ``relu``, ``clipped`` (the paper's choice) or ``log_tailed``.
        binary_weights: also binarize the weights (α·sign(W) per output channel), the paper's "BW" networks;
            the first and last layers keep real weights, as in the paper.
    """

    def __init__(self, bits: int = 2, backward: str = "clipped", binary_weights: bool = True, seed: int = 0) -> None:
        if backward not in BACKWARDS:
            raise ValueError(f"hwgq: backward must be one of {list(BACKWARDS)}; got {backward!r}.")
        half_gaussian_step(bits)
        self.bits, self.backward = bits, backward
        self.weights = Binarize("alpha", None, keep_first=True, keep_last=True, lr_scale=False, seed=seed) \
            if binary_weights else None

    def prepare(self, model: nn.Module, **kw: Any) -> None:
        self._model = model
        layers = list(prunable_layers(model, "hwgq").items())
        if len(layers) < 2:
            raise ValueError("hwgq: the model needs at least two Linear/Conv layers (the first layer's input is the "
                             "data and stays real).")
        for _, layer in layers[1:]:
            install_hwgq_input(layer, self.bits, self.backward)
        if self.weights is not None:
            self.weights.prepare(model, **kw)

    def after_backward(self, trainer: Trainer | None = None) -> None:
        if self.weights is not None:
            self.weights.after_backward(trainer)

    def after_step(self, trainer: Trainer | None = None) -> None:
        if self.weights is not None:
            self.weights.after_step(trainer)

    def finalize(self, model: nn.Module | None = None) -> nn.Module:
        out = self.weights.finalize(model) if self.weights is not None else super().finalize(model)
        record_hwgq_inputs(out, hwgq_inputs_of(out))
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.weights.state_dict() if self.weights is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.weights is not None:
            self.weights.load_state_dict(state)


@dataclass(frozen=True)
class HWGQConfig(TrainConfig):
    owner: ClassVar[str] = "hwgq"
    bits: int = option(2, "activation bits (2^bits values, 0 included; the paper: 2)", low=1, high=8)
    backward: str = option("clipped", "gradient approximation: relu, clipped (the paper's) or log_tailed",
                           choices=BACKWARDS)
    binary_weights: bool = option(True, "binary weights too (BWN, first and last layers real), as the paper's BW nets")
    optimizer: str = option("adam", "sgd (with momentum) or adam", choices=("sgd", "adam"))
    lr: float = option(1e-3, "learning rate", low=0, low_open=True)
    weight_decay: float = option(0.0, "L2 weight decay", low=0)


def _hwgq_gives(cfg: HWGQConfig) -> str:
    return "binary" if cfg.binary_weights else "float"


@register("hwgq", family="binary", compare=trained("hwgq"), quick={"epochs": 1},
          kind="training", config=HWGQConfig, needs_data=True, gives=_hwgq_gives,
          citation="Cai, He, Sun, Vasconcelos 2017 (CVPR), Deep Learning with Low Precision by Half-wave Gaussian "
                   "Quantization, Sec. 3-4 (Eq. (11)-(12))",
          summary="2-bit half-wave Gaussian activations (clipped-ReLU backward) with binary weights")
def _run_hwgq(model: nn.Module, cfg: HWGQConfig, ctx: StageContext) -> dict[str, Any]:
    cb = HWGQ(cfg.bits, cfg.backward, cfg.binary_weights, cfg.seed)
    return {**run_training(model, ctx, cfg, cb), "step": half_gaussian_step(cfg.bits),
            "quantized_inputs": list(hwgq_inputs_of(model))}
