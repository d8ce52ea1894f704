"""Fixed-point numbers with round-to-nearest or stochastic rounding (Gupta, Agrawal, Gopalakrishnan,
Narayanan 2015, "Deep Learning with Limited Numerical Precision", arXiv:1502.02551, Sec. 3).

A fixed-point format <IL, FL> has IL integer bits (sign included) and FL fractional bits: step ε = 2^-FL,
range [−2^(IL−1), 2^(IL−1) − ε]. Round-to-nearest maps x to the closest multiple of ε; stochastic rounding
(Eq. (2)) rounds down to ⌊x⌋ with probability 1 − (x − ⌊x⌋)/ε and up otherwise, so it is unbiased:
E[round(x)] = x. During training that keeps parameter updates much smaller than ε alive in expectation,
where round-to-nearest silently drops them. Values outside the range saturate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._validation import check_positive
from ..plan import trained
from ..registry import StageContext, option, register
from ..train import Callback, TrainConfig, Trainer, run_training

__all__ = ["fixed_point", "FixedPointTraining", "FixedPointConfig"]

_ROUNDING = ("nearest", "stochastic")


def fixed_point(x: Tensor, int_bits: int, frac_bits: int, rounding: str = "nearest",
                generator: torch.Generator | None = None) -> Tensor:
    """Round ``x`` to the <int_bits, frac_bits> fixed-point grid (saturating). Returns a new tensor."""
    if rounding not in _ROUNDING:
        raise ValueError(f"fixed_point: rounding must be one of {_ROUNDING}; got {rounding!r}.")
    check_positive("fixed_point", "int_bits", int_bits, integer=True)
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or frac_bits < 0:
        raise ValueError(f"fixed_point: frac_bits must be an int >= 0; got {frac_bits!r}.")
    eps = 2.0 ** -frac_bits
    lo, hi = -(2.0 ** (int_bits - 1)), 2.0 ** (int_bits - 1) - eps
    scaled = x / eps
    if rounding == "nearest":
        q = torch.round(scaled)
    else:
        floor = torch.floor(scaled)
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        q = floor + (u < (scaled - floor)).to(x.dtype)
    return (q * eps).clamp(lo, hi)


class _RoundBothWays(torch.autograd.Function):
    """Identity whose forward output and backward gradient are both rounded to the callback's format."""

    @staticmethod
    def forward(ctx, x: Tensor, owner: FixedPointTraining) -> Tensor:  # type: ignore[override]
        ctx.owner = owner
        return owner.round(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.owner.round(g), None


class FixedPointTraining(Callback):
    """Train in simulated fixed point (Gupta et al. 2015, Sec. 3-4).

    Parameters are rounded at the start and after every optimizer step, so each update is itself rounded:
    with ``rounding="nearest"`` updates below ε/2 are lost; with ``"stochastic"`` they survive in expectation.
    With ``activations=True`` (the paper's simulation) the output of every Linear/Conv layer is rounded too,
    after the layer's products are accumulated in float32 (the wide accumulator), and so is the
    back-propagated error arriving at that output; ``activations=False`` rounds the parameters only. Layer
    outputs are rounded while the model trains; evaluation runs the fixed-point parameters in float. The
    callback's generator is seeded and saved with its state.
    """

    def __init__(self, int_bits: int = 4, frac_bits: int = 12, rounding: str = "stochastic", seed: int = 0,
                 activations: bool = True) -> None:
        if rounding not in _ROUNDING:
            raise ValueError(f"FixedPointTraining: rounding must be one of {_ROUNDING}; got {rounding!r}.")
        fixed_point(torch.zeros(1, device="cpu"), int_bits, frac_bits)  # validates the format
        self.int_bits, self.frac_bits, self.rounding, self.activations = int_bits, frac_bits, rounding, activations
        self._gen = torch.Generator().manual_seed(seed)
        self._hooks: list[Any] = []

    def round(self, x: Tensor) -> Tensor:
        return fixed_point(x, self.int_bits, self.frac_bits, self.rounding, self._gen)

    @torch.no_grad()
    def _round(self) -> None:
        if self._model is None:
            raise ValueError("FixedPointTraining: call prepare(model) before training.")
        for p in self._model.parameters():
            p.copy_(fixed_point(p, self.int_bits, self.frac_bits, self.rounding, self._gen))

    def prepare(self, model: nn.Module, **_: Any) -> None:
        self._model = model
        self._round()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.activations:
            from ..masks import prunable_layers

            def hook(module: nn.Module, inputs: Any, out: Tensor) -> Tensor | None:
                return _RoundBothWays.apply(out, self) if module.training else None

            self._hooks = [m.register_forward_hook(hook)
                           for m in prunable_layers(model, "FixedPointTraining").values()]

    def finalize(self, model: nn.Module | None = None) -> nn.Module:
        """Remove the activation rounding (the parameters stay on the grid)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return super().finalize(model)

    def on_train_start(self, trainer: Trainer) -> None:
        if self._model is not trainer.model:
            self.prepare(trainer.model)
        else:
            self._round()

    def after_step(self, trainer: Trainer | None = None) -> None:
        self._round()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._gen.set_state(state["generator"])


@dataclass(frozen=True)
class FixedPointConfig(TrainConfig):
    owner: ClassVar[str] = "fixed_point"
    # <6, 10>: a 16-bit word whose range [-32, 32) holds the layer outputs too (bench/fixed_point_mnist.py: <6,10>
    # stochastic 5.29% vs float 5.23%; the earlier default <4, 12> saturated them: 55.8% on LeNet-300-100, 76% on
    # a trained LeNet-5 in `netsurgeon compare`)
    int_bits: int = option(6, "integer bits IL (sign included)", low=1, high=32)
    activations: bool = option(True, "also round layer outputs and back-propagated errors (the paper's simulation)")
    frac_bits: int = option(10, "fractional bits FL (step 2^-FL)", low=0, high=32)
    rounding: str = option("stochastic", "rounding of every parameter after each step (Eq. (2))", choices=_ROUNDING)


@register("fixed_point", family="quantization", compare=trained("fixed_point"), quick={"epochs": 1},
          kind="training", config=FixedPointConfig, needs_data=True,
          citation="Gupta, Agrawal, Gopalakrishnan, Narayanan 2015, arXiv:1502.02551, Sec. 3, Eq. (1)-(2)",
          summary="train with every parameter on an <IL, FL> fixed-point grid (nearest or stochastic rounding)")
def _run_fixed_point(model: nn.Module, cfg: FixedPointConfig, ctx: StageContext) -> dict[str, Any]:
    return run_training(model, ctx, cfg, FixedPointTraining(cfg.int_bits, cfg.frac_bits, cfg.rounding, cfg.seed,
                                                            cfg.activations))
