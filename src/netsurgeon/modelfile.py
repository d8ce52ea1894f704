"""Dense model files: safetensors with the architecture in the metadata (no pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._validation import atomic_save, check_finite_model
from .coding.container import NszError
from .coding.nsz import check_state_shapes, load_state_checked
from .coding.schema import check_arch
from .masks import effective_state_dict
from .models import UntrustedCodeError, arch_of, rebuild_matching

__all__ = ["save_model", "load_model", "load_any", "model_for_file"]


def save_model(model: nn.Module, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> None:
    """Write ``model``'s effective weights (masks multiplied in) to a safetensors file, atomically."""
    check_finite_model("save_model", model)
    state = {k: v.contiguous() for k, v in effective_state_dict(model).items()}
    info = {"netsurgeon": json.dumps({"arch": arch_of(model), "meta": meta or {}})}
    atomic_save(path, lambda tmp: save_file(state, tmp, metadata=info))


def model_for_file(model: nn.Module | None, arch: Any, shapes: dict[str, tuple[int, ...]], *,
                   trust_code: bool = False, source: str = "file") -> nn.Module:
    """The module a file's tensors go into, checked against the file's tensor ``shapes`` before any data is read:
    ``model`` if given, else the file's architecture record, validated and matched on the meta device first
    (so a record for a huge or different model allocates nothing).

    Raises:
        NszError: no or a malformed record, or tensors that do not match.
        UntrustedCodeError: the record names a user's factory and ``trust_code`` is False.
    """
    arch = check_arch(source, arch)
    if model is not None and arch:  # a model the user passes: the file's structural changes first
        from .models import apply_arch_changes

        try:
            apply_arch_changes(model, arch, source)
        except ValueError as e:
            raise NszError(str(e)) from e
    if model is None:
        if not arch or ("name" not in arch and "factory" not in arch):
            raise NszError(f"{source}: the file records no architecture; pass the model to fill.")
        try:
            model = rebuild_matching(arch, shapes, trust_code=trust_code, source=source)
        except UntrustedCodeError:
            raise
        except ValueError as e:
            raise NszError(str(e)) from e
    check_state_shapes(model, shapes, source)
    return model


def load_model(path: str | os.PathLike[str], model: nn.Module | None = None, *,
               trust_code: bool = False) -> tuple[nn.Module, dict]:
    """Read a dense model file; returns ``(model, meta)``.

    The file is one written by :func:`save_model` (it records the architecture), or any safetensors state
    dict (e.g. ``safetensors.torch.save_file(model.state_dict(), path)``) together with ``model`` to fill.

    Raises:
        NszError: missing/corrupt file, no recorded architecture (and no ``model`` given), or tensors
            that do not match the model.
        UntrustedCodeError: the architecture is a user's factory and ``trust_code`` is False.
    """
    p = Path(path)
    if not p.is_file():
        raise NszError(f"{p}: no such file.")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("netsurgeon", "{}"))
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (no data read)
    except (SafetensorError, OSError, ValueError) as e:
        raise NszError(f"{p}: not a readable safetensors file ({e}).") from e
    if not isinstance(header, dict):
        raise NszError(f"{p}: the netsurgeon metadata is not a mapping.")
    model = model_for_file(model, header.get("arch"), shapes, trust_code=trust_code, source=str(p))
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise NszError(f"{p}: not a readable safetensors file ({e}).") from e
    load_state_checked(model, state, str(p))
    meta = header.get("meta", {})
    return model, meta if isinstance(meta, dict) else {}


def load_any(path: str | os.PathLike[str], model: nn.Module | None = None, *,
             trust_code: bool = False) -> nn.Module:
    """Load a ``.nsz`` or a ``.safetensors`` model file by its extension (dense kernels)."""
    from .runtime import load_compressed

    if str(path).endswith(".nsz"):
        return load_compressed(path, model, trust_code=trust_code)
    return load_model(path, model, trust_code=trust_code)[0]
