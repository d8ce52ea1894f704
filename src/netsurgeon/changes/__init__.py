"""Architecture changes: what a compressed model's file records so the changed model is rebuilt without pickle.

A model is rebuilt from its architecture record (a model name or an import path and its arguments,
``architecture.py``); a method that changes the architecture (removes channels or attention heads, replaces a
layer by factors, binarizes or quantizes a layer's input) adds an entry under its own key, e.g.
``"resized": {layer: {field: size}}``. Each kind of change is one module of this package: a
:class:`ArchChange` subclass registered with :func:`register_change` that bounds its record (the file reader runs
it on untrusted headers) and applies it to a freshly built model. Methods record with :func:`record_change`; the
loader applies every key a record holds with :func:`apply_changes`. Nothing else lists the changes.

| key           | module           | what it records                          | made by                       |
| ------------- | ---------------- | ---------------------------------------- | ----------------------------- |
| resized       | resized.py       | {layer: {size field: new size}}          | structured pruning            |
| factorized    | factorized.py    | {layer: rank} or {layer: {kind, rank}}   | low rank                      |
| binary_inputs | binary_inputs.py | {layer: "sign" or "scaled"}              | BNN, XNOR-Net                 |
| hwgq_inputs   | hwgq_inputs.py   | {layer: bits}                            | HWGQ activation quantization  |
| heads         | heads.py         | {layer: [kept head indices]}             | attention head pruning        |
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, ClassVar

from torch import nn

__all__ = ["ArchChange", "register_change", "changes", "arch_of", "set_arch", "record_change", "apply_changes",
           "check_changes", "CORE_KEYS"]

_ARCH_ATTR = "_netsurgeon_arch"
CORE_KEYS = ("name", "input_shape", "input_dtype", "num_classes", "kwargs", "factory")  # how the model is built


class ArchChange:
    """One kind of architecture change.

    Attributes:
        key: its field in the architecture record.
        reshapes: it changes parameter shapes (counts and latency are then reported against the architecture
            before the change, ``architecture.original_model``).
        order: changes are applied in increasing order (a layer is resized before it is factorized).
    """

    key: ClassVar[str]
    reshapes: ClassVar[bool] = False
    order: ClassVar[int] = 50

    def check(self, where: str, value: Any) -> None:
        """Raise NszError (``coding.container``) unless ``value`` is a well-formed, bounded record of this change."""
        raise NotImplementedError

    def apply(self, model: nn.Module, value: Any, source: str) -> None:
        """Change ``model`` (built from the base record) in place as ``value`` says; ValueError names a misfit."""
        raise NotImplementedError

    def merge(self, old: Any, new: Any) -> Any:
        """The record after ``new`` is recorded on top of ``old`` (default: per-layer entries replaced)."""
        return {**(old or {}), **new}


CHANGES: dict[str, ArchChange] = {}
_DISCOVERED = False


def register_change(cls: type[ArchChange]) -> type[ArchChange]:
    """Class decorator: register an :class:`ArchChange` under its ``key``."""
    if not isinstance(getattr(cls, "key", None), str) or cls.key in CORE_KEYS:
        raise RuntimeError(f"register_change({cls.__name__}): key must be a string other than {CORE_KEYS}.")
    old = CHANGES.get(cls.key)
    if old is not None and type(old).__qualname__ != cls.__qualname__:
        raise RuntimeError(f"architecture change {cls.key!r} is registered twice.")
    CHANGES[cls.key] = cls()
    return cls


def changes() -> dict[str, ArchChange]:
    """Every registered change by key (imports this package's modules on first use)."""
    global _DISCOVERED
    if not _DISCOVERED:
        for info in pkgutil.iter_modules(__path__, f"{__name__}."):
            if not info.name.rpartition(".")[2].startswith("_"):
                importlib.import_module(info.name)
        _DISCOVERED = True
    return CHANGES


def arch_of(model: nn.Module) -> dict | None:
    """How to rebuild ``model`` (what ``models.build_model`` or ``models.record_arch`` recorded, with the
    changes methods recorded since), or None."""
    return getattr(model, _ARCH_ATTR, None)


def set_arch(model: nn.Module, arch: dict[str, Any] | None) -> nn.Module:
    """Attach ``arch`` as ``model``'s record (not part of its state_dict). Returns the model."""
    object.__setattr__(model, _ARCH_ATTR, arch)
    return model


def record_change(model: nn.Module, key: str, value: Any) -> None:
    """Record on ``model`` that change ``key`` was made (merged with any recorded before), so a ``.nsz`` file
    rebuilds it. A model without a record still records it: a file can change the model the user passes."""
    change = changes().get(key)
    if change is None:
        raise ValueError(f"record_change: unknown architecture change {key!r}; known: {', '.join(sorted(CHANGES))}.")
    arch = arch_of(model) or {}
    set_arch(model, {**arch, key: change.merge(arch.get(key), value)})


def check_changes(where: str, arch: dict[str, Any]) -> None:
    """Check every change entry of an architecture record (NszError naming the field)."""
    known = changes()
    for key, value in arch.items():
        if key in known and value is not None:
            known[key].check(where, value)


def apply_changes(model: nn.Module, arch: dict[str, Any], source: str = "file") -> bool:
    """Apply, in registration order, every change ``arch`` records to ``model`` in place; returns whether there
    was any. Raises ValueError naming a layer that does not fit."""
    done = False
    for key, change in sorted(changes().items(), key=lambda kv: kv[1].order):
        if arch.get(key):
            change.apply(model, arch[key], source)
            done = True
    return done
