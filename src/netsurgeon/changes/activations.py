"""``activations``: activation modules a method replaced, so a file rebuilds them (BNN: a ReLU feeding a binarized
input becomes HardTanh, the paper's activation, because sign(ReLU(x)) = +1 everywhere; ``quantization/binary.py``).

The record is ``{module: "hardtanh"}``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..coding.container import NszError
from ..coding.schema import check_mapping, short
from . import ArchChange, record_change, register_change

__all__ = ["Activations", "apply_activations", "record_activations", "NONNEGATIVE"]

NONNEGATIVE = (nn.ReLU, nn.ReLU6)  # activation modules replaced by HardTanh where they feed a binarized input


def apply_activations(model: nn.Module, record: dict[str, str], source: str = "file") -> nn.Module:
    """Replace the activation modules a file records (``{name: "hardtanh"}``, see :func:`sign_safe_activations`)
    in place; raises ValueError naming a module that is missing or not an activation."""
    for name, kind in record.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{source}: replaced activation {name!r} is not in the model.") from None
        if kind != "hardtanh" or not isinstance(old, (*NONNEGATIVE, nn.Hardtanh)):
            raise ValueError(f"{source}: activation {name!r} ({type(old).__name__}) cannot become {kind!r} "
                             "(a ReLU or ReLU6 becomes 'hardtanh').")
        if not isinstance(old, nn.Hardtanh):
            model.set_submodule(name, nn.Hardtanh())
    return model



def record_activations(model: nn.Module, replaced: dict[str, str]) -> None:
    """Record the activation modules replaced ({name: "hardtanh"}), so a ``.nsz`` file rebuilds them."""
    record_change(model, "activations", replaced)


@register_change
class Activations(ArchChange):
    key = "activations"
    order = 25  # before the binarized inputs that read them

    def check(self, where: str, value: Any) -> None:
        def one(name: str, kind: Any) -> None:
            if kind != "hardtanh":
                raise NszError(f"{where}: field 'activations' must map module names to 'hardtanh'; got "
                               f"{short(value)}.")

        check_mapping(where, "activations", value, one)

    def apply(self, model: nn.Module, value: Any, source: str) -> None:
        apply_activations(model, value, source)
