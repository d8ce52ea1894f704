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
from .coding.nsz import load_state_checked
from .masks import effective_state_dict
from .models import arch_of, rebuild

__all__ = ["save_model", "load_model", "load_any"]


def save_model(model: nn.Module, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> None:
    """Write ``model``'s effective weights (masks multiplied in) to a safetensors file, atomically."""
    check_finite_model("save_model", model)
    state = {k: v.contiguous() for k, v in effective_state_dict(model).items()}
    info = {"netsurgeon": json.dumps({"arch": arch_of(model), "meta": meta or {}})}
    atomic_save(path, lambda tmp: save_file(state, tmp, metadata=info))


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
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise NszError(f"{p}: not a readable safetensors file ({e}).") from e
    if model is None:
        arch = header.get("arch")
        if not arch:
            raise NszError(f"{p}: the file records no architecture; pass the model to fill.")
        try:
            model = rebuild(arch, trust_code=trust_code, source=str(p))
        except TypeError as e:
            raise NszError(f"{p}: cannot rebuild the recorded architecture {arch!r}: {e}") from e
    load_state_checked(model, state, str(p))
    return model, header.get("meta", {})


def load_any(path: str | os.PathLike[str], model: nn.Module | None = None, *,
             trust_code: bool = False) -> nn.Module:
    """Load a ``.nsz`` or a ``.safetensors`` model file by its extension (dense kernels)."""
    from .runtime import load_compressed

    if str(path).endswith(".nsz"):
        return load_compressed(path, model, trust_code=trust_code)
    return load_model(path, model, trust_code=trust_code)[0]
