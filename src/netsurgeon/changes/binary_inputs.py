"""``binary_inputs``: layers that binarize their input (BNN: sign(x); XNOR-Net: sign(x) with the output scaled by
β or K; ``quantization/binary.py``).

The record is ``{layer: "sign" | "scaled"}``; the loader installs the same forward hooks the method trained with.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..coding.container import NszError
from ..coding.schema import check_mapping, short
from . import ArchChange, record_change, register_change

__all__ = ["BinaryInputs", "record_binary_inputs", "MODES"]

MODES = ("sign", "scaled")


def record_binary_inputs(model: nn.Module, inputs: dict[str, str]) -> None:
    """Record on ``model`` which layers binarize their input ({layer: "sign" | "scaled"})."""
    record_change(model, "binary_inputs", inputs)


@register_change
class BinaryInputs(ArchChange):
    key = "binary_inputs"
    order = 30

    def check(self, where: str, value: Any) -> None:
        def one(layer: str, mode: Any) -> None:
            if mode not in MODES:
                raise NszError(f"{where}: field 'binary_inputs' must map layer names to 'sign' or 'scaled'; got "
                               f"{short(value)}.")

        check_mapping(where, "binary_inputs", value, one)

    def apply(self, model: nn.Module, value: Any, source: str) -> None:
        from ..quantization.binary import apply_binary_inputs  # TODO(lead): the hooks move here after #39's BNN fix

        apply_binary_inputs(model, value, source)
