"""Architecture records: how a file says which model to rebuild, and rebuilding it safely.

A record is ``{"name": "lenet5", "input_shape": [1, 28, 28], "num_classes": 10}`` for a model of the zoo
(``models.py``) or ``{"factory": "pkg.module:fn", "kwargs": {...}, "input_shape": [...]}`` for a user's model,
plus one entry per architecture change a method made (``changes/``: resized layers, factors, ...). A record read
from a file is untrusted: :func:`check_arch` bounds every field before anything is built, :func:`rebuild_matching`
builds it on the ``meta`` device first (no memory) and compares its tensors with the file's, and a user's factory
runs only with ``trust_code``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .changes import CORE_KEYS, apply_changes, changes, check_changes, set_arch
from .coding.container import NszError
from .coding.schema import check_int, short

__all__ = ["UntrustedCodeError", "check_arch", "rebuild", "rebuild_matching", "apply_arch_changes", "original_model",
           "REAL_BUILD_BYTES", "MAX_INPUT_ELEMENTS", "record_inputs"]

MAX_INPUT_ELEMENTS = 1 << 24
MAX_CLASSES = 1_000_000
REAL_BUILD_BYTES = 1 << 30  # a factory that cannot build on "meta" is built for real only up to this (float32)


class UntrustedCodeError(ValueError):
    """A file asks to run code outside netsurgeon (a user's model factory) and the caller did not allow it."""


def record_inputs(arch: dict[str, Any] | None, data: Any) -> dict[str, Any] | None:
    """``arch`` completed with what the data says about the model's inputs: their shape where the record has none,
    and ``input_dtype: int64`` for token ids (the runtime, FLOP counts and export then feed the model integers)."""
    if arch is None:
        return None
    arch = dict(arch)
    shape = getattr(data, "input_shape", None)
    if "input_shape" not in arch and shape is not None:
        arch["input_shape"] = list(shape)
    x = getattr(getattr(data, "train", None), "x", None)
    if isinstance(x, torch.Tensor) and not x.is_floating_point():
        arch["input_dtype"] = "int64"
    return arch


def check_arch(p: str, arch: Any) -> dict[str, Any] | None:
    """Validate an architecture record before any module is built (types, bounds, and an input shape that cannot
    make a model allocate without bound). Returns it, or None when the file records none."""
    if arch is None:
        return None
    where = f"{p}: architecture record"
    if not isinstance(arch, dict):
        raise NszError(f"{where} must be a mapping; got {short(arch)}.")
    known = set(CORE_KEYS) | set(changes())
    if set(arch) - known:
        raise NszError(f"{where}: unknown field(s) {sorted(map(str, set(arch) - known))}.")
    has_change = bool(set(changes()) & set(arch))
    if ("name" in arch and "factory" in arch) or ("name" not in arch and "factory" not in arch and not has_change):
        raise NszError(f"{where} needs exactly one of 'name' or 'factory'.")
    for key in ("name", "factory"):
        if key in arch and (not isinstance(arch[key], str) or not 0 < len(arch[key]) <= 200):
            raise NszError(f"{where}: field {key!r} must be a short string; got {short(arch[key])}.")
    if "kwargs" in arch and not isinstance(arch["kwargs"], dict):
        raise NszError(f"{where}: field 'kwargs' must be a mapping; got {short(arch['kwargs'])}.")
    shape = arch.get("input_shape")
    if shape is not None or "name" in arch:
        if not isinstance(shape, list) or not 1 <= len(shape) <= 4:
            raise NszError(f"{where}: field 'input_shape' must be a list of 1 to 4 integers; got {short(shape)}.")
        dims = [check_int(where, "input_shape", d, 1, MAX_INPUT_ELEMENTS) for d in shape]
        if math.prod(dims) > MAX_INPUT_ELEMENTS:
            raise NszError(f"{where}: field 'input_shape' {dims} has more than {MAX_INPUT_ELEMENTS:,} elements.")
    if "name" in arch:
        check_int(where, "num_classes", arch.get("num_classes"), 1, MAX_CLASSES)
    if arch.get("input_dtype", "float32") not in ("float32", "int64"):
        raise NszError(f"{where}: field 'input_dtype' must be 'float32' or 'int64' (token ids); got "
                       f"{short(arch['input_dtype'])}.")
    check_changes(where, arch)
    return arch


def rebuild(arch: dict[str, Any], *, trust_code: bool = False, source: str = "file") -> nn.Module:
    """Build the (untrained) model an ``arch`` record describes, with its recorded architecture changes.

    A user's factory (``{"factory": "pkg.mod:fn", "kwargs": ...}``) means importing and calling code named
    by the file; that runs only with ``trust_code=True`` (a file from elsewhere could name any function).
    netsurgeon's own models never need it.

    Raises:
        UntrustedCodeError: a user's factory without ``trust_code``.
        ValueError: a malformed record, or a factory that fails.
    """
    if not isinstance(arch, dict):
        raise ValueError(f"{source}: the architecture record is malformed ({arch!r}).")
    kwargs = arch.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{source}: the architecture's kwargs are malformed ({kwargs!r}).")
    model = _rebuild_base(arch, trust_code=trust_code, source=source)
    apply_arch_changes(model, arch, source)
    set_arch(model, dict(arch))  # the record as read: a rebuilt model saves the same record again
    return model


def _rebuild_base(arch: dict[str, Any], *, trust_code: bool, source: str) -> nn.Module:
    from .models import build_model

    kwargs = arch.get("kwargs") or {}
    if "factory" in arch:
        factory = arch["factory"]
        if not isinstance(factory, str):
            raise ValueError(f"{source}: the architecture's factory is malformed ({factory!r}).")
        if not (factory.startswith("netsurgeon.") or trust_code):
            raise UntrustedCodeError(
                f"{source}: the model is rebuilt by calling {factory!r} with {kwargs!r}, code outside netsurgeon; "
                "pass trust_code=True (CLI: --trust-code) if you trust this file, or pass the model to fill.")
        return build_model(factory, arch.get("input_shape"), **kwargs)
    name, shape, classes = arch.get("name"), arch.get("input_shape"), arch.get("num_classes", 10)
    if not isinstance(name, str) or not isinstance(shape, list) or not isinstance(classes, int):
        raise ValueError(f"{source}: the architecture record is malformed ({arch!r}).")
    return build_model(name, tuple(shape), classes, **kwargs)


def rebuild_matching(arch: dict[str, Any], shapes: dict[str, tuple[int, ...]], *, trust_code: bool = False,
                     source: str = "file", real_build_bytes: int = REAL_BUILD_BYTES) -> nn.Module:
    """:func:`rebuild` ``arch``, but only if its state_dict has exactly the tensor names and ``shapes`` a file
    declares: the architecture is first built on torch's ``meta`` device (no memory), so a record that would
    build a huge model, or one that does not match the file, is refused before anything is allocated.

    A factory that cannot build on ``meta`` (it computes sizes from tensor values, e.g. ``.tolist()``) is built
    on the CPU instead when the file declares at most ``real_build_bytes`` of float32 tensors (such factories are
    a user's own code, which already needs ``trust_code``); docs/design.md gives the reasons and the sizes.

    Raises:
        UntrustedCodeError: a user's factory without ``trust_code``.
        ValueError: the record cannot be built, or its tensors differ from ``shapes`` (names them).
    """
    real = None
    try:
        with torch.device("meta"):
            probe = rebuild(arch, trust_code=trust_code, source=source)
    except UntrustedCodeError:
        raise
    except Exception as meta_error:  # noqa: BLE001 - any failure on meta: try a bounded real build
        declared = 4 * sum(math.prod(s) for s in shapes.values())
        if declared > real_build_bytes:
            raise ValueError(f"{source}: cannot rebuild the recorded architecture on the meta device "
                             f"({' '.join(str(meta_error).split())[:160]}), and the file declares {declared:,} bytes "
                             f"of tensors, more than the {real_build_bytes:,} a real build may take.") from meta_error
        try:
            real = probe = rebuild(arch, trust_code=trust_code, source=source)
        except UntrustedCodeError:
            raise
        except (ValueError, TypeError, RuntimeError, OverflowError, AttributeError) as e:
            raise ValueError(f"{source}: cannot rebuild the recorded architecture: "
                             f"{' '.join(str(e).split())[:200]}") from e
    own = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    if own != shapes:
        missing, unexpected = sorted(set(own) - set(shapes)), sorted(set(shapes) - set(own))
        wrong = sorted(k for k in set(own) & set(shapes) if own[k] != shapes[k])
        detail = (f"missing {missing[:5]}, unexpected {unexpected[:5]}" if missing or unexpected else
                  f"tensor {wrong[0]!r} is {list(shapes[wrong[0]])} in the file but {list(own[wrong[0]])} in the "
                  "recorded architecture")
        raise ValueError(f"{source}: the file's tensors do not match its recorded architecture: {detail}.")
    return real if real is not None else rebuild(arch, trust_code=trust_code, source=source)


def apply_arch_changes(model: nn.Module, arch: dict[str, Any], source: str = "file") -> bool:
    """Apply every architecture change ``arch`` records (``changes/``) to ``model`` in place; returns whether
    there was any. Raises ValueError naming a layer that does not fit."""
    return apply_changes(model, arch, source)


def original_model(arch: dict[str, Any] | None, *, trust_code: bool = False, device: str = "meta") -> nn.Module | None:
    """The architecture a record's shape-changing entries (resized layers, factors, removed heads) were made from,
    on ``device`` ("meta": no memory); None when the record has none or names no base model."""
    reshaping = {k for k, c in changes().items() if c.reshapes}
    if not arch or not reshaping & {k for k, v in arch.items() if v} or ("name" not in arch and "factory" not in arch):
        return None
    base = {k: v for k, v in arch.items() if k in CORE_KEYS}
    try:
        with torch.device(device):
            return rebuild(base, trust_code=trust_code)
    except UntrustedCodeError:
        raise
    except Exception:  # noqa: BLE001 - a factory that sizes layers from tensor values cannot build on meta
        if device != "meta":
            raise
    # built for real on the CPU: it is the model the file was compressed from, which was built at this size
    return rebuild(base, trust_code=trust_code)

